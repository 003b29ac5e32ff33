"""--refine (offline_quant/refine.py): the block-wise scale tuning after GPTQ starts from GPTQ's result, keeps
it unless the block's loss went down (checked here by an independent forward), lowers a loss that a
worse start leaves room for, and writes what the format dequantizes to; the CLI runs it end to end
and refuses settings it cannot honour."""
import contextlib
import json

import pytest
import torch

from vllm_gptq_plugin import cli, format as fmt
from vllm_gptq_plugin.offline_quant import api, refine
from vllm_gptq_plugin.offline_quant.gptq import GPTQ

BITS, GROUP = 3, 32


class MLPBlock(torch.nn.Module):
    """A decoder-like block: two Linears with a nonlinearity between them and a residual."""

    def __init__(self, d=64, h=128):
        super().__init__()
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x, scale=1.0):
        return (x + self.down(torch.nn.functional.silu(self.up(x))) * scale,)


def _setup(seed=0):
    """A block, its fp copy's outputs on 8 inputs (the targets), and GPTQ results for both Linears."""
    torch.manual_seed(seed)
    block, x = MLPBlock(), torch.randn(8, 16, 64)
    with torch.no_grad():
        targets = block(x)[0].clone()
    cfg = fmt.QuantConfig(bits=BITS, group_size=GROUP, desc_act=True, sym=False)
    solved = {}
    with torch.no_grad():
        for name, inp in (("up", x), ("down", torch.nn.functional.silu(block.up(x)))):
            module = getattr(block, name)
            g = GPTQ(module, name)
            g.add_batch(inp)
            r = g.fasterquant(cfg)
            module.weight.copy_(r.Q)
            solved[name] = refine.Solved(module, r.q, r.scales, r.zeros, r.g_idx)
    batches = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    return block, solved, x, targets, batches


def _refine(block, solved, x, targets, batches, iters, lr=None):
    return refine.refine_block(block, solved, x, targets, [{"scale": 1.0}] * len(batches), batches,
                               contextlib.nullcontext, lambda t: t, iters=iters, lr=lr)


def _dequantized(q, zeros, scales, g_idx) -> torch.Tensor:
    """What a checkpoint holding these tensors dequantizes to (format.pack_layer, format.dequantize)."""
    packed = fmt.pack_layer(q, zeros, scales, g_idx, BITS, "gptq")
    return fmt.dequantize(*[packed[k] for k in fmt.QUANT_SUFFIXES], bits=BITS, checkpoint_format="gptq").float()


def _block_loss(block, x, targets, batches) -> float:
    """The mean of each eval batch's MSE, computed here with the block's own weights."""
    with torch.no_grad():
        per = [float((block(x[sl])[0] - targets[sl]).square().mean()) for sl in batches]
    return sum(per) / len(per)


def test_no_steps_keeps_gptq_exactly():
    block, solved, x, targets, batches = _setup()
    before = {n: s.module.weight.clone() for n, s in solved.items()}
    refined, stats = _refine(block, solved, x, targets, batches, iters=1, lr=0.0)
    assert not refined and not stats["kept"] and stats["loss_after"] == stats["loss_before"]
    for n, s in solved.items():
        assert torch.equal(s.module.weight, before[n])


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_result_lowers_the_block_loss_and_is_what_the_format_stores(seed):
    block, solved, x, targets, batches = _setup(seed)
    with torch.no_grad():  # a worse start than GPTQ's: every scale 30% too large
        for s in solved.values():
            s.scales.mul_(1.3)
            s.module.weight.copy_(_dequantized(s.q, s.zeros, s.scales, s.g_idx))
    start = _block_loss(block, x, targets, batches)
    refined, stats = _refine(block, solved, x, targets, batches, iters=64)
    assert stats["kept"] and set(refined) == {"up", "down"}
    assert stats["loss_before"] == pytest.approx(start, rel=1e-5)
    end = _block_loss(block, x, targets, batches)  # the block now holds the refined weights
    assert end == pytest.approx(stats["loss_after"], rel=1e-5) and end < 0.8 * start, (start, end)
    for name, r in refined.items():
        s = solved[name]
        assert torch.equal(r.q, s.q), "the codes are GPTQ's"
        assert torch.equal(r.scales, r.scales.half().float())  # the checkpoint stores fp16 scales
        Q = _dequantized(r.q, s.zeros, r.scales, s.g_idx)
        assert torch.equal(Q, s.module.weight), "the block must hold what the checkpoint dequantizes to"


def test_cli_refine_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--bits", "3", "--group-size", "64",
                     "--nsamples", "8", "--seqlen", "64", "--threads", "1", "--no-progress", "--refine",
                     "--refine-iters", "8"]) == 0
    summary = fmt.validate(out)
    assert fmt.read_quant_config(out).meta["refine"] == {"iters": 8}
    rows = json.loads((out / "quant_report.json").read_text())["layers"]
    assert len(rows) == len(summary["layers"]) and all("refine" in r for r in rows)
    for r in rows:
        ref = r["refine"]
        assert ref["kept"] == (ref["loss_after"] < ref["loss_before"])
    assert "refine:" in capsys.readouterr().out
    assert api.load(out) is not None


@pytest.mark.parametrize("flags, message", [
    (["--refine", "--no-fp-targets"], "drop --no-fp-targets, or --refine"),
    (["--refine-iters", "4"], "needs --refine"),
    (["--refine", "--refine-iters", "0"], "needs --refine and a count >= 1"),
])
def test_cli_refuses_refine_settings_it_cannot_honour(tiny_llama, tmp_path, capsys, flags, message):
    assert cli.main(["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "q"), "--nsamples", "4",
                     "--seqlen", "32", "--no-progress", *flags]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_refined_run_resumes_to_the_same_checkpoint(tiny_llama, tmp_path, monkeypatch):
    """Refined blocks are saved with the resume state: a run killed after block 0 and rerun writes
    the bytes an uninterrupted run writes."""
    from vllm_gptq_plugin.offline_quant.resume import WorkState
    cfg = api.QuantConfig(bits=4, group_size=64, desc_act=True, sym=False,
                          meta={"fp_targets": True, "mse": True, "refine": {"iters": 4}})
    run = dict(nsamples=8, seqlen=64, threads=1, progress=False)
    whole = api.quantize(tiny_llama, tmp_path / "whole", cfg, **run)

    class Crash(Exception):
        pass
    save = WorkState.save

    def save_then_crash(self, done, *args):
        save(self, done, *args)
        if done == 1:
            raise Crash
    with monkeypatch.context() as m:
        m.setattr(WorkState, "save", save_then_crash)
        with pytest.raises(Crash):
            api.quantize(tiny_llama, tmp_path / "resumed", cfg, **run)
    resumed = api.quantize(tiny_llama, tmp_path / "resumed", cfg, **run)
    assert (resumed / fmt.WEIGHTS_FILE).read_bytes() == (whole / fmt.WEIGHTS_FILE).read_bytes()
    rows = json.loads((whole / "quant_report.json").read_text())["layers"]
    assert any(r["refine"]["kept"] for r in rows), "the test must exercise refined blocks"
