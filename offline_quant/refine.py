"""Block-wise refinement after GPTQ (`--refine`): each decoder block's group scales tuned against the fp
block's outputs, then packed into the same qweight / qzeros / scales.

GPTQ fits one Linear at a time to a quadratic model of its own output error; the block's nonlinear
parts (softmax, SiLU gating, the norms) and the way its Linears' errors combine are not in that
model. This pass looks at what the block finally computes (block-wise reconstruction, as in AutoRound,
Cheng et al. 2023, and OmniQuant's learnable weight clipping). For every Linear of the block:

    Q = s * (1 + a) * (q - zero)

q and zero are GPTQ's integer codes and zero points (the format stores both as integers), s its group
scales, a one factor per group and output row, starting at 0, so the start is exactly GPTQ's result.
Adam moves a to lower the mean squared error between the block's output on the quantized model's
inputs and the fp block's output on the fp model's inputs, one calibration batch per step. At the end
the block's loss on a fixed set of batches is compared with GPTQ's, and the block keeps GPTQ's result
unless refinement lowered it.

Why scales and not the rounding choices: moving the codes themselves by signed gradient descent
(AutoRound's V, tried from GPTQ's codes and from the weights GPTQ rounded) raised the block loss of
SmolLM2's blocks 0-3 by 4-315% (steps large enough to flip codes) or left every code as it was: GPTQ's
later columns compensate for each code it chose, so a code flipped alone undoes that compensation.

Memory: a and its Adam state (3 x the scales), the block's dequantized weights once more, and the
autograd activations of one batch. The activations are the ones the driver holds anyway.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_ITERS = 32  # steps per block, one batch each (SmolLM2 blocks 3-5: 4.2-4.9% lower block loss)
DEFAULT_LR = 1e-2   # Adam's step on a (SmolLM2 blocks: 1e-3 and 3e-3 gained less in 32 steps)
EVAL_BATCHES = 4    # batches the before/after comparison is made on
SCALE_RANGE = 0.5   # |a| bound: a group's scale moves by at most half of itself


@dataclasses.dataclass
class Solved:
    """One Linear's GPTQ result, what refinement starts from (all on the compute device)."""
    module: torch.nn.Linear
    q: torch.Tensor       # [N, K] int32, GPTQ's codes
    scales: torch.Tensor  # [G, N] fp32
    zeros: torch.Tensor   # [G, N] int32
    g_idx: torch.Tensor   # [K] int32


@dataclasses.dataclass
class Refined:
    q: torch.Tensor       # [N, K] int32
    scales: torch.Tensor  # [G, N] fp32, fp16-representable
    Q: torch.Tensor       # [N, K] fp32, the dequantized weights
    stats: dict[str, Any]


class _Scales:
    """The tunable scales of one Linear: a, and Q(a) from GPTQ's fixed levels."""

    def __init__(self, s: Solved):
        self.s = s
        self.g = s.g_idx.long()
        self.levels = (s.q - s.zeros[self.g].t()).float()  # [N, K]: q - zero, GPTQ's choice
        self.a = torch.zeros_like(s.scales, requires_grad=True)

    def scales(self) -> torch.Tensor:
        return self.s.scales * (1 + self.a)

    def weight(self) -> torch.Tensor:
        return self.levels * self.scales()[self.g].t()

    @torch.no_grad()
    def result(self) -> Refined:
        scales = self.scales().to(torch.float16).float()  # what the checkpoint stores
        moved = float(((scales - self.s.scales).abs() / self.s.scales.clamp(min=1e-12)).mean())
        return Refined(self.s.q, scales, self.levels * scales[self.g].t(), {"scale_change": moved})


def refine_block(block: torch.nn.Module, solved: dict[str, Solved], inputs: torch.Tensor, targets: torch.Tensor,
                 kwargs: list[dict[str, Any]], batches: list[slice], autocast, fetch, iters: int = DEFAULT_ITERS,
                 lr: float | None = None, seed: int = 0) -> tuple[dict[str, Refined], dict[str, Any]]:
    """Tune the scales of `solved` (member name in `block` -> its GPTQ result) so that block(inputs)
    comes closer to targets (the fp block's outputs); batches[b] of both runs with kwargs[b].

    fetch: moves an activation slice to the compute device; autocast: the context blocks run in.
    Returns ({member: Refined}, empty unless refinement lowered the loss; the block's stats). The
    block's Linears are left holding the weights of the result kept.
    """
    t0 = time.perf_counter()
    tuned = {m: _Scales(s) for m, s in solved.items()}
    params = [t.a for t in tuned.values()]
    opt = torch.optim.Adam(params, lr=DEFAULT_LR if lr is None else lr)
    frozen = [p for p in block.parameters() if p.requires_grad]  # only a needs gradients
    for p in frozen:
        p.requires_grad_(False)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    evals = order[:EVAL_BATCHES]

    def loss_on(b: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        sl = batches[b]
        with autocast():
            out = torch.func.functional_call(block, weights, (fetch(inputs[sl]),), kwargs[b])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return (out.float() - fetch(targets[sl])).square().mean()

    def eval_loss(weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(float(loss_on(b, weights)) for b in evals) / len(evals)

    try:
        before = eval_loss({})  # GPTQ's result, as the block's Linears hold it
        with torch.enable_grad():
            for it in range(iters):
                loss = loss_on(order[it % len(order)], {f"{m}.weight": t.weight() for m, t in tuned.items()})
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=params)
                opt.step()
                with torch.no_grad():
                    for a in params:
                        a.clamp_(-SCALE_RANGE, SCALE_RANGE)
        results = {m: t.result() for m, t in tuned.items()}  # fp16 scales, as the checkpoint will hold them
        after = eval_loss({f"{m}.weight": r.Q.to(solved[m].module.weight.dtype) for m, r in results.items()})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after < before
    stats = {"loss_before": before, "loss_after": after, "kept": kept, "iters": iters,
             "seconds": time.perf_counter() - t0}
    if not kept:
        results = {}
    for m, r in results.items():
        solved[m].module.weight.data.copy_(r.Q.to(solved[m].module.weight.dtype))
    log.info("refine: block loss %.4g -> %.4g (%s)", before, after, "kept" if kept else "GPTQ kept")
    return results, stats
