"""The M = 1 GEMV that loads each packed word once (tile kernel "gemvw", 2/4/8-bit layers outside
gather mode): a [BLOCK_K / (32/b), 32/b, BLOCK_N] block of integers is unpacked from a [BLOCK_K / (32/b),
BLOCK_N] load of words by shifts in registers, multiplied by x's matching [rows, 32/b] block and
reduced with tl.sum in fp32. At M = 1 a layer's time is its weight bytes over the memory bandwidth;
this reads each byte once with no duplicate loads (triton_gemm.py's "gemv" loads a word per K row,
cache hits). The tile table picks between them per layer. Layouts: triton_weights.py.
"""
from __future__ import annotations

from . import triton_env  # noqa: F401

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .triton_weights import group_scale_offset, load_q_words, store_out  # noqa: E402


@triton.jit
def gemv_words_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                      counters_ptr, M, N, K, K_PER_SPLIT, SPLIT_K, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_SPLIT: tl.constexpr, DOT: tl.constexpr):  # BLOCK_M = 1, DOT unused: gemm_kernel's signature
    per_word: tl.constexpr = 32 // BITS
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_K // per_word)
    cols = tl.arange(0, per_word)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_k = k0 + rows[:, None] * per_word + cols[None, :]  # [rows, per_word]
        mask_k = offs_k < K
        if HAS_PERM:
            offs_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0, eviction_policy="evict_last").to(tl.float32)
        q = load_q_words(qweight_ptr, k0, offs_n, K, N, BITS, BLOCK_K).to(tl.float32)
        g = 0 if GROUP == -1 else k0 // GROUP
        s, o = group_scale_offset(scales_ptr, zeros_ptr, g, offs_n, N)
        part = tl.sum(tl.sum(x[:, :, None] * q, axis=1), axis=0)
        acc += part * s + tl.sum(tl.sum(x, axis=1), axis=0) * o
    store_out(acc[None, :], out_ptr, ws_ptr, counters_ptr, bias_ptr, tl.arange(0, 1), offs_n, M, N, tile, pid_k,
              SPLIT_K, USE_SPLIT, HAS_BIAS)
