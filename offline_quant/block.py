"""Quantizing one decoder block, group by group: each group's Hessians from the block's forward over
the calibration set (summed over the ranks of a distributed run), the GPTQ solve of each member, its
dequantized weights written back so that later groups see them (quantize_group); then the quantized
block run to give the next block's inputs (run_block)."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import checkpoint, report as rpt
from vllm_gptq_plugin.offline_quant.calibration import Calibration
from vllm_gptq_plugin.offline_quant.devices import Placement
from vllm_gptq_plugin.offline_quant.distributed import World
from vllm_gptq_plugin.offline_quant.gptq import GPTQ
from vllm_gptq_plugin.offline_quant.memo import ChildMemo, use_memo
from vllm_gptq_plugin.offline_quant.refine import Solved
from vllm_gptq_plugin.offline_quant.tracing import block_output, inputs_of


@torch.no_grad()
def quantize_group(block, members: list[str], layers: dict[str, tuple[torch.nn.Linear, fmt.QuantConfig, str]],
                   acts: torch.Tensor, kwargs: list[dict[str, Any]], batches: list[slice],
                   cfg: fmt.QuantConfig, block_index: int, progress: Callable[[str], None], calib: Calibration,
                   fp_block=None, last: bool = False, memos: tuple[ChildMemo, ChildMemo | None] | None = None,
                   done: int = 0, place: Placement = Placement(), world: World = World(),
                   keep: dict[str, Solved] | None = None):
    """Hessians of `members` from the block's forward over the calibration set, then GPTQ each.

    acts[0] holds the block's inputs in the quantized model; with fp targets (fp_block: the block's
    fp copy), acts[1] holds them in the fp model, and each Linear is fit to its fp outputs; the
    block's `last` group also advances acts[1] to the fp block's outputs.
    Members reading the same input share one Hessian (accumulated once, copied). The forwards stop
    before the last member runs: nothing after it is needed. memos: the quantized and fp blocks'
    ChildMemos; done: how many of the block's groups are quantized already; place: where the block
    runs and the activations live; world: the ranks, which sum their Hessians (rank 0 solves);
    keep: where each member's GPTQ result goes for refine.refine_block (with --refine).
    """
    gptq = {m: GPTQ(layers[m][0], layers[m][2]) for m in members}
    alias: dict[str, str] = {}
    qmemo, fpmemo = memos or (None, None)
    computable = qmemo.computable(members, done) if qmemo is not None else {}
    kept: dict[str, torch.Tensor] = {}  # the inputs of the members in `computable`, all batches
    for b, sl in enumerate(batches):
        limit = acts[0][sl].numel() * acts.element_size()
        with use_memo(qmemo, b, done, members, limit):
            xs = inputs_of(block, members, place.fetch(acts[0][sl]), kwargs[b], calib.autocast)
        targets = {}
        if fp_block is not None:
            # The fp block never changes: where a later pass can reuse the output of the child holding
            # the last member, this pass runs on to that child's end to record it (stop_after); the
            # last pass runs to the end and moves the fp path on to the next block's inputs.
            with use_memo(fpmemo, b, done, members, 0 if last else limit):
                targets = inputs_of(fp_block, members, place.fetch(acts[1][sl]), kwargs[b], calib.autocast,
                                    out=acts[1][sl] if last else None,
                                    stop_after=fpmemo.stop_after(members, done) if fpmemo else None)
            assert set(targets) == set(members), f"the fp block's pass missed {set(members) - set(targets)}"
        for m in computable:
            if m not in kept:
                kept[m] = place.buffer((acts.shape[1],) + xs[m].shape[1:], xs[m].dtype)
            kept[m][sl] = xs[m]
        with calib.hessian_gemms():
            for i, m in enumerate(members):
                src = next((s for s in members[:i] if xs[s] is xs[m]), None)
                if src is None:
                    gptq[m].add_batch(xs[m], targets.get(m))
                else:
                    alias[m] = src
        del xs, targets
    for m in members:
        if m not in alias:
            world.merge_hessians(gptq[m], f"summing the Hessian of {layers[m][2]}")
    for m, src in alias.items():
        gptq[m].H = gptq[src].H.clone()
        gptq[m].C = None if gptq[src].C is None else gptq[src].C.clone()
        gptq[m].nsamples = gptq[src].nsamples
    packed, rows = {}, []
    for m in members:
        module, lcfg, full = layers[m]
        if world.leader:  # rank 0 solves; the others receive the result
            progress(full)
            packed[full], row, result = _solve(gptq[m], module, lcfg, cfg.checkpoint_format, block_index)
            rows.append(row)
            if keep is not None:
                keep[m] = Solved(module, result.q, result.scales, result.zeros, result.g_idx)
        gptq[m].free()
        world.broadcast_(module.weight.data, f"sending the quantized weights of {full}")
        if m in kept:  # the child's output in every later pass
            qmemo.fill(computable[m], kept.pop(m), module, calib.autocast)
    return packed, rows


def _solve(gptq: GPTQ, module: torch.nn.Linear, lcfg: fmt.QuantConfig, checkpoint_format: str,
           block_index: int):
    """GPTQ of one Linear from its accumulated H: its weight becomes the dequantized Q; returns its
    packed tensors, report row and the GPTQResult."""
    t0 = time.perf_counter()
    # fasterquant sets dead columns' diagonal to 1 in H; SQNR needs the raw H (a vector kept, not a copy)
    diag = gptq.H.diagonal().clone()
    result = gptq.fasterquant(lcfg)
    gptq.H.diagonal().copy_(diag)
    # SQNR against what the solve quantized: the fp-target weights W' when there are some
    W = gptq.target if gptq.target is not None else module.weight.detach().float().clone()
    module.weight.copy_(result.Q.to(module.weight.dtype))
    packed = checkpoint.pack_linear(module, result.q, result.zeros, result.scales, result.g_idx, lcfg,
                                    checkpoint_format)
    seconds = time.perf_counter() - t0
    return packed, rpt.row(gptq.name, block_index, lcfg, result.stats, rpt.output_sqnr_db(W, result.Q, gptq.H),
                           seconds), result


@torch.no_grad()
def run_block(block, inps: torch.Tensor, kwargs: list[dict[str, Any]], batches: list[slice], autocast,
              memo: ChildMemo | None = None, done: int = 0, place: Placement = Placement()) -> None:
    """inps <- block(inps), batch by batch in place: only one activation buffer is ever live."""
    for b, sl in enumerate(batches):
        with use_memo(memo, b, done, (), 0), autocast():
            inps[sl] = block_output(block(place.fetch(inps[sl]), **kwargs[b]))
