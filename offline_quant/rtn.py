"""Round-to-nearest: the baseline GPTQ must beat, and the quantizer that needs no calibration data."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import checkpoint, grid, model_io, preflight, report as rpt


def quantize_weight(W: torch.Tensor, cfg: fmt.QuantConfig):
    """W [N, K] -> (q [N, K] int32, zeros [G, N] int32, scales [G, N] fp32, g_idx [K] int32)."""
    n, k = W.shape
    group_size = k if cfg.group_size == -1 else cfg.group_size
    assert k % group_size == 0, f"group_size {group_size} must divide in_features {k}"
    zero_min = 1 if (cfg.checkpoint_format == "gptq" and not cfg.sym) else 0
    q = torch.empty(n, k, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for g0 in range(0, k, group_size):
        Wg = W[:, g0:g0 + group_size].float()
        scale, zero = grid.find_params(Wg, cfg.bits, cfg.sym, zero_min)
        q[:, g0:g0 + group_size] = grid.quantize(Wg, scale, zero, cfg.bits)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(k, dtype=torch.int32, device=W.device) // group_size  # format.default_g_idx, on W's device
    return q, torch.stack(zeros).to(torch.int32), torch.stack(scales), g_idx


def quantize_layers(targets: dict[str, tuple[torch.nn.Linear, fmt.QuantConfig]], cfg: fmt.QuantConfig, bars):
    """RTN for each target Linear -> (packed tensors per layer, report rows)."""
    packed, rows = {}, []
    for name, (module, lcfg) in bars(iterable=targets.items(), desc="rtn", unit="layer"):
        t0 = time.perf_counter()
        W = module.weight.detach().float()
        q, zeros, scales, g_idx = quantize_weight(W, lcfg)
        packed[name] = checkpoint.pack_linear(module, q, zeros, scales, g_idx, lcfg, cfg.checkpoint_format)
        Q = (q.float() - zeros[g_idx.long()].t().float()) * scales[g_idx.long()].t()
        rows.append(rpt.row(name, -1, lcfg, {}, rpt.output_sqnr_db(W, Q, None), time.perf_counter() - t0))
    return packed, rows


def quantize_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: fmt.QuantConfig,
                        overwrite: bool = False, threads: int | None = None,
                        progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """RTN-quantize every quantizable Linear of the HF model at `model_dir` into checkpoint `out`;
    returns (path, report)."""
    run = model_io.load_for_quantization(model_dir, out, overwrite, threads)
    memory = {**rpt.memory(run.model, cfg, None), "baseline_rss_mb": run.baseline_mb}
    cfg = checkpoint.stamped(cfg, "rtn")
    targets = checkpoint.quantizable_linears(run.model, cfg)  # refuses shapes the format cannot hold
    problem = preflight.disk_space_problem(run.out, preflight.checkpoint_bytes(run.model, targets, run.src_dtype,
                                                                               run.model_dir)[0])
    if problem:
        raise fmt.FormatError(problem)
    packed, rows = quantize_layers(targets, cfg, rpt.progress_bars(progress))
    rep = rpt.build("rtn", cfg, None, rows, time.perf_counter() - run.t_start, memory)
    path = checkpoint.write(run.model, packed, cfg, run.out, run.model_dir, overwrite,
                            {rpt.REPORT_FILE: rpt.to_json(rep)}, dtype=run.src_dtype)
    return path, rep


def quantize_model(model_dir, out, cfg: fmt.QuantConfig, overwrite: bool = False) -> Path:
    """quantize_checkpoint without the report: the checkpoint's path."""
    return quantize_checkpoint(model_dir, out, cfg, overwrite)[0]
