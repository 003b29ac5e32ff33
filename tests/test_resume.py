"""Resume: a run that dies after a finished block (injected exception, or a real SIGKILL) and is rerun
with the same arguments writes a byte-identical model.safetensors; other settings refuse to resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import api, driver
from vllm_gptq_plugin.offline_quant.resume import WorkState

CFG = dict(bits=4, group_size=64, desc_act=True, sym=False)
RUN = dict(nsamples=8, seqlen=64, seed=3, threads=1, progress=False)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """An uninterrupted run: what every resumed run must reproduce bit for bit."""
    return api.quantize(tiny_llama, tmp_path_factory.mktemp("ref") / "q", api.QuantConfig(**CFG), **RUN)


def _weights(path) -> bytes:
    return (path / fmt.WEIGHTS_FILE).read_bytes()


def _crash_after_first_block(monkeypatch):
    save = WorkState.save

    def save_then_crash(self, done, *args):
        save(self, done, *args)
        if done == 1:
            raise Crash
    monkeypatch.setattr(WorkState, "save", save_then_crash)


def test_rerun_is_deterministic(tiny_llama, reference, tmp_path):
    again = api.quantize(tiny_llama, tmp_path / "q", api.QuantConfig(**CFG), **RUN)
    assert _weights(again) == _weights(reference)


def _crashed_run(model, out, monkeypatch):
    """A run that dies after block 0, leaving its resume state behind."""
    with monkeypatch.context() as m:
        _crash_after_first_block(m)
        with pytest.raises(Crash):
            api.quantize(model, out, api.QuantConfig(**CFG), **RUN)


def test_resume_after_a_crash_is_bit_identical(tiny_llama, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _crashed_run(tiny_llama, out, monkeypatch)
    assert not out.exists()
    state = json.loads((tmp_path / "q.partial" / "state.json").read_text())
    assert state["done"] == 1 and len(state["rows"]) == 7

    resumed_blocks = []
    run_block = driver.run_block
    monkeypatch.setattr(driver, "run_block", lambda block, *a: (resumed_blocks.append(block), run_block(block, *a)))
    path = api.quantize(tiny_llama, out, api.QuantConfig(**CFG), **RUN)
    assert len(resumed_blocks) == 1, "block 0 must not be quantized again"
    assert _weights(path) == _weights(reference)
    assert not (tmp_path / "q.partial").exists()
    rows = json.loads((path / "quant_report.json").read_text())["layers"]
    assert [r["block"] for r in rows] == [0] * 7 + [1] * 7


def test_changed_settings_refuse_to_resume(tiny_llama, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _crashed_run(tiny_llama, out, monkeypatch)
    with pytest.raises(fmt.FormatError, match=r"different settings \(calibration, calibration_tokens differ\).*"
                                              r"--no-resume"):
        api.quantize(tiny_llama, out, api.QuantConfig(**CFG), **{**RUN, "seed": 4})
    with pytest.raises(fmt.FormatError, match=r"\(config differ\)"):
        api.quantize(tiny_llama, out, api.QuantConfig(**{**CFG, "bits": 3}), **RUN)
    # resume=False discards the old state and starts over (same result as a fresh run)
    path = api.quantize(tiny_llama, out, api.QuantConfig(**CFG), **RUN, resume=False)
    assert _weights(path) == _weights(reference)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from vllm_gptq_plugin.offline_quant import api
    from vllm_gptq_plugin.offline_quant.resume import WorkState
    save = WorkState.save
    def save_then_die(self, done, *args):
        save(self, done, *args)
        if done == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: a real kill -9
    WorkState.save = save_then_die
    api.quantize(sys.argv[1], sys.argv[2], api.QuantConfig(**{cfg}), **{run})
""")


def test_resume_after_kill_9_is_bit_identical(tiny_llama, reference, tmp_path):
    out = tmp_path / "q"
    script = KILLER.format(cfg=CFG, run=RUN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_llama), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and (tmp_path / "q.partial" / "state.json").exists()
    path = api.quantize(tiny_llama, out, api.QuantConfig(**CFG), **RUN)
    assert _weights(path) == _weights(reference)


def test_fp_targets_resume_bit_identical(tiny_llama, tmp_path, monkeypatch):
    """With fp targets the state holds two activation buffers (quantized and fp model): both resume."""
    cfg = {**CFG, "meta": {"fp_targets": True}}
    ref = api.quantize(tiny_llama, tmp_path / "ref", api.QuantConfig(**cfg), **RUN)
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _crash_after_first_block(m)
        with pytest.raises(Crash):
            api.quantize(tiny_llama, out, api.QuantConfig(**cfg), **RUN)
    state = json.loads((tmp_path / "q.partial" / "state.json").read_text())
    assert state["inputs_shape"][0][0] == 2  # rank 0 of 1: [paths, n, L, D]
    path = api.quantize(tiny_llama, out, api.QuantConfig(**cfg), **RUN)
    assert _weights(path) == _weights(ref)


def test_saves_are_spaced_by_their_own_cost(tmp_path, monkeypatch):
    """After the first block, a save that took 1 s comes again only after 20 s of blocks, with every
    block finished since: on a GPU a block's inputs are gigabytes, and saving them after each block
    would cost more than the block."""
    saved, clock = [], [0.0]

    def save(self, done, pending, inps, rows):
        saved.append((done, sorted(pending)))
        clock[0] += 1.0  # each save takes 1 s
    monkeypatch.setattr(WorkState, "save", save)
    work = WorkState(tmp_path / "q", {})
    work.clock = lambda: clock[0]
    for done in range(1, 31):
        clock[0] += 3.0  # each block takes 3 s
        work.block_done(done, {f"layer{done - 1}": {}}, None, [])
    assert [d for d, _ in saved] == [1, 8, 15, 22, 29]  # 7 blocks = 21 s >= 20 x 1 s
    assert saved[0][1] == [0] and saved[1][1] == list(range(1, 8)) and work.pending.keys() == {29}
