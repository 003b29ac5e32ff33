"""Dequant-GEMM for GPTQ weights: the one entry point the vLLM plugin and the benchmarks call.

    w = prepare(qweight, qzeros, scales, g_idx, bits=4, checkpoint_format="gptq", dtype=torch.bfloat16)
    y = gptq_gemm(x, w, bias)          # x [..., K] -> y [..., N], y = x @ dequant(W).T + bias

Tensors arrive in the checkpoint layout of vllm_gptq_plugin.format (docs/FORMAT.md); `prepare` checks
them (`can_implement`, FormatError with the reason) and repacks them once for the device's kernels.
`gptq_gemm` is one call of the torch op `torch.ops.vllm_gptq_plugin.gemm` (ops.py), which
torch.compile and CUDA graphs see as a single node. Which kernel serves a call:

    CUDA/ROCm          -> Triton (triton_weights.py: layout; triton_tiles.py: kernel and tile per M
                          bucket from the shipped table): the tiled kernel (triton_gemm.py) on CUDA
                          cores at decode or tensor cores above, or the M = 1 word-wise GEMV
                          (triton_gemv.py); every bits / group / act-order
    CPU, bf16, AVX512-BF16, N % 64 == 0, group runs of even length
                       -> fused: one compiled kernel for every M (kernels/csrc/cpu_gemm_bf16.cpp)
    CPU, otherwise, bits <= 4, N % 64 == 0, groups tile K
                       -> int4pack: torch's int4pack GEMM for small M, else W^T dequantized in
                          cache-sized column tiles + one GEMM per tile
    CPU, otherwise     -> dequant: uint8 weights, the same tiles + GEMM for every M

cpu.py states the CPU layouts; where a layout allows more than one path, `cpu.path` takes the one
measured fastest on this machine for the M bucket (cpu_dispatch.py, `vllm-gptq tune-cpu`), else a
default rule. The CPU paths compute in
T = prepare's dtype (x of another dtype is cast to T and the result back).
"""
from __future__ import annotations

import dataclasses

import torch

from . import cpu, cpu_ext, ops
from .checks import can_implement, require

__all__ = ["PreparedWeights", "prepare", "gptq_gemm", "can_implement", "choose_backend"]
BACKENDS = ("triton", "int4pack", "dequant")


@dataclasses.dataclass
class PreparedWeights:
    backend: str
    impl: object          # triton_weights.TritonWeights | cpu.Int4PackWeights | cpu.DequantWeights
    tensors: list         # the op's `weights` (ops.py lists them per layout)
    meta: list            # the op's `meta`: [layout, K, N, ...]
    bits: int
    checkpoint_format: str
    in_features: int
    out_features: int
    dtype: torch.dtype    # T: the dtype scales (and CPU GEMMs) run in
    device: torch.device

    def nbytes(self) -> int:
        """Bytes the prepared weights keep resident (for the <= 0.3x-of-bf16 memory budget)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


def choose_backend(device: torch.device, bits: int, g_idx: torch.Tensor, out_features: int) -> str:
    if device.type != "cpu":
        return "triton"
    return "int4pack" if cpu.can_int4pack(bits, g_idx, out_features)[0] else "dequant"


def prepare(qweight, qzeros, scales, g_idx, *, bits: int, checkpoint_format: str = "gptq",
            dtype: torch.dtype = torch.float16, backend: str | None = None,
            act_order_mode: str = "permute") -> PreparedWeights:
    """Check and repack one layer's checkpoint tensors; `backend` overrides the dispatch (tests).

    act_order_mode "gather" makes the Triton kernels read scales per K row instead of sorting K once
    ("permute", the default; gather is what a row-parallel act-order shard gets on its own)."""
    require(can_implement(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype))
    if act_order_mode not in ("permute", "gather"):
        raise ValueError(f"act_order_mode must be 'permute' or 'gather', got {act_order_mode!r}")
    device = qweight.device
    k, n = g_idx.shape[0], scales.shape[1]
    backend = backend or choose_backend(device, bits, g_idx, n)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "triton":
        from . import triton_tiles, triton_weights  # lazy: importing triton costs ~1 s
        impl = triton_weights.prepare_triton(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype,
                                             gather=act_order_mode == "gather")
        limits = triton_tiles.device_limits(device)
        need = max(triton_tiles.plan(*limits, bits, impl.group, k, n, x_bytes).counters_needed(n)
                   for x_bytes in (2, 4))
        impl.counters = torch.zeros(need, dtype=torch.int32, device=device)
        tensors, meta = impl.tensors(), [ops.TRITON, k, n, bits, impl.group]
    else:
        if backend == "int4pack":
            require(cpu.can_int4pack(bits, g_idx, n))
            impl = cpu.prepare_int4pack(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)
        else:
            impl = cpu.prepare_dequant(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)
        cpu_ext.load()  # build once per machine (~1 min) at load time, not inside the first forward
        tensors, meta = impl.op_args()
    return PreparedWeights(backend, impl, tensors, meta, bits, checkpoint_format, k, n, dtype, device)


def gptq_gemm(x: torch.Tensor, w: PreparedWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.vllm_gptq_plugin.gemm(x, w.tensors, bias, w.meta)
