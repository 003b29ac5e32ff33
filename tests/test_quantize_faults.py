"""Quantizer faults (issue 15): SIGTERM / SIGINT stop a run at a block boundary and the same command
resumes to the identical checkpoint; calibration activations that overflow name the block and the
layer; an output folder that cannot take the checkpoint and a calibration that cannot fit in memory
are refused before the first block, with the numbers and the fix."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_gptq_plugin import cli, format as fmt
from vllm_gptq_plugin.offline_quant import checkpoint, driver, model_io, preflight, stopping

ARGS = ["--nsamples", "8", "--seqlen", "64", "--seed", "3", "--threads", "1", "--no-progress", "--bits", "4",
        "--group-size", "64"]  # the CLI defaults otherwise: fp targets, act-order, asym, MSE


def _quantize(model, out, *extra) -> int:
    return cli.main(["quantize", "--model", str(model), "--out", str(out), *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    """An uninterrupted run: what every stopped and resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "q"
    assert _quantize(tiny_llama, out) == 0
    return out


# --- SIGTERM and SIGINT -------------------------------------------------------------------------

# The signal is sent to the process itself when a block's first group starts, from inside the run,
# as `kill` or Ctrl-C would deliver it. Saves are made rare (SAVE_TIME_RATIO), so that stopping after
# block 1 must save the block itself rather than find it saved already.
SIGNALLER = textwrap.dedent("""
    import os, signal, sys
    from vllm_gptq_plugin import cli
    from vllm_gptq_plugin.offline_quant import driver, resume
    resume.SAVE_TIME_RATIO = 1e9  # saved after the first block only, unless a stop asks for it
    quantize_group = driver.quantize_group
    def signal_then_quantize(*args, **kwargs):
        if args[7] == {block} and kwargs["done"] == 0:  # block_index, first group
            os.kill(os.getpid(), signal.{sig})
        return quantize_group(*args, **kwargs)
    driver.quantize_group = signal_then_quantize
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig,block", [("SIGTERM", 0), ("SIGINT", 1), ("SIGTERM", 1)])
def test_a_signal_stops_at_the_block_boundary_and_the_same_command_resumes(tiny_llama, reference, tmp_path,
                                                                            sig, block):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_llama), "--out", str(out), *ARGS]
    proc = subprocess.run([sys.executable, "-c", SIGNALLER.format(sig=sig, block=block), *argv],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert f"{sig} received: stopping once the current block is quantized" in proc.stderr
    assert (f"stopped by {sig} after {block + 1} of 2 blocks, the resume state saved in {out}.partial: run the "
            "same command again to continue") in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
    state = json.loads((tmp_path / "q.partial" / "state.json").read_text())
    assert state["done"] == block + 1 and len(state["rows"]) == 7 * (block + 1)
    assert _quantize(tiny_llama, out) == 0  # the same command
    assert (out / fmt.WEIGHTS_FILE).read_bytes() == (reference / fmt.WEIGHTS_FILE).read_bytes()
    assert not (tmp_path / "q.partial").exists()


def test_stop_requests_note_the_first_signal_and_let_a_late_repeat_act_as_usual(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with stopping.StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns (main thread)
        assert stop.requested == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_S: the same request (torchrun forwarding it)
        assert stop.requested == "SIGINT"
        monkeypatch.setattr(stopping, "REPEAT_S", -1.0)
        with pytest.raises(KeyboardInterrupt) as e:  # later: Python's own handler, at once
            os.kill(os.getpid(), signal.SIGINT)
        assert not isinstance(e.value, stopping.Interrupted)
    assert signal.getsignal(signal.SIGINT) is before
    # An ignored signal stays ignored (e.g. SIGINT of a background job)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping.StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# --- calibration activations that overflow ----------------------------------------------------

def _fp16_model(tiny_llama, path: Path, norm_weight: float, gate_up_std: float | None) -> Path:
    """tiny_llama saved in fp16 with block 0's MLP made loud: its post-attention norm weight set to
    `norm_weight` and (if given) gate/up weights drawn with `gate_up_std`, all fp16-representable."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    mlp = model.model.layers[0]
    with torch.no_grad():
        mlp.post_attention_layernorm.weight.fill_(norm_weight)
        if gate_up_std is not None:
            torch.manual_seed(0)
            for lin in (mlp.mlp.gate_proj, mlp.mlp.up_proj):
                lin.weight.copy_((torch.randn_like(lin.weight, dtype=torch.float32) * gate_up_std).clamp(-6e4, 6e4))
    assert torch.isfinite(torch.cat([p.float().flatten() for p in model.parameters()])).all()
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def _block_outputs(model_dir: Path, n: int = 2) -> list[float]:
    """max |hidden state| after each of the first n blocks, the fp model run in fp32 on the calibration
    text's first window."""
    import transformers
    from vllm_gptq_plugin.offline_quant import data
    model, _ = model_io.load_causal_lm(model_dir)
    ids = data.calibration_samples(transformers.AutoTokenizer.from_pretrained(model_dir), ["mix"], 1, 64, 3)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    return [float(h.abs().max()) for h in hidden[1:n + 1]]


def test_an_fp16_model_past_fp16_range_quantizes_since_forwards_keep_fp32_range(tiny_llama, tmp_path):
    """The forwards run in bf16 or fp32 (fp32's range) on the model loaded in fp32: a block whose output
    exceeds fp16's range (65504), which an fp16 forward would turn into Inf, is no fault here."""
    model = _fp16_model(tiny_llama, tmp_path / "loud", norm_weight=6e4, gate_up_std=None)
    assert _block_outputs(model)[0] > 65504
    assert _quantize(model, tmp_path / "q") == 0
    assert fmt.validate(tmp_path / "q")


def test_activations_whose_hessian_overflows_name_the_block_and_the_layer(tiny_llama, tmp_path, capsys):
    """fp16 weights (each at most 6e4) that multiply up: block 0's down_proj inputs reach ~1e20, the
    sums of their squares overflow fp32 in the Hessian. Both forward dtypes have fp32's range, so the
    message says --forward-dtype fp32 will not help, and what to check."""
    model = _fp16_model(tiny_llama, tmp_path / "loud", norm_weight=6e4, gate_up_std=2e4)
    out = tmp_path / "q"
    assert _quantize(model, out) == 2
    err = capsys.readouterr().err
    assert ("block 0 of 2 (model.layers.0), layer mlp.down_proj: the Hessian of layer model.layers.0.mlp.down_proj "
            "overflowed fp32: its calibration activations reach |x| = ") in err, err
    assert "as large with --forward-dtype fp32 as with bf16: check the model's weights" in err
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("forward_dtype", ["bf16", "fp32"])
def test_non_finite_activations_name_the_block_and_suggest_fp32_forwards(tiny_llama, tmp_path, capsys,
                                                                          forward_dtype):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "inf")
    assert _quantize(tmp_path / "inf", tmp_path / "q", "--forward-dtype", forward_dtype) == 2
    err = capsys.readouterr().err
    assert "block 1 of 2 (model.layers.1), layer self_attn.q_proj: " in err, err
    assert "in the calibration activations entering layer model.layers.1.self_attn.q_proj" in err
    assert ("rerun with --forward-dtype fp32" in err) == (forward_dtype == "bf16")
    assert not (tmp_path / "q").exists()


# --- the output folder ------------------------------------------------------------------------

def _no_block_runs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a block was quantized before the refusal")
    monkeypatch.setattr(driver, "quantize_group", fail)


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in: a chmod 555 one, but root ignores permission bits, so as
    root (these tests' usual user) /sys, where the kernel refuses new files to everyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    else:
        folder = Path("/sys")
    with pytest.raises(OSError):  # the premise, checked: else this test would prove nothing
        (folder / "probe").write_text("x")
    return folder


def test_a_read_only_output_folder_is_refused_before_the_model_loads(tiny_llama, tmp_path, capsys, monkeypatch):
    folder = _read_only_folder(tmp_path)
    monkeypatch.setattr(model_io, "load_causal_lm", lambda *a: pytest.fail("the model loaded before the refusal"))
    for out in (folder / "q", folder / "missing" / "q"):  # the folder, or its nearest existing ancestor
        assert _quantize(tiny_llama, out) == 2
        err = capsys.readouterr().err
        assert f"cannot write {out}: creating a file in {folder} fails" in err and "choose a writable --out" in err
    assert cli.main(["quantize", "--model", str(tiny_llama), "--out", str(folder / "q"), "--method", "rtn"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_a_file_where_the_output_folder_should_be_is_refused(tiny_llama, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert _quantize(tiny_llama, tmp_path / "file" / "q") == 2
    assert f"{tmp_path / 'file'} is a file, not a folder; choose another --out" in capsys.readouterr().err


def test_a_full_disk_is_refused_before_the_first_block(tiny_llama, tmp_path, capsys, monkeypatch):
    """shutil.disk_usage reports 1 MiB free (a real full disk is not at hand): the run stops before any
    block, naming the need and the free space; the same holds for RTN's checkpoint."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    _no_block_runs(monkeypatch)
    out = tmp_path / "q"
    assert _quantize(tiny_llama, out) == 2
    err = capsys.readouterr().err
    assert f"not enough disk space for {out}: the run needs about " in err and "resume state up to" in err, err
    assert f"but {tmp_path} has 1.0 MiB free; free space or choose another --out" in err
    assert cli.main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--method", "rtn"]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("flags", [[], ["--lm-head", "--bits", "3", "--group-size", "32"]])
def test_disk_estimate_covers_the_checkpoint_and_the_resume_inputs(tiny_llama, tmp_path, monkeypatch, flags):
    """The estimate against the files a run really writes: the checkpoint folder (within DISK_SLACK
    above it) and the resume state's block inputs (exactly)."""
    from vllm_gptq_plugin.offline_quant.resume import WorkState
    save, seen = WorkState.save, []

    def save_and_measure(self, done, pending, inps, rows):
        save(self, done, pending, inps, rows)
        seen.append(sum(f.stat().st_size for f in self.dir.glob("inputs-*")))
    monkeypatch.setattr(WorkState, "save", save_and_measure)
    out = tmp_path / "q"
    assert _quantize(tiny_llama, out, *flags) == 0
    written = sum(f.stat().st_size for f in out.iterdir())
    model, dtype = model_io.load_causal_lm(tiny_llama)
    cfg = fmt.read_quant_config(out)
    ckpt, quantized = preflight.checkpoint_bytes(model, checkpoint.quantizable_linears(model, cfg), dtype, tiny_llama)
    assert written <= ckpt <= written + preflight.DISK_SLACK, (written, ckpt)
    packed = sum(t.numel() * t.element_size() for k, t in fmt.read_tensors(out).items()
                 if k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx", "bias"))
    assert quantized == packed
    assert seen and set(seen) == {2 * 8 * 64 * 128 * 4}  # fp targets: 2 paths x n x L x hidden, fp32


# --- calibration that cannot fit ----------------------------------------------------------------

def test_seqlen_past_the_models_positions_is_refused_naming_both(tiny_llama, smollm2, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(model_io, "load_causal_lm", lambda *a: pytest.fail("the model loaded before the refusal"))
    for model, limit in ((tiny_llama, 2048), (smollm2, 8192)):
        assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == limit
        rc = cli.main(["quantize", "--model", str(model), "--out", str(tmp_path / "q"), "--seqlen", "100000"])
        err = capsys.readouterr().err
        assert rc == 2 and (f"--seqlen 100000 is more than the model's max_position_embeddings {limit}: "
                            f"calibration windows must fit the positions it was trained for; pass --seqlen {limit} "
                            "or less") in err, err
    assert not (tmp_path / "q").exists()


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


@pytest.mark.parametrize("flags,paths", [([], 2), (["--no-fp-targets"], 1)])
def test_activations_that_cannot_fit_are_refused_before_any_is_allocated(tiny_llama, tmp_path, capsys,
                                                                           monkeypatch, flags, paths):
    """1,000,000 windows of 2048 tokens: the block inputs (fp32) and kept attention outputs (bf16) of
    each path would take 1e6 x 2048 x 128 x 6 bytes, far beyond this machine. Refused before the
    calibration text is even tokenized, naming the bytes needed and available and the options."""
    monkeypatch.setattr(driver, "_calibration_ids", lambda *a: pytest.fail("calibration drawn before the refusal"))
    n = 1_000_000
    rc = cli.main(["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "q"), "--nsamples", str(n),
                   "--seqlen", "2048", "--forward-dtype", "bf16", *flags])  # bf16: 2-byte attention outputs
    err = capsys.readouterr().err
    needed = paths * n * 2048 * 128 * (4 + 2)
    assert rc == 2 and f"the calibration activations ({n} samples x 2048 tokens) need " in err, err
    assert f"({needed} bytes) but " in err
    available = int(err.split(" bytes) is available (MemAvailable in /proc/meminfo)")[0].rsplit("(", 1)[1])
    assert abs(available - _mem_available()) < 0.2 * _mem_available()
    assert "a smaller --nsamples or --seqlen" in err
    assert ("--no-fp-targets" in err) == (paths == 2) and "--offload-activations" not in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_activations_on_a_gpu_are_checked_against_its_free_memory(monkeypatch):
    """No GPU here: torch.cuda.mem_get_info stands in for one with 10 GiB free. The options then
    include keeping the activations in CPU memory."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 << 30, 80 << 30))
    gpu = torch.device("cuda", 0)
    assert preflight.activation_memory_problem(10 << 30, gpu, 128, 2048, True) is None
    problem = preflight.activation_memory_problem((10 << 30) + 1, gpu, 128, 2048, True)
    assert f"({(10 << 30) + 1} bytes) but 10.0 GiB ({10 << 30} bytes) is available (free on cuda:0)" in problem
    assert "--offload-activations (keeps them in CPU memory)" in problem
