"""The uniform quantization grid shared by RTN and GPTQ: per-row (per output channel, per group)
scale and zero point from the min/max of the weights (or a clipped range that minimises the error),
as in the GPTQ paper's Quantizer.

Conventions (docs/FORMAT.md): q = clamp(round(w / scale) + zero, 0, maxq), w' = scale * (q - zero),
maxq = 2^bits - 1. Symmetric grids use zero = 2^(bits-1) (so q=0 is the most negative level).
"""
from __future__ import annotations

import torch

MSE_CHUNK = 1 << 18  # elements of candidate errors computed at once by the MSE search


def find_params(W: torch.Tensor, bits: int, sym: bool, zero_min: int = 0, *, mse: bool = False,
                norm: float = 2.4, grid: int = 100, maxshrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of W [rows, cols] -> (scale [rows], zero [rows]) in fp32.

    Min-max by default. mse=True is the GPTQ repo's Quantizer(mse=True) search: shrink the min-max range
    by p = 1 - i/grid for i = 0..maxshrink*grid and keep, per row, the p whose grid gives the lowest
    sum |w - w'|^norm (clipping a few outliers buys a finer step for all the other weights). The
    reference searches down to p = 0.2 (maxshrink=0.8); 0.8 is the default here, where 4-bit optima lie.
    zero_min=1 keeps asymmetric zero points storable in the v1 format (which stores zero - 1).
    """
    maxq = 2 ** bits - 1
    W = W.float()
    xmin = W.min(dim=1).values.clamp(max=0)
    xmax = W.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)  # all-zero rows: any positive scale represents them exactly
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale, zero = _range_to_grid(xmin, xmax, maxq, sym, zero_min)
    if mse:  # all shrink factors at once: [S, rows] candidates, one pass over W per op
        p = torch.tensor([1 - i / grid for i in range(int(round(maxshrink * grid)) + 1)], dtype=W.dtype,
                         device=W.device)[:, None]
        scales, zeros = _range_to_grid(p * xmin, p * xmax, maxq, sym, zero_min)
        rows = max(1, MSE_CHUNK // (p.numel() * W.shape[1]))  # bounded memory for long rows (lm_head)
        err = torch.cat([_clip_error(W[r:r + rows], scales[:, r:r + rows], zeros[:, r:r + rows], maxq, norm)
                         for r in range(0, W.shape[0], rows)], dim=1)
        best = err.argmin(dim=0, keepdim=True)  # the first minimum: on a tie the wider range stays
        scale, zero = scales.gather(0, best)[0], zeros.gather(0, best)[0]
    return scale, zero


def _range_to_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool,
                   zero_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the grid spanning [xmin, xmax] (xmin <= 0 <= xmax, not both 0) per row."""
    if sym:
        # Levels run from -2^(b-1) to 2^(b-1)-1 in units of scale; the range is set by |w|max.
        scale = fp16_ceil(2 * xmax / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = fp16_ceil((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale)
        if zero_min:
            # zero was 0 where all weights are >= 0: shift it up and widen the step to keep xmax.
            low = zero < zero_min
            scale = torch.where(low, fp16_ceil(xmax / (maxq - zero_min)), scale)
            zero = zero.clamp(min=zero_min)
    return scale, zero


def _clip_error(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                norm: float) -> torch.Tensor:
    """sum over each row of |W - dequantize(quantize(W))|^norm: W [rows, cols], scale and zero
    [..., rows] -> [..., rows]."""
    s, z = scale[..., None], zero[..., None]
    err = torch.div(W, s).round_().add_(z).clamp_(0, maxq)
    err.sub_(z).mul_(s).sub_(W).abs_().pow_(norm)
    return err.sum(dim=-1)


def fp16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored as fp16: round up to an fp16 value so the stored grid still spans the range."""
    s16 = scale.clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, torch.inf))
    return torch.where(s16.float() < scale, up, s16).float()


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels of W [rows, cols] (or [rows]) with per-row scale/zero -> same shape, int32."""
    s, z = (scale, zero) if W.dim() == 1 else (scale[:, None], zero[:, None])
    return torch.clamp(torch.round(W.float() / s) + z, 0, 2 ** bits - 1).to(torch.int32)


def dequantize(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s, z = (scale, zero) if Q.dim() == 1 else (scale[:, None], zero[:, None])
    return s * (Q.float() - z)

