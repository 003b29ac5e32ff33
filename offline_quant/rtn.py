"""Round-to-nearest: the baseline GPTQ must beat, and the quantizer that needs no calibration data."""
from __future__ import annotations

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import grid


def quantize_weight(W: torch.Tensor, cfg: fmt.QuantConfig):
    """W [N, K] -> (q [N, K] int32, zeros [G, N] int32, scales [G, N] fp32, g_idx [K] int32)."""
    n, k = W.shape
    group_size = k if cfg.group_size == -1 else cfg.group_size
    assert k % group_size == 0, f"group_size {group_size} must divide in_features {k}"
    zero_min = 1 if (cfg.checkpoint_format == "gptq" and not cfg.sym) else 0
    q = torch.empty(n, k, dtype=torch.int32)
    scales, zeros = [], []
    for g0 in range(0, k, group_size):
        Wg = W[:, g0:g0 + group_size].float()
        scale, zero = grid.find_params(Wg, cfg.bits, cfg.sym, zero_min)
        q[:, g0:g0 + group_size] = grid.quantize(Wg, scale, zero, cfg.bits)
        scales.append(scale)
        zeros.append(zero)
    g_idx = fmt.default_g_idx(k, cfg.group_size)
    return q, torch.stack(zeros).to(torch.int32), torch.stack(scales), g_idx


def quantize_model(model_dir, out, cfg: fmt.QuantConfig, overwrite: bool = False):
    """RTN-quantize every quantizable Linear of the HF model at `model_dir` into checkpoint `out`."""
    from vllm_gptq_plugin.offline_quant import quantize
    path, _ = quantize.quantize_model(model_dir, out, cfg, method="rtn", overwrite=overwrite, progress=False)
    return path
