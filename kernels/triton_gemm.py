"""Triton dequant-GEMM for GPTQ weights: Y[M, N] = X[M, K] @ dequant(W)^T (+ bias), fp32 accumulation.

Tensors the kernel reads (T = activation dtype: fp16, bf16 or fp32; b = bits in {2, 3, 4, 8}):

    x        T      [M, K]           row-major, rows may be strided (stride_xm), columns contiguous
    qweight  int32  [K * b / 32, N]  the checkpoint layout (K rows sorted by group in act-order's
                                     "permute" mode): values packed along K as one little-endian bit
                                     stream per column; for b = 3, values 10 and 21 of every 32
                                     straddle two words and are read from both
    zeros    int16  [G, N]           repacked once by `prepare_triton`: the REAL zero points (v1's +1
                                     folded in), unpacked so that 3-bit and 8-bit need no special case
    scales   fp16/bf16/fp32 [G, N]   as in the checkpoint; converted to fp32 inside the kernel
    g_idx    int32  [K]              group of input channel k; only read when GATHER_GROUPS (g_idx not
                                     k // group_size), so a row-parallel shard may point into more
                                     groups G than K / group_size
    out      fp32   [SPLIT_K, M, N]  partial sums, one slab per K split, summed on the host

W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n]) with g = g_idx[k], computed in fp32 and rounded to T
before the dot (what vllm_gptq_plugin.format.dequantize does). Without act-order the group is one
scalar per K tile, because BLOCK_K is clamped to divide group_size (in `_clamp_block_k`, the one place
that does it). Act-order has two modes, chosen at prepare time:
  "permute" (default where possible): qweight's K rows are sorted by group once (repacked, same size)
            and X's columns are permuted per call (perm int64 [K]); the kernel then runs as without
            act-order. Possible when the sorted g_idx is k // group_size (a whole act-order layer).
  "gather": scales/zeros are gathered per K row inside the kernel; serves any g_idx, e.g. a
            row-parallel TP shard whose g_idx points into the full scales.

Under no GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 must be set before `triton`
defines kernels, so this module sets it when torch sees no CUDA/ROCm device). The interpreter computes
bf16 wrongly: test fp16/fp32 there.
"""
from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():  # must precede `import triton`: jit decorators read it at definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (vllm.triton_utils is a CPU placeholder; use triton itself)
import triton.language as tl  # noqa: E402

from vllm_gptq_plugin import format as fmt  # noqa: E402


@triton.jit
def _gptq_gemm_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
                      M, N, K, K_PER_SPLIT, stride_xm,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GATHER_GROUPS: tl.constexpr,
                      FP32_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # the last split may be short: no tile past K
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bit = offs_k * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        w_mask = mask_k[:, None] & mask_n[None, :]
        w_ptrs = qweight_ptr + word[:, None] * N + offs_n[None, :]
        words = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        q = words >> shift[:, None]
        if BITS == 3:  # values straddling a word boundary take their high bits from the next word
            spill = (shift + BITS) > 32
            hi = tl.load(w_ptrs + N, mask=w_mask & spill[:, None], other=0).to(tl.uint32, bitcast=True)
            q = q | (hi << ((32 - shift) % 32)[:, None])
        q = (q & ((1 << BITS) - 1)).to(tl.float32)
        if GATHER_GROUPS:  # act-order, "gather" mode: each K row names its group
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            gs_mask = mask_k[:, None] & mask_n[None, :]
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=gs_mask, other=0.0)
            z = tl.load(zeros_ptr + g[:, None] * N + offs_n[None, :], mask=gs_mask, other=0)
            w = (q - z.to(tl.float32)) * s.to(tl.float32)
        else:
            g = k0 // GROUP_SIZE
            s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            z = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0)
            w = (q - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        w = w.to(x.dtype)
        if FP32_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out_ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@dataclasses.dataclass
class TritonWeights:
    """Weights repacked once for `triton_gemm` (layouts in the module docstring)."""
    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int   # K tile that shares one row of scales; 0 for the "gather" act-order mode
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # "permute" act-order mode: x[:, perm] matches qweight's rows


def _contiguous_group_size(g_idx: torch.Tensor, groups: int) -> int:
    """group_size if g_idx == arange(K) // group_size (no act-order), else 0."""
    k = g_idx.shape[0]
    size = k if groups == 1 else k // groups
    if size == 0 or (groups > 1 and k % groups):
        return 0
    trivial = torch.arange(k, device=g_idx.device, dtype=g_idx.dtype) // size
    return size if torch.equal(g_idx, trivial) else 0


ACT_ORDER_MODES = ("permute", "gather")


def prepare_triton(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str,
                   act_order_mode: str = "permute") -> TritonWeights:
    if act_order_mode not in ACT_ORDER_MODES:
        raise ValueError(f"act_order_mode must be one of {ACT_ORDER_MODES}, got {act_order_mode!r}")
    zeros = fmt.unpack(qzeros, bits, dim=1) + fmt.zero_offset(checkpoint_format)
    groups = scales.shape[0]
    group_size = _contiguous_group_size(g_idx, groups)
    perm = None
    if not group_size and act_order_mode == "permute":
        order = torch.argsort(g_idx.to(torch.int64), stable=True)
        sorted_size = _contiguous_group_size(g_idx[order].contiguous(), groups)
        if sorted_size % 16 == 0 and sorted_size:
            qweight = fmt.pack(fmt.unpack(qweight, bits, dim=0)[order], bits, dim=0)
            g_idx, perm, group_size = g_idx[order], order, sorted_size
    if group_size % 16:  # tl.dot needs BLOCK_K >= 16 dividing the group; gather instead
        group_size = 0
    return TritonWeights(qweight.contiguous(), zeros.to(torch.int16).contiguous(), scales.contiguous(),
                         g_idx.to(torch.int32).contiguous(), bits, group_size,
                         g_idx.shape[0], scales.shape[1], perm)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep it quick


def pick_config(m: int, n: int, k: int, num_sms: int) -> TileConfig:
    """The tile-config table: decode (M <= 16) is weight-bandwidth bound, so narrow M tiles and split-K
    until ~2 waves of programs cover the GPU (keeping >= 4 K steps per split); prefill uses larger
    tiles and no split."""
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 32, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 64, 128, 32, 4, 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    if m <= 64:
        split = max(1, min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(k, bk) // 4, 16))
    return TileConfig(bm, bn, bk, split, warps, stages)


def _clamp_block_k(block_k: int, group_size: int) -> int:
    """The one place block sizes meet the group size: a K tile must not straddle two groups."""
    if group_size == 0:
        return block_k
    while group_size % block_k:
        block_k //= 2
    assert block_k >= 16, "prepare_triton routes group sizes that are not multiples of 16 to act-order"
    return block_k


def triton_gemm(x: torch.Tensor, w: TritonWeights, bias: torch.Tensor | None = None,
                config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) -> [..., N] in x's dtype."""
    k, n = w.in_features, w.out_features
    assert x.shape[-1] == k, f"x [..., {x.shape[-1]}] does not match K={k}"
    x2 = x.reshape(-1, k)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = config or pick_config(m, n, k, _num_sms(x.device))
    block_k = _clamp_block_k(cfg.block_k, w.group_size)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    _gptq_gemm_kernel[grid](
        x2, w.qweight, w.zeros, w.scales, w.g_idx, out, m, n, k, k_per_split, x2.stride(0),
        BITS=w.bits, GROUP_SIZE=max(w.group_size, 1), GATHER_GROUPS=w.group_size == 0,
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = out.sum(0) if split_k > 1 else out[0]
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
