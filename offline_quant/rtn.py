"""Round-to-nearest: the baseline GPTQ must beat, and the quantizer that needs no calibration data."""
from __future__ import annotations

import dataclasses
from pathlib import Path

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
    import transformers
    from vllm_gptq_plugin.offline_quant import checkpoint

    if Path(out).exists() and not overwrite:  # fail before the slow part
        raise fmt.FormatError(f"{out} already exists: choose another output folder or pass --overwrite")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    cfg = dataclasses.replace(cfg, meta={**cfg.meta, "quantizer": "vllm-gptq-plugin", "method": "rtn"})
    packed = {}
    for name, (module, lcfg) in checkpoint.quantizable_linears(model, cfg).items():
        q, zeros, scales, g_idx = quantize_weight(module.weight.detach(), lcfg)
        packed[name] = fmt.pack_layer(q, zeros, scales, g_idx, lcfg.bits, cfg.checkpoint_format)
        if module.bias is not None:
            packed[name]["bias"] = module.bias.detach().to(torch.float16)
    return checkpoint.write(model, packed, cfg, out, model_dir, overwrite)
