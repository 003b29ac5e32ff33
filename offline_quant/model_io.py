"""The model side of quantization: loading an HF causal LM, finding its decoder blocks and final norm,
and streaming one block's Linear weights at a time from the safetensors files (BlockWeights)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import preflight, report as rpt

CAUSAL_LM_ARCHS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration")  # config.json architectures
# Where HF causal LMs keep their decoder blocks and final norm (first match wins).
BLOCK_LISTS = ("model.layers", "model.language_model.layers", "model.decoder.layers",
               "gpt_neox.layers", "transformer.h")
FINAL_NORMS = ("model.norm", "model.language_model.norm", "model.decoder.final_layer_norm",
               "gpt_neox.final_layer_norm", "transformer.ln_f")


class Loaded(NamedTuple):
    model: torch.nn.Module  # in fp32
    src_dtype: torch.dtype  # the checkpoint's dtype, which the written fp tensors keep
    model_dir: Path
    out: Path               # absolute
    t_start: float          # perf_counter when the run started
    baseline_mb: float      # RSS before the model loaded: the interpreter, torch, transformers


def load_for_quantization(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool,
                          threads: int | None) -> Loaded:
    """The fp model to quantize into `out`, after the checks that must fail before the slow part."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  lazy imports: ~300 MiB of modules
    t_start, baseline_mb = time.perf_counter(), rpt.current_rss_mb()
    model_dir, out = Path(model_dir), Path(out).absolute()
    if out.exists() and not overwrite:
        raise fmt.FormatError(f"{out} already exists: choose another output folder or pass --overwrite")
    preflight.check_output_folder(out)
    if threads:
        torch.set_num_threads(threads)
    model, src_dtype = load_causal_lm(model_dir)
    return Loaded(model, src_dtype, model_dir, out, t_start, baseline_mb)


def load_causal_lm(model_dir: str | os.PathLike):
    """The fp model in fp32 (GPTQ's Hessians and solves need it) and its source dtype."""
    import transformers
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise fmt.FormatError(f"{model_dir} is not a Hugging Face model folder (no config.json): point "
                              "--model at a folder saved with save_pretrained")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING or (
            archs and not any(k in a for a in archs for k in CAUSAL_LM_ARCHS)):
        kind = ", ".join(archs) or "no architectures"
        raise fmt.FormatError(f"{model_dir} holds a {config.model_type!r} model ({kind}), which is not a "
                              "causal language model: GPTQ quantization here needs an AutoModelForCausalLM "
                              "checkpoint")
    src_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(src_dtype, str):
        src_dtype = getattr(torch, src_dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except OSError as e:  # no or unreadable weight files
        raise fmt.FormatError(f"cannot load the model weights from {model_dir}: {e}") from e
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model, src_dtype


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in BLOCK_LISTS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return path, blocks
    raise fmt.FormatError(f"cannot find the decoder blocks of {type(model).__name__}: expected a "
                          f"ModuleList at one of {BLOCK_LISTS} (add this architecture's path to BLOCK_LISTS)")


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise fmt.FormatError(f"cannot find the final norm of {type(model).__name__} (needed to quantize "
                          f"lm_head): expected one of {FINAL_NORMS}")


class BlockWeights:
    """A block's Linear weights in private memory only while the block is being quantized.

    transformers maps the checkpoint files and reads weights from the mapping: every page read
    counts in RSS until the process ends, so a plain run ends up holding the whole fp model.
    Reading a block's weights with a short-lived safe_open (its mapping closed right after) and
    dropping them once the block is done keeps one block's weights live at a time. A weight not
    found under its own name in the files is copied from the model instead (no saving, same result).
    On a GPU the weights are read straight to the device and widened to fp32 there.
    """

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open
            self.where = {}
            for f in sorted(model_dir.glob("*.safetensors")):
                with safe_open(f, "pt") as fh:
                    self.where.update(dict.fromkeys(fh.keys(), f))

    def load(self, linears: dict[str, torch.nn.Linear], device: torch.device = torch.device("cpu")) -> None:
        from safetensors import safe_open
        for name, module in linears.items():
            w, f = module.weight, self.where.get(f"{name}.weight")
            t = None
            if f is not None:
                with safe_open(f, "pt", device=str(device)) as fh:
                    t = fh.get_tensor(f"{name}.weight").to(w.dtype)
            if t is None or t.shape != w.shape:
                t = w.detach().to(device, copy=True)
            module.weight = torch.nn.Parameter(t, requires_grad=False)

    @staticmethod
    def drop(linears: dict[str, torch.nn.Linear]) -> None:
        """The packed tensors hold the result; nothing reads these weights again."""
        for module in linears.values():
            module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
