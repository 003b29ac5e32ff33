"""CPU dequant-GEMM paths: torch's int4pack kernel, the fused bf16 kernel, tile dequant + dense GEMM.

fused (bf16 on AVX512-BF16, cpu_ext's cpu_gemm_bf16.cpp): reads the 4- or 8-bit weights directly, one
pass, for any M. `segments` int64 [S, 3] lists (k0, k1, group row) runs of the sorted K, split to <=
FUSED_MAX_SEG; a layer whose group runs have odd bounds (ragged TP shards) has none and uses tiles.
tiles (fp16/fp32, or no compiled kernel): W^T is dequantized in column tiles of ~WT_TILE_BYTES by
cpu_ext (torch ops when it cannot be built), each tile feeding one dense GEMM.

int4pack (bits 2, 3 and 4: 2- and 3-bit values fit a 4-bit container, at 4-bit memory):
    packed             uint8 [N, K/2]       torch._convert_weight_to_int4pack_for_cpu's layout, which
                                            depends on the ISA torch runs with: blocks of B output
                                            channels, byte (k * B/2 + c) of block b holds q of channel
                                            b*B + c (low nibble) and b*B + B/2 + c (high nibble), with
                                            B = int4pack_block_n(): 64 under AVX-512, 32 under AVX2
    scales_and_zeros   T     [K/gs, N, 2]   int4pack's convention, checked by test: W = (q - 8) * s + zf,
                                            so zf = (8 - zero) * s (asym zeros and v1's +1 folded in)
    perm               int64 [K] or None    act-order: K sorted by group once at prepare time, so every
                                            gs-run of K shares one group; x is permuted per call to match
    gs = the largest of 256/128/64/32 such that each gs-run of the (permuted) K lies in one group.

dequant (8-bit, and layers int4pack cannot take: N % 64 != 0, or groups that do not tile K in runs of 32):
    q       uint8 [K, N]   unpacked integer weights (K permuted by `perm` under act-order), or, when
                           `segments` is set (fused), [N/64, K, 64]: each 64-channel block's rows
                           contiguous, so the kernel streams them
    zeros   T [G, N], scales T [G, N], g_idx int64 [K] (permuted)

T is the dtype given to prepare; activations of another dtype are cast to T for the GEMM and back.
No dense copy of W is kept: dequantized tiles live for one GEMM.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from vllm_gptq_plugin import format as fmt

from . import cpu_ext

INT4PACK_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4PACK_BLOCK_N = 64  # N must be a multiple of this (both of torch's block sizes divide it)
WT_TILE_BYTES = 2 << 20  # a W^T column tile per GEMM: fits L2/L3 next to its GEMM's operands
FUSED_MAX_SEG = 256  # cpu_gemm_bf16.cpp's kMaxSeg: one segment's unpacked panel stays in L1


@dataclasses.dataclass
class Int4PackWeights:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None
    in_features: int
    out_features: int
    dtype: torch.dtype
    segments: torch.Tensor | None = None  # set when the fused kernel serves this layer

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """(weights, meta) of kernels.ops.gemm for this layout."""
        from .ops import INT4PACK
        return ([self.packed, self.scales_and_zeros, _or_empty(self.perm), _or_empty(self.segments)],
                [INT4PACK, self.in_features, self.out_features, self.group_size])

    @classmethod
    def from_op(cls, weights: list[torch.Tensor], meta: list[int]) -> "Int4PackWeights":
        packed, sz, perm, segments = weights
        return cls(packed, sz, meta[3], _or_none(perm), meta[1], meta[2], sz.dtype, _or_none(segments))


@dataclasses.dataclass
class DequantWeights:
    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    in_features: int
    out_features: int
    dtype: torch.dtype
    segments: torch.Tensor | None = None  # set when the fused kernel serves this layer (q blocked)

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        from .ops import DEQUANT
        return ([self.q, self.zeros, self.scales, self.g_idx, _or_empty(self.perm), _or_empty(self.segments)],
                [DEQUANT, self.in_features, self.out_features])

    @classmethod
    def from_op(cls, weights: list[torch.Tensor]) -> "DequantWeights":
        q, zeros, scales, g_idx, perm, segments = weights
        k = g_idx.shape[0]
        return cls(q, zeros, scales, g_idx, _or_none(perm), k, scales.shape[1], scales.dtype, _or_none(segments))


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64) if t is None else t


def _or_none(t: torch.Tensor) -> torch.Tensor | None:
    return t if t.numel() else None


def paths(w: Int4PackWeights | DequantWeights) -> tuple[str, ...]:
    """The CPU kernels that can serve this layer's layout (cpu_dispatch.PATHS order)."""
    if isinstance(w, Int4PackWeights):
        return ("fused", "int4pack", "tiles") if w.segments is not None else ("int4pack", "tiles")
    return ("fused",) if w.segments is not None else ("tiles",)  # the fused layout blocks q


def path(w: Int4PackWeights | DequantWeights, m: int) -> str:
    """Which CPU kernel serves M rows: "fused" | "int4pack" | "tiles", as cpu_dispatch chooses (a table
    measured on this machine, else its default rule)."""
    from . import cpu_dispatch
    return cpu_dispatch.path(paths(w), w.dtype, w.in_features, w.out_features, m)


@functools.cache
def int4pack_block_n() -> int:
    """B of torch's int4pack layout in this process, read off a packed probe (torch picks it from the
    CPU's ISA: 64 with AVX-512, 32 with AVX2); 0 when torch packs some other way (its non-vectorized
    build pairs adjacent channels), and then no layer takes the int4pack path."""
    n, k = 128, 4
    ch = torch.arange(n, dtype=torch.int32)
    q = torch.stack([ch % 16, ch // 16, ch % 3, ch % 5], dim=1)  # [N, K]: rows 0-1 spell the channel
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1).flatten()
    for b in (64, 32):
        blocks = q.view(n // b, b, k).permute(0, 2, 1)  # [N/B, K, B]
        want = blocks[..., : b // 2] | (blocks[..., b // 2:] << 4)
        if torch.equal(packed.to(torch.int32), want.flatten()):
            return b
    return 0


def _act_order_perm(g_idx: torch.Tensor) -> torch.Tensor | None:
    """K order that makes groups contiguous; None when g_idx is already sorted."""
    g = g_idx.to(torch.int64)
    if bool((g[1:] >= g[:-1]).all()):
        return None
    return torch.argsort(g, stable=True)


def fused_segments(group_of_k: torch.Tensor, dtype: torch.dtype, out_features: int) -> torch.Tensor | None:
    """(k0, k1, group) runs of a sorted per-K group index, each split to <= FUSED_MAX_SEG rows; None
    when the fused kernel cannot serve the layer (not bf16, not compiled, N % 64, an odd run bound)."""
    ext = cpu_ext.load()
    if dtype != torch.bfloat16 or out_features % 64 or ext is None or not ext.has_gemm_bf16():
        return None
    if int4pack_block_n() != 64:  # the kernel reads int4pack's AVX-512 layout (torch forced to AVX2?)
        return None
    k = group_of_k.shape[0]
    ends = torch.cat([torch.nonzero(group_of_k[1:] != group_of_k[:-1]).flatten() + 1, torch.tensor([k])])
    segs, k0 = [], 0
    for end in ends.tolist():
        if end % 2:
            return None
        for s in range(k0, end, FUSED_MAX_SEG):
            segs.append((s, min(s + FUSED_MAX_SEG, end), int(group_of_k[k0])))
        k0 = end
    return torch.tensor(segs, dtype=torch.int64)


def fused_gemm(x2: torch.Tensor, w: Int4PackWeights | DequantWeights) -> torch.Tensor:
    """x2 [M, K] bf16 (already permuted) -> [M, N] bf16 through the fused kernel (w.segments set)."""
    y = torch.empty((x2.shape[0], w.out_features), dtype=torch.bfloat16)
    x2 = x2.contiguous()
    if isinstance(w, Int4PackWeights):
        cpu_ext.load().gemm_int4pack_bf16(x2, w.packed, w.scales_and_zeros, w.segments, y)
    else:
        cpu_ext.load().gemm_blocked8_bf16(x2, w.q, w.scales, w.zeros, w.segments, y)
    return y


def int4pack_group_size(sorted_g_idx: torch.Tensor) -> int:
    """Largest int4pack group size whose runs of K each lie in one group; 0 if none."""
    k = sorted_g_idx.shape[0]
    for gs in INT4PACK_GROUP_SIZES:
        if k % gs == 0:
            runs = sorted_g_idx.view(-1, gs)
            if bool((runs == runs[:, :1]).all()):
                return gs
    return 0


def can_int4pack(bits: int, g_idx: torch.Tensor, out_features: int) -> tuple[bool, str | None]:
    if bits > 4:
        return False, f"{bits}-bit values do not fit int4pack's 4-bit container"
    if not int4pack_block_n():
        return False, (f"torch's int4pack layout on this CPU ({torch.backends.cpu.get_cpu_capability()}) is "
                       "not one this package reads")
    if out_features % INT4PACK_BLOCK_N:
        return False, f"int4pack packs output channels in blocks of {INT4PACK_BLOCK_N}; N={out_features}"
    perm = _act_order_perm(g_idx)
    g = g_idx.to(torch.int64) if perm is None else g_idx.to(torch.int64)[perm]
    if not int4pack_group_size(g):
        return False, "groups do not tile K in runs of 32/64/128/256 (even after sorting by g_idx)"
    return True, None


def prepare_int4pack(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str,
                     dtype: torch.dtype) -> Int4PackWeights:
    q, zeros, scales, g = fmt.unpack_layer(
        {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits, checkpoint_format)
    k, n = q.shape
    perm = _act_order_perm(g)
    if perm is not None:
        q, g = q[perm], g[perm]
    gs = int4pack_group_size(g)
    assert gs and n % INT4PACK_BLOCK_N == 0, "call can_int4pack first"
    run_group = g[::gs]  # the checkpoint group of each int4pack group
    # Scales are rounded to T first, as format.dequantize does; zf is then exact up to one rounding.
    s = scales.to(dtype).float()[run_group]  # [K/gs, N]
    zf = (8 - zeros[run_group].float()) * s
    packed = torch._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1)
    return Int4PackWeights(packed, torch.stack([s, zf], dim=-1).to(dtype).contiguous(), gs, perm,
                           k, n, dtype, fused_segments(torch.arange(k) // gs, dtype, n))


def int4pack_gemm(x2: torch.Tensor, w: Int4PackWeights) -> torch.Tensor:
    """x2 [M, K] in T (already permuted) -> [M, N] in T. Time grows linearly with M: small M only."""
    return torch._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)


def _scale_offset(w: Int4PackWeights | DequantWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [G, N] scale and offset with W = q * scale + offset (tiny: one row per group)."""
    if isinstance(w, Int4PackWeights):
        s, zf = w.scales_and_zeros.float().unbind(-1)
        return s.contiguous(), (zf - 8 * s).contiguous()
    s = w.scales.float()
    return s, (-w.zeros.float() * s).contiguous()


def dequant_t(w: Int4PackWeights | DequantWeights, n0: int, n1: int, scale_offset=None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The transient W^T [K, n1 - n0] in T (permuted K order) for output channels [n0, n1)."""
    assert isinstance(w, Int4PackWeights) or w.q.dim() == 2, "q blocked for the fused kernel"
    s, off = scale_offset or _scale_offset(w)
    ext = cpu_ext.load()
    if ext is None:
        return _dequant_t_torch(w, n0, n1, s, off)
    if out is None:
        out = torch.empty((w.in_features, n1 - n0), dtype=w.dtype)
    if isinstance(w, Int4PackWeights):
        ext.dequant_int4pack(w.packed, s, off, w.group_size, n0, n1, out, int4pack_block_n())
    else:
        ext.dequant_rows(w.q, w.g_idx, s, off, n0, n1, out)
    return out


def _dequant_t_torch(w, n0: int, n1: int, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """dequant_t in torch ops (~5 passes over the tile), for machines that cannot build cpu_ext."""
    if isinstance(w, Int4PackWeights):
        k = w.in_features
        b = int4pack_block_n()
        blocks = w.packed.view(-1, k, b // 2)[n0 // b: n1 // b]
        q = torch.stack([blocks & 15, blocks >> 4], dim=2).permute(1, 0, 2, 3).reshape(k // w.group_size,
                                                                                      w.group_size, n1 - n0)
        return (q * s[:, None, n0:n1] + off[:, None, n0:n1]).view(k, n1 - n0).to(w.dtype)
    return (w.q[:, n0:n1] * s[w.g_idx, n0:n1] + off[w.g_idx, n0:n1]).to(w.dtype)


def dequant_gemm(x2: torch.Tensor, w: Int4PackWeights | DequantWeights) -> torch.Tensor:
    """x2 [M, K] in T (already permuted) -> [M, N]: dequantize W^T in column tiles of ~WT_TILE_BYTES
    (one buffer, reused: it stays in cache between the dequant and its GEMM, and is never a whole dense
    copy) and run one GEMM per tile."""
    k, n = w.in_features, w.out_features
    tile = min(n, max(64, WT_TILE_BYTES // (k * x2.element_size()) // 64 * 64))
    so = _scale_offset(w)
    buf = _workspace(k, tile, w.dtype)
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype)
    for n0 in range(0, n, tile):
        n1 = min(n0 + tile, n)
        y[:, n0:n1] = x2 @ dequant_t(w, n0, n1, so, out=buf[:, : n1 - n0] if n1 - n0 == tile else None)
    return y


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(k: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """One tile buffer per (K, width, dtype), kept across calls: a fresh 2 MiB buffer per call costs
    its page faults every time (comparable to the dequant itself). A few MiB in all."""
    key = (k, width, dtype)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty((k, width), dtype=dtype)
    return _WORKSPACES[key]


def prepare_dequant(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str,
                    dtype: torch.dtype) -> DequantWeights:
    q, zeros, scales, g = fmt.unpack_layer(
        {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits, checkpoint_format)
    perm = _act_order_perm(g)
    if perm is not None:
        q, g = q[perm], g[perm]
    k, n = q.shape
    segments = fused_segments(g, dtype, n)
    q = q.to(torch.uint8)
    if segments is not None:
        q = q.view(k, n // 64, 64).permute(1, 0, 2)
    return DequantWeights(q.contiguous(), zeros.to(dtype), scales.to(dtype), g.contiguous(), perm, k, n, dtype,
                          segments)
