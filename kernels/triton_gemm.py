"""The tiled dequant-GEMM, Y = X @ W^T: each program owns a [BLOCK_M, BLOCK_N] tile of y and walks its
share of K in BLOCK_K steps, in one of two regimes (the constexpr DOT, from the tile table's kernel
name):

    "gemm" (DOT)      tensor cores: x's tile and the weight tile, unpacked in registers to integers
                      (exact in fp16/bf16), meet in tl.dot with fp32 accumulation; batches and prefill
    "gemv" (not DOT)  CUDA cores: x[:, :, None] * q[None] reduced over K with tl.sum in fp32; decode,
                      where a layer's time is its weight bytes over the memory bandwidth and the
                      tensor cores would idle on padding

Either way the weight tile streams in once per call (evict_first), x's rows stay cached (evict_last,
every program reads them), every K row of the tile loads the word that holds it (cache hits: one
load per row keeps the tile 2-D for tl.dot), and the group's scale and offset are applied to the
tile's partial sums (triton_weights.py explains the factoring), so the dequant is a shift and a mask
per weight. K is split SPLIT_K ways so that small layers still fill the SMs; the splits meet in
triton_weights.store_out. The M = 1 GEMV that loads each word once is triton_gemv.py.
"""
from __future__ import annotations

from . import triton_env  # noqa: F401

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .triton_weights import gather_dequant, group_scale_offset, load_q, load_x, store_out  # noqa: E402


@triton.jit
def gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                counters_ptr, M, N, K, K_PER_SPLIT, SPLIT_K, stride_xm,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr,
                DOT: tl.constexpr):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM)
        q = load_q(qweight_ptr, offs_k, offs_n, K, N, BITS)
        if GROUP == 0:  # gather mode: every K row its own group, dequantized per weight
            w = gather_dequant(q, scales_ptr, zeros_ptr, g_idx_ptr, offs_k, offs_n, K, N)
            acc += _tile_product(x, w, BLOCK_M, BLOCK_N, DOT)
        else:  # the tile lies in one group (BLOCK_K divides GROUP): integers inside, the group outside
            g = 0 if GROUP == -1 else k0 // GROUP
            s, o = group_scale_offset(scales_ptr, zeros_ptr, g, offs_n, N)
            part = _tile_product(x, q, BLOCK_M, BLOCK_N, DOT)
            acc += part * s[None, :] + tl.sum(x.to(tl.float32), axis=1)[:, None] * o[None, :]
    store_out(acc, out_ptr, ws_ptr, counters_ptr, bias_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K,
              USE_SPLIT, HAS_BIAS)


@triton.jit
def _tile_product(x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """x [BM, BK] (T) @ w [BK, BN] (integers or fp32 weights) in fp32."""
    if DOT:
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if x.dtype == tl.float32:  # fp32 models: full precision, not TF32
            return tl.dot(x, w.to(x.dtype), zero, input_precision="ieee")
        return tl.dot(x, w.to(x.dtype), zero)
    return tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
