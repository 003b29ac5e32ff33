"""Corrupt or inconsistent checkpoints stop vLLM before it serves, with one line naming the file, the
tensor and the problem: a truncated model.safetensors, a header whose offsets overrun the file, NaN
or Inf scales, g_idx outside [0, groups), qweight of the wrong dtype, qzeros contradicting sym: true,
a tensor missing for one layer only. (bits disagreeing with the tensors' shapes: test_vllm_errors.py.)

Each test corrupts a copy of the tiny sym4 checkpoint in one known way, then checks the message
against what it broke. Header and size problems are caught at config time from the headers; value
problems by the linear method on the tensors vLLM has just loaded. The last tests run the real
`vllm serve` CLI: it exits non-zero, prints the line, and never accepts a connection on its port.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_vllm_generate import checkpoint
from vllm_gptq_plugin.local_server import free_port

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

DOWN = "model.layers.1.mlp.down_proj"  # a plain layer
K_PROJ = "model.layers.0.self_attn.k_proj"  # a shard of vLLM's fused qkv_proj
UP = "model.layers.0.mlp.up_proj"  # a shard of vLLM's fused gate_up_proj


def copy_of_sym4(tmp_path: Path) -> Path:
    out = tmp_path / "sym4-corrupt"
    shutil.copytree(checkpoint("sym4"), out)
    return out


def edit_tensors(path: Path, edit) -> Path:
    """Rewrite model.safetensors with `edit(tensors)` applied (safetensors writes a valid file)."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def read_raw(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def start_engine(path: Path):
    from vllm import LLM
    return LLM(str(path), quantization="gptq-plugin", dtype="float32", enforce_eager=True, max_model_len=128)


def refusal_line(path: Path, *must_contain: str) -> str:
    """Start vLLM on `path`; it must raise, with one line naming the file and each of `must_contain`."""
    with pytest.raises(ValueError) as e:
        start_engine(path)
    message = str(e.value)
    # The traceback holds the half-built engine: free it here, not at some later collection while
    # another test's engine is starting in this process.
    del e
    gc.collect()
    file = str(path / "model.safetensors")
    lines = [line for line in message.splitlines() if file in line]
    assert len(lines) == 1, f"expected one line naming {file}:\n{message}"
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    return lines[0]


def test_truncated_safetensors_is_refused(tmp_path):
    path = copy_of_sym4(tmp_path)
    file = path / "model.safetensors"
    header, data = read_raw(file)
    cut = min((k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > len(data) - 1000),
              key=lambda k: header[k]["data_offsets"][0])  # the first tensor the cut reaches into
    with open(file, "r+b") as fh:  # an interrupted copy: the last 1000 bytes never arrived
        fh.truncate(file.stat().st_size - 1000)
    refusal_line(path, "is truncated, 1000 bytes short", f"tensor {cut} needs bytes")


def test_header_offsets_past_the_end_are_refused(tmp_path):
    path = copy_of_sym4(tmp_path)
    file = path / "model.safetensors"
    header, data = read_raw(file)
    start, stop = header[f"{DOWN}.scales"]["data_offsets"]
    header[f"{DOWN}.scales"]["data_offsets"] = [len(data) + start, len(data) + stop]
    write_raw(file, header, data)
    refusal_line(path, f"tensor {DOWN}.scales at bytes [{len(data) + start}, {len(data) + stop})",
                 f"past the end of the {len(data)}-byte data section")


@pytest.mark.parametrize("layer,value,at", [(DOWN, float("nan"), (1, 3)), (K_PROJ, float("inf"), (0, 5))])
def test_non_finite_scales_are_refused(tmp_path, layer, value, at):
    path = edit_tensors(copy_of_sym4(tmp_path), lambda t: t[f"{layer}.scales"].__setitem__(at, value))
    refusal_line(path, f"tensor {layer}.scales holds {value} at [{at[0]}, {at[1]}]", "must be finite")


def test_g_idx_outside_the_groups_is_refused(tmp_path):
    # up_proj: in=128, group 64 -> groups 0 and 1; channel 5 pointed at a group that does not exist.
    path = edit_tensors(copy_of_sym4(tmp_path), lambda t: t[f"{UP}.g_idx"].__setitem__(5, 7))
    refusal_line(path, f"tensor {UP}.g_idx holds values in [0, 7], outside the layer's 2 groups [0, 2)")


def test_negative_g_idx_is_refused(tmp_path):
    path = edit_tensors(copy_of_sym4(tmp_path), lambda t: t[f"{DOWN}.g_idx"].__setitem__(0, -1))
    refusal_line(path, f"tensor {DOWN}.g_idx holds values in [-1, 3], outside the layer's 4 groups [0, 4)")


def test_qweight_of_the_wrong_dtype_is_refused(tmp_path):
    path = edit_tensors(copy_of_sym4(tmp_path), lambda t: t.__setitem__(f"{DOWN}.qweight", t[f"{DOWN}.qweight"].long()))
    refusal_line(path, f"tensor {DOWN}.qweight is I64, but the GPTQ format stores it as I32")


def test_qzeros_contradicting_sym_are_refused(tmp_path):
    # Asymmetric zero points (4-bit v1 stores zero - 1: 3 and 9 here) in a checkpoint that says sym.
    def asym(t):
        zeros = torch.full((4, 128), 7)
        zeros[2, 10], zeros[3, 0] = 3, 9
        from vllm_gptq_plugin import format as fmt
        t[f"{DOWN}.qzeros"] = fmt.pack(zeros, 4, dim=1)
    path = edit_tensors(copy_of_sym4(tmp_path), asym)
    refusal_line(path, f"tensor {DOWN}.qzeros: a symmetric 4-bit checkpoint in format 'gptq' must store "
                       "zero 7, found 3", "set sym: false")


def test_one_tensor_missing_in_one_layer_is_refused(tmp_path):
    path = edit_tensors(copy_of_sym4(tmp_path), lambda t: t.pop(f"{DOWN}.scales"))
    refusal_line(path, f"tensor {DOWN}.scales is missing", "checkpoint is incomplete")


def test_one_layer_missing_entirely_is_refused(tmp_path):
    path = edit_tensors(copy_of_sym4(tmp_path),
                        lambda t: [t.pop(f"{DOWN}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")])
    refusal_line(path, f"tensor {DOWN}.qweight is missing, but the quantization config quantizes {DOWN}")


# --- the real `vllm serve` CLI ------------------------------------------------------------------

def serve_and_watch_port(path: Path, port: int, timeout: float = 240) -> tuple[int, str, bool]:
    """Run `vllm serve` until it exits; meanwhile try to connect to its port every 0.2 s.
    Returns (exit code, its output (vLLM logs to stdout, tracebacks go to stderr), whether a
    connection was ever accepted)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's usual engine-core process
    vllm = Path(sys.executable).with_name("vllm")
    log = path.parent / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(vllm), "serve", str(path), "--quantization", "gptq-plugin", "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "128"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    opened, deadline = False, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                opened = opened or s.connect_ex(("127.0.0.1", port)) == 0
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # our own session: the server and its engine core
            proc.wait()
            raise AssertionError(f"vllm serve still running after {timeout} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text(), opened


def corrupt_truncated(path: Path) -> str:
    with open(path / "model.safetensors", "r+b") as fh:
        fh.truncate((path / "model.safetensors").stat().st_size - 1000)
    return "is truncated, 1000 bytes short"


def corrupt_nan_scales(path: Path) -> str:
    edit_tensors(path, lambda t: t[f"{DOWN}.scales"].__setitem__((1, 3), float("nan")))
    return f"tensor {DOWN}.scales holds nan at [1, 3]"


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_nan_scales],
                         ids=["truncated-at-config-time", "nan-scales-at-load-time"])
def test_vllm_serve_exits_before_opening_its_port(tmp_path, corrupt):
    path = copy_of_sym4(tmp_path)
    problem = corrupt(path)
    port = free_port()
    rc, output, opened = serve_and_watch_port(path, port)
    assert rc != 0, output[-3000:]
    assert not opened, f"port {port} accepted a connection before vllm serve exited"
    ours = [line for line in output.splitlines() if problem in line]
    assert ours, f"no line says {problem!r}:\n{output[-4000:]}"
    # The line is whole, the file and the fix on it too (vLLM may log the same exception twice).
    assert all(str(path / "model.safetensors") in line and "re-create" in line for line in ours), ours
