"""Dequant-GEMM for GPTQ weights: the one entry point the vLLM plugin and the benchmarks call.

    w = prepare(qweight, qzeros, scales, g_idx, bits=4, checkpoint_format="gptq", dtype=torch.bfloat16)
    y = gptq_gemm(x, w, bias)          # x [..., K] -> y [..., N], y = x @ dequant(W).T + bias

Tensors arrive in the checkpoint layout of vllm_gptq_plugin.format (docs/FORMAT.md); `prepare` repacks
them once for the device's kernel. TEMPORARY: until the kernel work lands this is the reference
fallback (dequantize per call through vllm_gptq_plugin.format.dequantize): correct, not fast.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_gptq_plugin import format as fmt


@dataclasses.dataclass
class PreparedWeights:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    checkpoint_format: str
    in_features: int
    out_features: int
    dtype: torch.dtype


def prepare(qweight, qzeros, scales, g_idx, *, bits: int, checkpoint_format: str = "gptq",
            dtype: torch.dtype = torch.float16) -> PreparedWeights:
    fmt.check_bits(bits)
    return PreparedWeights(qweight, qzeros, scales, g_idx, bits, checkpoint_format,
                           g_idx.shape[0], scales.shape[1], dtype)


def gptq_gemm(x: torch.Tensor, w: PreparedWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    weight = fmt.dequantize(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, w.checkpoint_format,
                            dtype=x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
