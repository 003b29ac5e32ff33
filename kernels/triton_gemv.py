"""Decode regime (M of a few rows): a GEMV on the CUDA cores, y[m, n] = sum_k x[m, k] W[n, k].

At M <= ~2 the tensor cores have nothing to do and a layer's time is its weight bytes over the memory
bandwidth: every program streams a [BLOCK_K, BLOCK_N] tile of packed weights per step (evict_first:
they are read once per call), multiplies it by the BLOCK_M rows of x it holds (evict_last: every
program reads them) and reduces over K with tl.sum. K is split SPLIT_K ways so that small layers still
fill every SM; the splits meet in triton_weights.store_out. Layouts: triton_weights.py.

Two ways to read the weights, chosen per layer and M by the tile table: `gemv_kernel` gives every K
row of a tile its own load of the word that holds it (the words are cache hits; any BLOCK_M, every
bit width and gather mode), `gemv_words_kernel` (M = 1, 2/4/8 bits) loads each word once and unpacks
it by shifts into a [rows, values per word, BLOCK_N] block.
"""
from __future__ import annotations

from . import triton_env  # noqa: F401

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .triton_weights import (  # noqa: E402
    gather_dequant, group_scale_offset, load_q, load_q_words, load_x, store_out)


@triton.jit
def gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                counters_ptr, M, N, K, K_PER_SPLIT, SPLIT_K, stride_xm,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM).to(tl.float32)
        q = load_q(qweight_ptr, offs_k, offs_n, K, N, BITS)
        if GROUP == 0:
            w = gather_dequant(q, scales_ptr, zeros_ptr, g_idx_ptr, offs_k, offs_n, K, N)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        else:
            # The tile lies in one group (BLOCK_K divides GROUP): integers inside, the group outside.
            g = 0 if GROUP == -1 else k0 // GROUP
            s, o = group_scale_offset(scales_ptr, zeros_ptr, g, offs_n, N)
            part = tl.sum(x[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
            acc += part * s[None, :] + tl.sum(x, axis=1)[:, None] * o[None, :]
    store_out(acc, out_ptr, ws_ptr, counters_ptr, bias_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K,
              USE_SPLIT, HAS_BIAS)


@triton.jit
def gemv_words_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                      counters_ptr, M, N, K, K_PER_SPLIT, SPLIT_K, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_SPLIT: tl.constexpr):
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
