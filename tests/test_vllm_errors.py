"""Bad input stops vLLM at config time with our message (naming the problem and the fix), before any
weight is loaded: an unquantized model with --quantization gptq-plugin, bits 5, tensors that
contradict the config, a quantized lm_head. The last test runs the real `vllm serve` CLI.
Corrupt files and tensor values: test_corrupt_checkpoints.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_vllm_generate import CACHE, checkpoint

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def edited_checkpoint(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of checkpoint `name` whose quantization config says something else."""
    out = tmp_path / f"{name}-edited"
    shutil.copytree(checkpoint(name), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"]))
    return out


def start_engine(path: Path):
    from vllm import LLM
    return LLM(str(path), quantization="gptq-plugin", dtype="float32", enforce_eager=True, max_model_len=128)


def message_of(excinfo) -> str:
    return str(excinfo.value)


def test_unquantized_model_is_refused():
    from vllm_gptq_plugin.offline_quant import models
    base = models.tiny_model("llama", CACHE / "tiny-llama-v1", cache=CACHE)
    with pytest.raises(ValueError) as e:
        start_engine(base)
    msg = message_of(e)
    assert "--quantization gptq-plugin needs a GPTQ checkpoint" in msg
    assert "is not a quantized checkpoint" in msg and "drop --quantization" in msg


def test_bits_5_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"bits=5 is not supported: use one of \(2, 3, 4, 8\)"):
        start_engine(edited_checkpoint(tmp_path, "sym4", bits=5))


def test_tensors_contradicting_config_are_refused(tmp_path):
    # 4-bit tensors, config claims 8 bits: qweight is half the height the config needs.
    path = edited_checkpoint(tmp_path, "sym4", bits=8)
    with pytest.raises(ValueError) as e:
        start_engine(path)
    [line] = [line for line in message_of(e).splitlines() if "qweight has shape" in line]
    assert (f"{path / 'model.safetensors'}: tensor model.layers.0.mlp.down_proj.qweight has shape [32, 128], "
            "but the config (bits=8, group_size=64) needs [64, 128]") in line
    assert "config and tensors disagree" in line


def test_group_size_contradicting_tensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"qzeros has shape \[4, 16\], but the config \(bits=4, group_size=32\) needs \[8, 16\] .*config and tensors disagree"):
        start_engine(edited_checkpoint(tmp_path, "sym4", group_size=32))


def test_quantized_lm_head_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lm_head: true .* is not supported by gptq-plugin"):
        start_engine(edited_checkpoint(tmp_path, "sym4", lm_head=True))


def test_vllm_serve_exits_with_our_message(tmp_path):
    """The real CLI: exits non-zero before serving, and the last error line is ours."""
    bad = edited_checkpoint(tmp_path, "sym4", bits=5)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    vllm = Path(sys.executable).with_name("vllm")
    proc = subprocess.run([str(vllm), "serve", str(bad), "--quantization", "gptq-plugin", "--dtype", "float32",
                           "--enforce-eager", "--port", "1"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert any("bits=5 is not supported" in line for line in err[-5:]), "\n".join(err[-20:])
