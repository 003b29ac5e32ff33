"""Dequant-GEMM for GPTQ weights: the one entry point the vLLM plugin and the benchmarks call.

    w = prepare(qweight, qzeros, scales, g_idx, bits=4, checkpoint_format="gptq", dtype=torch.bfloat16)
    y = gptq_gemm(x, w, bias)          # x [..., K] -> y [..., N], y = x @ dequant(W).T + bias

Tensors arrive in the checkpoint layout of vllm_gptq_plugin.format (docs/FORMAT.md); `prepare` checks
them (`can_implement`, FormatError with the reason) and repacks them once for the device's kernel.
Dispatch by device, bits, dtype and M happens here and nowhere else:

    CUDA/ROCm          -> triton_gemm (every bits / group size / act-order; split-K for small M)
    CPU, bf16, AVX512-BF16, N % 64 == 0, group runs of even length (cpu.fused_segments)
                       -> fused: one compiled kernel for every M, reading the 4-bit int4pack layout
                          (bits <= 4) or blocked uint8 (8-bit) directly (kernels/csrc/cpu_gemm_bf16.cpp)
    CPU, otherwise, bits <= 4, N % 64 == 0, groups tile K
                       -> int4pack: torch._weight_int4pack_mm_for_cpu for M <= INT4PACK_MAX_M, else
                          W^T dequantized in cache-sized column tiles (cpu_ext) + one GEMM per tile
    CPU, otherwise     -> dequant: uint8 weights, the same tiles + GEMM for every M (fp16/fp32 8-bit,
                          odd N, act-order TP shards whose groups do not tile K)

The CPU paths compute in T = prepare's dtype (x of another dtype is cast to T and the result back).
"""
from __future__ import annotations

import dataclasses

import torch

from . import cpu, cpu_ext
from .checks import can_implement, check_input, require

__all__ = ["PreparedWeights", "prepare", "gptq_gemm", "can_implement", "choose_backend", "cpu_path",
           "INT4PACK_MAX_M"]

# For layers the fused kernel cannot serve (fp16/fp32, no AVX512-BF16). int4pack's time grows linearly
# with M; dequantizing W^T tiles costs a fixed ~1 ms per 4096x4096 plus the dense GEMM. On the 2-core
# AVX-512 dev box (4096x4096, bf16, noisy) they crossed between M = 16 and 32; benchmarks/kernels.py
# prints the paths side by side per M.
INT4PACK_MAX_M = 16
BACKENDS = ("triton", "int4pack", "dequant")


@dataclasses.dataclass
class PreparedWeights:
    backend: str
    impl: object          # triton_gemm.TritonWeights | cpu.Int4PackWeights | cpu.DequantWeights
    bits: int
    checkpoint_format: str
    in_features: int
    out_features: int
    dtype: torch.dtype    # T: the dtype scales (and CPU GEMMs) run in
    device: torch.device

    def nbytes(self) -> int:
        """Bytes the prepared weights keep resident (for the <= 0.3x-of-bf16 memory budget)."""
        return sum(t.numel() * t.element_size() for t in vars(self.impl).values()
                   if isinstance(t, torch.Tensor))


def choose_backend(device: torch.device, bits: int, g_idx: torch.Tensor, out_features: int) -> str:
    if device.type != "cpu":
        return "triton"
    return "int4pack" if cpu.can_int4pack(bits, g_idx, out_features)[0] else "dequant"


def prepare(qweight, qzeros, scales, g_idx, *, bits: int, checkpoint_format: str = "gptq",
            dtype: torch.dtype = torch.float16, backend: str | None = None,
            act_order_mode: str = "permute") -> PreparedWeights:
    """Check and repack one layer's checkpoint tensors; `backend` overrides the dispatch (tests).

    act_order_mode ("permute" | "gather") picks how the Triton kernel serves act-order (triton_gemm);
    the CPU paths always permute K once."""
    require(can_implement(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype))
    device = qweight.device
    k, n = g_idx.shape[0], scales.shape[1]
    backend = backend or choose_backend(device, bits, g_idx, n)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "triton":
        from . import triton_gemm  # lazy: importing triton on a CPU host switches on its interpreter
        impl = triton_gemm.prepare_triton(qweight, qzeros, scales, g_idx, bits, checkpoint_format,
                                          act_order_mode)
    elif backend == "int4pack":
        require(cpu.can_int4pack(bits, g_idx, n))
        impl = cpu.prepare_int4pack(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)
    else:
        impl = cpu.prepare_dequant(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)
    if backend != "triton":
        cpu_ext.load()  # build once per machine (~1 min) at load time, not inside the first forward
    return PreparedWeights(backend, impl, bits, checkpoint_format, k, n, dtype, device)


def cpu_path(w: PreparedWeights, m: int) -> str:
    """Which CPU kernel serves M rows: "fused" | "int4pack" | "tiles"."""
    if w.impl.segments is not None:
        return "fused"
    return "int4pack" if w.backend == "int4pack" and m <= INT4PACK_MAX_M else "tiles"


def gptq_gemm(x: torch.Tensor, w: PreparedWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    require(check_input(x, w.in_features, w.device, bias, w.out_features))
    if w.backend == "triton":
        from . import triton_gemm
        return triton_gemm.triton_gemm(x, w.impl, bias)
    impl = w.impl
    if x.numel() == 0:  # torch's int4pack kernel refuses M = 0
        y = x.new_zeros(*x.shape[:-1], w.out_features)
        return y if bias is None else y + bias.to(y.dtype)
    x2 = x.reshape(-1, w.in_features).to(w.dtype)
    if impl.perm is not None:
        x2 = x2.index_select(1, impl.perm)
    path = cpu_path(w, x2.shape[0])
    if path == "fused":
        y = cpu.fused_gemm(x2, impl)
    elif path == "int4pack":
        y = cpu.int4pack_gemm(x2.contiguous(), impl)
    else:
        y = cpu.dequant_gemm(x2, impl)
    if bias is not None:
        y += bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
