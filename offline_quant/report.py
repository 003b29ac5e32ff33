"""The quantization report: one row per quantized layer (damping used, Hessian hints, GPTQ loss,
output SQNR, time), printed as a table and saved as quant_report.json inside the checkpoint, plus a
sensitivity ranking that says which layers deserve more bits."""
from __future__ import annotations

import json
import math
import os
import resource
from typing import Any

import torch

REPORT_FILE = "quant_report.json"
SENSITIVE_SQNR_DB = 15.0  # below this a layer's output error is ~3% of its signal: worth 8 bits
TOP_SENSITIVE = 5
ILL_CONDITIONED = 1e7  # cond(H + damp) beyond this: fp32 solves lose most digits
GPU_SLACK_MB = 2048  # issue 16's allowance above a block's weights and the activations
SQNR_CHUNK = 1 << 24  # fp64 elements of H converted at once by output_sqnr_db (128 MiB)


def output_sqnr_db(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> float:
    """SQNR of Q·x against W·x over the calibration inputs, from H ∝ Σ x xᵀ alone (no forward
    pass): ‖WX‖² = tr(W H Wᵀ), ‖(W−Q)X‖² = tr(E H Eᵀ). With fp targets W is the solve's target W'
    (gptq.GPTQ._fp_target_weights): the error the quantization itself added.
    With H None: the weights' own SQNR (RTN has no calibration data)."""
    W, Q = W.double(), Q.double()
    E = W - Q
    if H is None:
        signal, noise = (W * W).sum(), (E * E).sum()
    else:  # H in fp64 a slice of columns at a time: a whole copy would be 2x H's memory on a GPU
        cols = max(1, SQNR_CHUNK // H.shape[0])
        signal = noise = 0.0
        for c in range(0, H.shape[1], cols):
            Hc = H[:, c:c + cols].double()
            signal = signal + ((W @ Hc) * W[:, c:c + cols]).sum()
            noise = noise + ((E @ Hc) * E[:, c:c + cols]).sum()
    if noise <= 0:
        return math.inf
    return float(10 * math.log10(max(float(signal), 1e-300) / float(noise)))


def hints(stats: dict[str, Any]) -> list[str]:
    """What a GPTQ layer's stats say about its Hessian, in words (empty when all is well)."""
    out = []
    if stats.get("fallback"):
        out.append(f"H not positive definite: fell back to {stats['fallback']}")
    if stats.get("damp_escalations"):
        out.append(f"damping raised {stats['damp_escalations']}x to {stats['damp_percent']:g}")
    if stats.get("dead_columns"):
        out.append(f"{stats['dead_columns']} dead input columns")
    cond = stats.get("hessian_cond_est")
    if cond is not None and math.isfinite(cond) and cond > ILL_CONDITIONED:
        out.append(f"ill-conditioned H (cond >= {cond:.1e})")
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process image so far: Linux's VmHWM. Not ru_maxrss: exec keeps
    the parent's high-water mark there, so a child of a big process (benchmarks/quality.py holding
    models for its evaluations) would report the parent's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def row(name: str, block: int, lcfg, stats: dict[str, Any], sqnr: float, seconds: float) -> dict[str, Any]:
    """A layer's row (lcfg: its format.QuantConfig; stats: gptq.GPTQResult.stats, {} for RTN)."""
    return {"name": name, "block": block, "bits": lcfg.bits, "group_size": lcfg.group_size,
            "sym": lcfg.sym, "desc_act": lcfg.desc_act, "damp": stats.get("damp_percent"),
            "escalations": stats.get("damp_escalations", 0), "cond": stats.get("hessian_cond_est"),
            "dead_columns": stats.get("dead_columns", 0), "fallback": stats.get("fallback"),
            "hints": hints(stats), "loss": stats.get("loss"), "sqnr_db": sqnr, "seconds": seconds}


def memory(model: torch.nn.Module, cfg, calib, block: torch.nn.Module | None = None,
           offload: bool = False) -> dict[str, float]:
    """What a run's peak memory is measured against. RSS: 1.5 x the fp model + the calibration
    activations (calib: offline_quant.calibration.Calibration, None for RTN, which keeps none).
    On a GPU (calib.device cuda): one decoder block's weights in fp32 + the activation buffers
    (unless offloaded to CPU memory) + GPU_SLACK_MB for Hessians, the solve and a batch's temporaries."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied lm_head counted once
    model_mb = sum(t.numel() * t.element_size() for t in unique.values()) / 2**20
    paths = 2 if cfg.meta.get("fp_targets") else 1  # the quantized model's path (and the fp model's)
    # per path: the block inputs in fp32, and ChildMemo's attention outputs in the forward dtype
    per_token = 4 + (2 if calib is not None and calib.bf16 else 4)
    act_mb = 0.0 if calib is None else paths * calib.nsamples * calib.seqlen * model.config.hidden_size * per_token / 2**20
    out = {"model_mb": model_mb, "activations_mb": act_mb, "bound_mb": 1.5 * model_mb + act_mb}
    if calib is not None and torch.device(calib.device).type == "cuda" and block is not None:
        out["block_mb"] = sum(p.numel() * 4 for p in block.parameters()) / 2**20
        out["gpu_bound_mb"] = out["block_mb"] + (0.0 if offload else act_mb) + GPU_SLACK_MB
    return out


def build(method: str, cfg, calibration: dict[str, Any] | None, rows: list[dict[str, Any]],
          wall_seconds: float, memory: dict[str, float], peak_gpu_mb: float | None = None) -> dict[str, Any]:
    """The report of a finished run (cfg: the checkpoint's format.QuantConfig). peak_gpu_mb:
    torch.cuda.max_memory_allocated of a run on a GPU, None on the CPU."""
    return {"method": method, "config": cfg.to_dict(), "calibration": calibration,
            "threads": torch.get_num_threads(), "wall_seconds": wall_seconds, "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb, "memory": memory, "layers": rows, "sensitivity": sensitivity(rows)}


def progress_bars(enabled: bool):
    """tqdm with the same keywords, or silent."""
    from tqdm.auto import tqdm
    return lambda **kw: tqdm(disable=not enabled, **kw)


def sensitivity(rows: list[dict[str, Any]], top: int = TOP_SENSITIVE) -> list[dict[str, Any]]:
    """The layers with the lowest output SQNR, each with the --rule that would give it 8 bits."""
    ranked = sorted((r for r in rows if r.get("sqnr_db") is not None and r["bits"] < 8),
                    key=lambda r: r["sqnr_db"])
    return [{"name": r["name"], "sqnr_db": r["sqnr_db"], "bits": r["bits"],
             "rule": f"{_regex(r['name'])}=bits:8"} for r in ranked[:top]]


def _regex(name: str) -> str:
    return name.replace(".", r"\.") + "$"


COLUMNS = (  # (header, key, width, number format); text columns are left-aligned
    ("layer", "name", -40, ""), ("bits", "bits", 4, "d"), ("group", "group_size", 5, "d"),
    ("damp", "damp", 8, ".2g"), ("esc", "escalations", 3, "d"), ("loss", "loss", 10, ".4g"),
    ("sqnr dB", "sqnr_db", 7, ".2f"), ("sec", "seconds", 6, ".2f"), ("hints", "hints", 0, ""),
)


def _cell(v: Any, width: int, spec: str) -> str:
    if isinstance(v, (list, tuple)):
        v = "; ".join(map(str, v))
    if v is None:
        text = "-"
    elif isinstance(v, float) and math.isinf(v):
        text = "inf"
    elif spec and isinstance(v, (int, float)) and not isinstance(v, bool):
        text = format(float(v) if "d" not in spec else int(v), spec)
    else:
        text = str(v)
    return text.ljust(-width) if width < 0 else text.rjust(width)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [" ".join(_cell(h, w, "") for h, _, w, _ in COLUMNS).rstrip()]
    lines += [" ".join(_cell(r.get(k), w, spec) for _, k, w, spec in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    rows = report["layers"]
    finite = [r["sqnr_db"] for r in rows if r.get("sqnr_db") is not None and math.isfinite(r["sqnr_db"])]
    bits = sorted({r["bits"] for r in rows})
    mem = report["memory"]
    lines = [f"{report['method']}: {len(rows)} layers quantized at bits {bits} in "
             f"{report['wall_seconds']:.1f} s ({report['threads']} threads), peak RSS "
             f"{report['peak_rss_mb']:.0f} MiB, {report['peak_rss_mb'] - mem['baseline_rss_mb']:.0f} MiB above "
             f"the {mem['baseline_rss_mb']:.0f} MiB the process held before loading the model (bound 1.5x fp "
             f"model {mem['model_mb']:.0f} MiB + calibration activations {mem['activations_mb']:.0f} MiB = "
             f"{mem['bound_mb']:.0f} MiB)"]
    if report.get("peak_gpu_mb") is not None:
        lines.append(f"peak GPU memory {report['peak_gpu_mb']:.0f} MiB (bound: one block in fp32 "
                     f"{mem['block_mb']:.0f} MiB + activations on the GPU + {GPU_SLACK_MB} MiB = "
                     f"{mem['gpu_bound_mb']:.0f} MiB)")
    if finite:
        lines.append(f"output SQNR: min {min(finite):.1f} dB, mean {sum(finite) / len(finite):.1f} dB")
    refined = {r["block"]: r["refine"] for r in rows if r.get("refine")}
    if refined:
        kept = [b for b in refined.values() if b["kept"]]
        gain = sum(1 - b["loss_after"] / b["loss_before"] for b in kept) / max(len(kept), 1)
        lines.append(f"refine: {len(kept)} of {len(refined)} blocks lowered their output error (by "
                     f"{100 * gain:.1f}% on average) and kept the refined weights; the others kept GPTQ's")
    escalated = [r["name"] for r in rows if r.get("escalations")]
    if escalated:
        lines.append(f"damping escalated on {len(escalated)} layers: {', '.join(escalated[:5])}")
    weak = [s for s in report.get("sensitivity", []) if s["sqnr_db"] < SENSITIVE_SQNR_DB]
    if weak:
        lines.append("most sensitive layers (consider 8 bits): " +
                     " ".join(f"--rule '{s['rule']}'" for s in weak))
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    def clean(v):  # JSON has no inf/nan
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(report), indent=2)
