"""The dequant-GEMM as one torch op, `torch.ops.vllm_gptq_plugin.gemm`, and the dispatch inside it.

    gemm(Tensor x, Tensor[] weights, Tensor? bias, int[] meta) -> Tensor     x [..., K] -> y [..., N]

`weights` and `meta` are what kernels.prepare made of one layer (meta = [layout, K, N, ...]); a layout
names the tensors' order and the kernel family:

    TRITON    [qweight, scales, zeros, g_idx, perm, counters]       meta [TRITON, K, N, bits, group]
    INT4PACK  [packed, scales_and_zeros, perm, segments]            meta [INT4PACK, K, N, group_size]
    DEQUANT   [q, zeros, scales, g_idx, perm, segments]             meta [DEQUANT, K, N]

(triton_weights.py and cpu.py state the layouts; empty tensors stand for absent perm/segments/g_idx.)
Being an op with a fake implementation, it is one opaque node to torch.compile (fullgraph, dynamic M)
and to CUDA-graph capture; everything that depends only on the weights happened in prepare, and what
depends on M (the tile for its bucket, the CPU path) is decided in here, per call.
"""
from __future__ import annotations

import logging

import torch

from .checks import check_input, require

log = logging.getLogger(__name__)
TRITON, INT4PACK, DEQUANT = 0, 1, 2
# Above this M an act-order layer's x is permuted once per call on the host instead of gathered in the
# kernel: a gather per x load costs little at decode and a lot in a prefill tile.
PERM_IN_KERNEL_MAX_M = 64

def gemm(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, meta: list[int]) -> torch.Tensor:
    layout, k, n = meta[0], meta[1], meta[2]
    require(check_input(x, k, weights[0].device, bias, n))
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:  # torch's int4pack kernel and Triton grids refuse M = 0
        y = x2.new_zeros(0, n)
    elif layout == TRITON:
        y = _triton(x2, weights, bias, meta)
        bias = None  # added in the kernel's epilogue
    else:
        y = _cpu(x2, weights, meta)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def _gemm_fake(x, weights, bias, meta):
    torch._check(x.shape[-1] == meta[1], lambda: f"x must be [..., {meta[1]}], found {list(x.shape)}")
    return x.new_empty(*x.shape[:-1], meta[2])


# Once per process: this file can be imported under a second name (a checkout's root on sys.path
# makes kernels/ importable as `kernels`, which vLLM probes for), and an op is defined only once.
if not hasattr(torch.ops.vllm_gptq_plugin, "gemm"):
    LIB = torch.library.Library("vllm_gptq_plugin", "FRAGMENT")
    LIB.define("gemm(Tensor x, Tensor[] weights, Tensor? bias, int[] meta) -> Tensor")
    LIB.impl("gemm", gemm, "CPU")   # CPU layouts, and the Triton layout under Triton's interpreter
    LIB.impl("gemm", gemm, "CUDA")  # Triton (CUDA and ROCm builds of torch both use this key)
    torch.library.register_fake("vllm_gptq_plugin::gemm", _gemm_fake, lib=LIB)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

_FALLBACK: dict[tuple, object] = {}  # (tile, bits, group, x dtype) that failed to launch -> tile used


def _triton(x2: torch.Tensor, weights, bias, meta) -> torch.Tensor:
    from . import triton_tiles
    qweight, scales, zeros, g_idx, perm, counters = weights
    _, k, n, bits, group = meta
    m = x2.shape[0]
    tile = triton_tiles.plan(*triton_tiles.device_limits(x2.device), bits, group, k, n,
                             x2.element_size()).tile(m)
    if _FALLBACK:
        tile = _FALLBACK.get((tile, bits, group, x2.dtype), tile)
    if perm.numel() and m > PERM_IN_KERNEL_MAX_M:
        x2, perm = x2.index_select(1, perm), perm[:0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    try:
        return _launch(tile, x2, weights, perm, bias, out, bits, group, k, n)
    except Exception as e:  # triton.runtime.errors.OutOfResources: a tile this chip cannot launch
        if type(e).__name__ != "OutOfResources" or tile == triton_tiles.SAFE:
            raise
        log.warning("vllm_gptq_plugin: tile %s does not launch here (%s); using %s for this layer class",
                    tile.as_list(), e, triton_tiles.SAFE.as_list())
        _FALLBACK[(tile, bits, group, x2.dtype)] = triton_tiles.SAFE
        return _launch(triton_tiles.SAFE, x2, weights, perm, bias, out, bits, group, k, n)


def _launch(tile, x2, weights, perm, bias, out, bits, group, k, n) -> torch.Tensor:
    import triton
    from .triton_gemm import gemm_kernel
    from .triton_gemv import gemv_words_kernel
    qweight, scales, zeros, g_idx, _, counters = weights
    m = x2.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, tile.split_k), tile.block_k) * tile.block_k
    split_k = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n)
    if split_k > 1 and counters.numel() < tiles:
        raise RuntimeError(f"split-K counters hold {counters.numel()} tiles, this launch needs {tiles}: "
                           "prepare sized them for another plan")
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device) if split_k > 1 else out
    kernel = gemv_words_kernel if tile.kernel == "gemvw" else gemm_kernel
    kernel[(tiles, split_k)](
        x2, qweight, scales, zeros, g_idx, perm, out if bias is None else bias, out, ws, counters,
        m, n, k, k_per_split, split_k, x2.stride(0),
        BITS=bits, GROUP=group, HAS_PERM=perm.numel() > 0, HAS_BIAS=bias is not None,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, USE_SPLIT=split_k > 1,
        DOT=tile.kernel == "gemm",
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------

def _cpu(x2: torch.Tensor, weights, meta) -> torch.Tensor:
    from . import cpu
    w = cpu.Int4PackWeights.from_op(weights, meta) if meta[0] == INT4PACK else cpu.DequantWeights.from_op(weights)
    xt = x2.to(w.dtype)
    if w.perm is not None:
        xt = xt.index_select(1, w.perm)
    path = cpu.path(w, xt.shape[0])
    if path == "fused":
        y = cpu.fused_gemm(xt, w)
    elif path == "int4pack":
        y = cpu.int4pack_gemm(xt.contiguous(), w)
    else:
        y = cpu.dequant_gemm(xt, w)
    return y.to(x2.dtype)
