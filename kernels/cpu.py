"""CPU dequant-GEMM paths: torch's int4pack kernel, the fused bf16 kernel, tile dequant + dense GEMM.

fused (bf16 on AVX512-BF16, cpu_ext's cpu_gemm_bf16.cpp): reads the 4- or 8-bit weights directly, one
pass, for any M. `segments` int64 [S, 3] lists (k0, k1, group row) runs of the sorted K, split to <=
FUSED_MAX_SEG; a layer whose group runs have odd bounds (ragged TP shards) has none and uses tiles.
tiles (fp16/fp32, or no compiled kernel): W^T is dequantized in column tiles of ~WT_TILE_BYTES by
cpu_ext (torch ops when it cannot be built), each tile feeding one dense GEMM.

int4pack (bits 2, 3 and 4: 2- and 3-bit values fit a 4-bit container, at 4-bit memory):
    packed             uint8 [N, K/2]       torch._convert_weight_to_int4pack_for_cpu's layout: blocks of
                                            64 output channels; byte (k * 32 + c) of block b holds q of
                                            channel b*64 + c (low nibble) and b*64 + 32 + c (high nibble)
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

import torch

from vllm_gptq_plugin import format as fmt

from . import cpu_ext

INT4PACK_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4PACK_BLOCK_N = 64
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
        ext.dequant_int4pack(w.packed, s, off, w.group_size, n0, n1, out)
    else:
        ext.dequant_rows(w.q, w.g_idx, s, off, n0, n1, out)
    return out


def _dequant_t_torch(w, n0: int, n1: int, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """dequant_t in torch ops (~5 passes over the tile), for machines that cannot build cpu_ext."""
    if isinstance(w, Int4PackWeights):
        k = w.in_features
        blocks = w.packed.view(-1, k, 32)[n0 // INT4PACK_BLOCK_N: n1 // INT4PACK_BLOCK_N]
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
