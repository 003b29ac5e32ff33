"""lm-eval scores of SmolLM2-135M: fp, RTN 4-bit g64, GPTQ 4-bit g64 (act-order off and on), GPTQ 3-bit
g64, each served by vLLM (`--quantization gptq-plugin` for the checkpoints), in one table.

Checkpoints come from `vllm-gptq quantize` (one child process each) into --work, named as
benchmarks/quality.py names them, so either script reuses the other's; each model is evaluated by
`vllm-gptq eval` in its own process. Tasks: the local gptq_lastword and gptq_continuation (held-out
shakespeare and pydocs text, no hub); pass --tasks for standard lm-eval tasks whose data you have.

    .venv/bin/python benchmarks/eval_table.py            # the full run (all rows, all documents)
    .venv/bin/python benchmarks/eval_table.py --quick    # smoke: fp, RTN and GPTQ 4-bit, 16x256
                                                         # calibration, 20 documents per task
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # label -> (method, quantize flags, name used by benchmarks/quality.py); None = the fp model
    "fp": None,
    "RTN 4b g64": ("rtn", ["--bits", "4", "--group-size", "64", "--no-act-order"], "4b-g64"),
    "GPTQ 4b g64": ("gptq", ["--bits", "4", "--group-size", "64", "--no-act-order"], "4b-g64"),
    "GPTQ 4b g64 act-order": ("gptq", ["--bits", "4", "--group-size", "64", "--act-order"], "4b-g64-act-order"),
    "GPTQ 3b g64 act-order": ("gptq", ["--bits", "3", "--group-size", "64", "--act-order"], "3b-g64-act-order"),
}
QUICK_ROWS = ("fp", "RTN 4b g64", "GPTQ 4b g64")


def quantize(args, method: str, flags: list[str], name: str) -> Path:
    out = args.work / f"{method}-{args.calib}-{name}-{args.nsamples}x{args.seqlen}"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "quant_report.json").exists():
        cmd = [sys.executable, "-m", "vllm_gptq_plugin.cli", "quantize", "--model", str(args.model),
               "--out", str(out), "--method", method, *flags, "--calib", args.calib, "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress"]
        print(f"  quantizing {out.name} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def evaluate(args, path: Path) -> dict:
    """{task: {metric: value}} from `vllm-gptq eval` in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-m", "vllm_gptq_plugin.cli", "eval", "--models", str(path), "--tasks", args.tasks,
               "--backend", args.backend, "--dtype", args.dtype, "--max-model-len", "2048", "--json", str(out)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        print(f"  evaluating {path.name} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        return json.loads(out.read_text())[str(path)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / ".cache" / "smollm2")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-quality")
    p.add_argument("--calib", default="mix")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tasks", default="gptq_lastword,gptq_continuation")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 16x256 calibration, 20 documents")
    p.add_argument("--fresh", action="store_true", help="re-quantize even if a checkpoint is in --work")
    args = p.parse_args()
    rows = ROWS
    if args.quick:
        args.nsamples, args.seqlen, args.limit = 16, 256, args.limit or 20
        rows = {k: ROWS[k] for k in QUICK_ROWS}
    if not (args.model / "config.json").exists():
        from vllm_gptq_plugin.offline_quant.models import fetch_smollm2
        fetch_smollm2(args.model)
    args.work.mkdir(parents=True, exist_ok=True)

    from vllm_gptq_plugin.offline_quant.evaluate import format_table
    results = {}
    for label, spec in rows.items():
        path = args.model if spec is None else quantize(args, *spec)
        results[label] = evaluate(args, path)
    print(f"\nmodel: {args.model}; backend {args.backend} ({args.dtype}); calibration {args.calib} "
          f"{args.nsamples}x{args.seqlen}; documents per task: {args.limit or 'all'}")
    print("caveat: SmolLM2's weights are a dequantized Q4_1 GGUF, so 'fp' is itself a 4-bit model")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
