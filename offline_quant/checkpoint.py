"""From a transformers model plus per-layer quantization results to a checkpoint on disk (through
vllm_gptq_plugin.format, which owns the layout). Shared by every quantization method."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from vllm_gptq_plugin import format as fmt


def quantizable_linears(model: torch.nn.Module, cfg: fmt.QuantConfig) -> dict[str, tuple[torch.nn.Linear, fmt.QuantConfig]]:
    """nn.Linear modules to quantize with their per-module settings (dynamic rules, lm_head opt-in).

    Embeddings and norms are not Linear, so they stay in floating point by construction.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            lcfg = cfg.for_module(name)
            if lcfg is not None:
                k = module.in_features
                fmt.expected_shapes(k, module.out_features, lcfg)  # refuses shapes the format can't hold
                out[name] = (module, lcfg)
    if not out:
        raise fmt.FormatError("no nn.Linear layer is left to quantize: check the model and the dynamic rules")
    return out


def stamped(cfg: fmt.QuantConfig, method: str) -> fmt.QuantConfig:
    """cfg as the checkpoint records it: which quantizer and method made it."""
    return dataclasses.replace(cfg, meta={**cfg.meta, "quantizer": "vllm-gptq-plugin", "method": method})


def pack_linear(module: torch.nn.Linear, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, lcfg: fmt.QuantConfig, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """One quantized Linear's tensors in the checkpoint (format.pack_layer), its bias in fp16; packed
    where the inputs are, returned in CPU memory (where checkpoints are written from)."""
    packed = fmt.pack_layer(q, zeros, scales, g_idx, lcfg.bits, checkpoint_format)
    if module.bias is not None:
        packed["bias"] = module.bias.detach().to(torch.float16)
    return {k: t.cpu() for k, t in packed.items()}


def checkpoint_tensors(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]],
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's `.weight` replaced by its packed tensors.

    Tied weights (lm_head tied to the embedding) are written once, as transformers does.
    """
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module = key.rsplit(".", 1)[0]
        if module in packed and key.endswith(".weight"):
            continue
        if tied and key == "lm_head.weight":
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.detach().contiguous()
    for name, tensors in packed.items():
        for sfx, t in tensors.items():
            out[f"{name}.{sfx}"] = t
    return out


def write(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]], cfg: fmt.QuantConfig,
          out: str | os.PathLike, source: str | os.PathLike, overwrite: bool = False,
          extra_files: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint (fp tensors in `dtype`, default as they are) and validate it."""
    model_config = json.loads((Path(source) / "config.json").read_text())
    model_config.pop("quantization_config", None)
    if "lm_head" in packed:  # a quantized lm_head is its own tensor: it can no longer be tied
        model_config["tie_word_embeddings"] = False
    tensors = checkpoint_tensors(model, packed, dtype=dtype)
    path = fmt.save_checkpoint(out, tensors, cfg, model_config, source=source, overwrite=overwrite,
                               extra_files=extra_files)
    fmt.validate(path)  # never hand back a checkpoint we could not read ourselves
    return path
