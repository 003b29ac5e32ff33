"""The Triton kernels' device layout: `prepare_triton` repacks a checkpoint layer once at load time, and
the @triton.jit helpers here are the only code that reads it (triton_gemv.py and triton_gemm.py call
them). Checkpoint layouts are vllm_gptq_plugin.format's; this is what the GPU keeps instead:

    qweight   int32 [K*b/32, N]   b = 2, 4, 8: the checkpoint layout (value k of column n in word
                                  k // (32/b), bits (k % (32/b)) * b), K in sorted-group order.
                                  b = 3: two planes, same size: rows [0, K/16) hold the low 2 bits
                                  (value k in word k // 16, bits 2*(k % 16)), rows [K/16, 3K/32) the
                                  high bit (value k in word K/16 + k // 32, bit k % 32), so no value
                                  straddles two words
    scales    T     [G, N]        the checkpoint's scales rounded to the activation dtype T
    zeros     int16 [G, N]        the real zero points (v1's +1 folded in), unpacked
    g_idx     int32 [K]           gather mode only (else empty): the group of each K row
    perm      int32 [K]           act-order only (else empty): x[:, perm] matches qweight's rows
    counters  int32 [C]           split-K arrival counters, zero between calls (the last program of
                                  a tile resets its counter), one set per layer

Groups: without act-order, or with act-order on a whole layer, K is (re)ordered so that every run of
`group_size` rows shares one group (GROUP = group_size; -1: one group). Each K tile then lies in one
group, and the kernels factor the group out of the dot product, so that the inner loop sees only
integers (exact in T):  sum_k x[k] * s * (q[k] - z) = s * (sum_k x[k] q[k]) - s * z * (sum_k x[k]).
Gather mode (GROUP = 0) serves any g_idx, e.g. a row-parallel shard of an act-order layer whose g_idx
points into the full scales: it dequantizes each weight with its own row's group.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_gptq_plugin import format as fmt

from . import triton_env  # noqa: F401  (selects the interpreter before `triton` is imported)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@dataclasses.dataclass
class TritonWeights:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor     # empty unless gather mode
    perm: torch.Tensor      # empty unless act-order
    counters: torch.Tensor
    bits: int
    group: int              # the constexpr GROUP: group_size in sorted order, -1 one group, 0 gather
    in_features: int
    out_features: int

    def tensors(self) -> list[torch.Tensor]:
        """The op's tensor arguments, in the order kernels.ops unpacks them."""
        return [self.qweight, self.scales, self.zeros, self.g_idx, self.perm, self.counters]


def _sorted_group_size(g: torch.Tensor, groups: int) -> int:
    """group_size if the (sorted) g_idx is arange(K) // group_size, -1 for one group, 0 otherwise."""
    k = g.shape[0]
    if groups == 1:
        return -1 if bool((g == 0).all()) else 0
    size = k // groups if k % groups == 0 else -(-k // groups)
    want = torch.arange(k, device=g.device, dtype=g.dtype) // size
    return size if torch.equal(g, want) and size % 16 == 0 else 0  # tl.dot tiles K by >= 16


def _planes3(q: torch.Tensor) -> torch.Tensor:
    """3-bit q [K, N] -> the two-plane words [3K/32, N] described above."""
    lo = fmt.pack(q & 3, 2, dim=0)
    k = q.shape[0]  # a multiple of 32 at 3 bits (whole words)
    bits1 = ((q >> 2) & 1).to(torch.int64).view(k // 32, 32, -1)
    hi = (bits1 << torch.arange(32, device=q.device)[None, :, None]).sum(1)
    hi = torch.where(hi >= 1 << 31, hi - (1 << 32), hi).to(torch.int32)
    return torch.cat([lo, hi]).contiguous()


def prepare_triton(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str, dtype: torch.dtype,
                   gather: bool = False) -> TritonWeights:
    """Repack one layer for the Triton kernels. `gather` forces gather mode (tests); act-order layers
    use it on their own only when sorting by g_idx does not give whole groups."""
    device = qweight.device
    k, n, groups = g_idx.shape[0], scales.shape[1], scales.shape[0]
    q = fmt.unpack(qweight, bits, dim=0)                  # [K, N]
    zeros = fmt.unpack(qzeros, bits, dim=1) + fmt.zero_offset(checkpoint_format)
    g = g_idx.to(torch.int64)
    empty = torch.empty(0, dtype=torch.int32, device=device)
    perm, group = empty, 0
    if not gather:
        group = _sorted_group_size(g, groups)
        if not group and not bool((g[1:] >= g[:-1]).all()):  # act-order: sort K by group once
            order = torch.argsort(g, stable=True)
            group = _sorted_group_size(g[order], groups)
            if group:
                q, perm = q[order], order.to(torch.int32)
    gidx = g.to(torch.int32).contiguous() if group == 0 else empty
    packed = _planes3(q) if bits == 3 else fmt.pack(q, bits, dim=0)
    return TritonWeights(packed, scales.to(dtype).contiguous(), zeros.to(torch.int16).contiguous(), gidx,
                         perm.contiguous(), torch.zeros(0, dtype=torch.int32, device=device), bits, group, k, n)


# ---------------------------------------------------------------------------------------------
# Device-side readers of the layout (inlined into both kernels)
# ---------------------------------------------------------------------------------------------

@triton.jit
def load_x(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM: tl.constexpr):
    """x[m, k] for a [BM, BK] tile (x's columns gathered through perm under act-order); T."""
    mask_k = offs_k < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        cols = offs_k
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                   mask=(offs_m < M)[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_last")


@triton.jit
def load_q(qweight_ptr, offs_k, offs_n, K, N, BITS: tl.constexpr):
    """The integer weights q[k, n] of a [BK, BN] tile as int32. Each K row reads the word that holds
    it: a word is loaded by 32/b rows (cache hits) and every row takes its bits by shifting."""
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    cols = offs_n[None, :]
    if BITS == 3:
        lo = tl.load(qweight_ptr + (offs_k // 16)[:, None] * N + cols, mask=mask, other=0,
                     eviction_policy="evict_first")
        hi = tl.load(qweight_ptr + (K // 16 + offs_k // 32)[:, None] * N + cols, mask=mask, other=0,
                     eviction_policy="evict_first")
        q = ((lo >> ((offs_k % 16) * 2)[:, None]) & 3) | (((hi >> (offs_k % 32)[:, None]) & 1) << 2)
    else:
        per_word: tl.constexpr = 32 // BITS
        words = tl.load(qweight_ptr + (offs_k // per_word)[:, None] * N + cols, mask=mask, other=0,
                        eviction_policy="evict_first")
        q = (words >> ((offs_k % per_word) * BITS)[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def load_q_words(qweight_ptr, k0, offs_n, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same tile (2, 4 or 8 bits) as [BLOCK_K / (32/b), 32/b, BN]: q[k0 + r * 32/b + j, n] at
    [r, j, n]. Each word is loaded once and unpacked by 32/b shifts in registers."""
    per_word: tl.constexpr = 32 // BITS
    rows = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < K // per_word)[:, None] & (offs_n < N)[None, :], other=0,
                    eviction_policy="evict_first")
    shifts = tl.arange(0, per_word) * BITS
    return (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)


@triton.jit
def group_scale_offset(scales_ptr, zeros_ptr, g, offs_n, N):
    """fp32 s[g, n] and o[g, n] = -s * z for one group row: W = s * q + o."""
    mask_n = offs_n < N
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    return s, -s * z


@triton.jit
def gather_dequant(q, scales_ptr, zeros_ptr, g_idx_ptr, offs_k, offs_n, K, N):
    """Gather mode: W[k, n] = s[g_k, n] * (q[k, n] - z[g_k, n]) in fp32 for a [BK, BN] tile."""
    mask_k = offs_k < K
    g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
    idx = g[:, None] * N + offs_n[None, :]
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    s = tl.load(scales_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + idx, mask=mask, other=0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def store_out(acc, out_ptr, ws_ptr, counters_ptr, bias_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K,
              USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write a [BM, BN] fp32 tile of y (+ bias) in out's dtype. With USE_SPLIT (SPLIT_K > 1, a runtime
    value so that one compiled kernel serves every split count) each K split stores
    its partial sums in its slab of ws [SPLIT_K, M, N]; the last split of the tile to arrive (counted
    on counters[tile]) adds the slabs in split order (the same sum whatever the arrival order), writes
    y and resets the counter. One launch, no memset, no second pass over y."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    if USE_SPLIT:
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial sums are written before the count goes up
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
