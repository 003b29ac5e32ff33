"""The pure-torch reference model: a checkpoint's quantized Linears dequantized into an ordinary
transformers model. It is the numerical reference for the kernels and the vLLM plugin, and what
`vllm-gptq ppl` evaluates."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vllm_gptq_plugin import format as fmt


def dequantized_state_dict(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                           tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, with each quantized layer replaced by its dense `.weight`."""
    tensors = tensors if tensors is not None else fmt.read_tensors(path)  # read once, validate that
    summary = fmt.validate(path, tensors)
    cfg: fmt.QuantConfig = summary["config"]
    out = {}
    for name in summary["layers"]:
        lcfg = cfg.for_module(name)
        parts = [tensors.pop(f"{name}.{s}") for s in fmt.QUANT_SUFFIXES]
        out[f"{name}.weight"] = fmt.dequantize(*parts, bits=lcfg.bits,
                                               checkpoint_format=cfg.checkpoint_format, dtype=dtype)
    out.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    return out


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A transformers causal LM for a quantized checkpoint (dequantized) or a plain fp folder."""
    import transformers
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if not hasattr(config, "quantization_config"):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    state = dequantized_state_dict(path, dtype)
    del config.quantization_config  # the weights are dense now; transformers must not re-quantize
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise fmt.FormatError(f"{path}: tensors do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()

