"""Quality of GPTQ vs RTN on SmolLM2-135M, side by side, in one run:

1. Perplexity of fp, RTN and GPTQ for 4-bit g64 (act-order off and on), 4-bit per-channel, 3-bit g64
   and 8-bit g64 (calibration: the default mix), on the held-out eval splits of both corpora, with each
   quantization's wall time, thread count and peak RSS, and the ratio (GPTQ - fp) / (RTN - fp).
2. Cross-domain: calibrate on pydocs, evaluate on shakespeare, and vice versa (plus in-domain), with
   the same ratio: out of domain it must stay <= 1 (GPTQ no worse than RTN).

Each quantization runs in its own process (`vllm-gptq quantize`), so its wall time and peak RSS are
its own (read from the checkpoint's quant_report.json). Checkpoints are kept in --work and reused
on a rerun unless --fresh.

Caveat printed with the table: SmolLM2's weights come from a Q4_1 GGUF (4-bit, blocks of 32, float
min), so the "fp" model is itself a dequantized 4-bit model.

    .venv/bin/python benchmarks/quality.py            # the full run (about an hour on 2 cores)
    .venv/bin/python benchmarks/quality.py --quick    # smoke run: 4-bit g64 only, tiny calibration
    .venv/bin/python benchmarks/quality.py --configs "4b g64 act-order" --no-cross --dry-run
    .venv/bin/python benchmarks/quality.py --refine --cross-nsamples 32 ...  # table 2 with GPTQ+refine
    .venv/bin/python benchmarks/quality.py --configs "4b g64,3b g64" --methods rtn --dry-run
                                                      # print (and check) the runs, run nothing
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVALS = ("pydocs:eval", "shakespeare:eval")
CONFIGS = {  # name -> quantize flags (on top of the CLI defaults: asym, MSE clipping, act-order)
    "4b g64": ["--bits", "4", "--group-size", "64", "--no-act-order"],
    "4b g64 act-order": ["--bits", "4", "--group-size", "64", "--act-order"],
    "4b per-channel": ["--bits", "4", "--group-size", "-1", "--act-order"],
    "3b g64": ["--bits", "3", "--group-size", "64", "--no-act-order"],
    "3b g64 act-order": ["--bits", "3", "--group-size", "64", "--act-order"],
    "8b g64 act-order": ["--bits", "8", "--group-size", "64", "--act-order"],
}
# Table 1 by default; "3b g64" (no act-order) is for README's RTN baseline table.
DEFAULT_CONFIGS = ("4b g64", "4b g64 act-order", "4b per-channel", "3b g64 act-order", "8b g64 act-order")
METHODS = ("rtn", "gptq")
CROSS_CONFIGS = ("4b g64 act-order", "3b g64 act-order")
CROSS_CALIB = ("pydocs", "shakespeare")


def quantize_command(args, name: str, method: str, calib: str) -> tuple[Path, list[str]]:
    """The checkpoint folder of one run and the `vllm-gptq quantize` command that makes it."""
    out = args.work / f"{method}-{calib}-{name.replace(' ', '-')}-{args.nsamples}x{args.seqlen}"
    flags = ["--method", "gptq", "--refine"] if method == "gptq-refine" else ["--method", method]
    cmd = [sys.executable, "-m", "vllm_gptq_plugin.cli", "quantize", "--model", str(args.model),
           "--out", str(out), *flags, *CONFIGS[name], "--calib", calib, "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress", *args.extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return out, cmd


def quantize(args, name: str, method: str, calib: str) -> dict:
    """Quantize (or reuse) one checkpoint in a child process; returns its quant_report.json."""
    out, cmd = quantize_command(args, name, method, calib)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "quant_report.json").exists():
        print(f"  quantizing {out.name} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rep = json.loads((out / "quant_report.json").read_text())
    rep["path"] = out
    return rep


def ppl(args, path: Path, spec: str, cache: dict) -> float:
    from vllm_gptq_plugin.offline_quant.ppl import text_ppl
    key = (str(path), spec)
    if key not in cache:
        cache[key] = text_ppl(path, spec, ctx=args.ctx, max_tokens=args.max_tokens, progress=False)["ppl"]
    return cache[key]


def _above(rep: dict) -> str:
    """Peak RSS above what the process held before loading the model, against the issue's bound."""
    mem = rep["memory"]
    return f"{rep['peak_rss_mb'] - mem['baseline_rss_mb']:.0f} / {mem['bound_mb']:.0f}"


def ratio(fp: float, rtn: float, gptq: float) -> str:
    return f"{(gptq - fp) / (rtn - fp):.2f}" if rtn != fp else "-"


def names_of(known: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `known`, refused (with the choices) at parse time."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}: choose from "
                                             f"{', '.join(map(repr, known))}")
        return names
    return parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / ".cache" / "smollm2")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-quality")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", default="mix", help="calibration of table 1")
    p.add_argument("--cross-nsamples", type=int, default=None,
                   help="calibration windows of table 2 (default: --nsamples; the issue's reference used 32)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384, help="eval tokens per text")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 4b g64 only, 16x256 calibration, 2k tokens")
    p.add_argument("--fresh", action="store_true", help="re-quantize even if a checkpoint is in --work")
    p.add_argument("--configs", type=names_of(tuple(CONFIGS)), default=list(DEFAULT_CONFIGS),
                   help=f"comma-separated rows of table 1, of {', '.join(CONFIGS)}")
    p.add_argument("--methods", type=names_of(METHODS), default=list(METHODS),
                   help="rtn,gptq or rtn alone (the baseline table)")
    p.add_argument("--no-cross", action="store_true", help="skip table 2 (cross-domain)")
    p.add_argument("--cross-only", action="store_true", help="skip table 1")
    p.add_argument("--refine", action="store_true", help="table 2 also with `quantize --refine` (GPTQ+refine)")
    p.add_argument("--cross-configs", type=names_of(tuple(CONFIGS)), default=list(CROSS_CONFIGS),
                   help="configs of table 2")
    p.add_argument("--cross-calib", type=names_of(CROSS_CALIB), default=list(CROSS_CALIB),
                   help="calibration corpora of table 2")
    p.add_argument("--dry-run", action="store_true",
                   help="print the quantize commands this run would make and exit (checks a command line)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more `vllm-gptq quantize` flags for every run (e.g. --asym)")
    args = p.parse_args()
    configs = [] if args.cross_only else args.configs
    cross = () if args.no_cross or "gptq" not in args.methods else tuple(args.cross_configs)
    methods = tuple(args.methods)
    if args.quick:
        args.nsamples, args.seqlen, args.max_tokens = 16, 256, 2048
        configs, cross = ["4b g64"], ("4b g64",) if cross else ()
    if args.dry_run:  # the plan, each command checked by the quantize CLI's own parser; nothing runs
        from vllm_gptq_plugin.offline_quant import quantize as qz
        parser = argparse.ArgumentParser(prog="vllm-gptq quantize")
        qz.add_arguments(parser)
        plan = [quantize_command(args, name, m, args.calib)[1] for name in configs for m in methods]
        args.nsamples = args.cross_nsamples or args.nsamples
        plan += [quantize_command(args, name, m, calib)[1] for calib in args.cross_calib for name in cross
                 for m in ("gptq", "gptq-refine")[:1 + args.refine]]
        for cmd in plan:
            parser.parse_args(cmd[4:])  # after `python -m vllm_gptq_plugin.cli quantize`
            print(shlex.join(cmd))
        return 0
    if not (args.model / "config.json").exists():
        from vllm_gptq_plugin.offline_quant.models import fetch_smollm2
        fetch_smollm2(args.model)
    if args.threads:  # the evaluations too: oversubscribed OpenMP threads on a busy machine run 5x slower
        import torch
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    fp = {e: ppl(args, args.model, e, cache) for e in EVALS}

    print(f"\nmodel: {args.model}\ncaveat: SmolLM2's weights are a dequantized Q4_1 GGUF (4-bit, blocks of "
          "32, float mins): its 'fp' model is itself a 4-bit model")
    if configs:
        print(f"table 1: calibration {args.calib} {args.nsamples}x{args.seqlen} seed 0; perplexity at ctx "
              f"{args.ctx} on {args.max_tokens} tokens of each eval split; ratio = (GPTQ-fp)/(RTN-fp)")
        head = f"{'config':<18} {'method':<6} " + " ".join(f"{e:>17}" for e in EVALS) + \
            " " + " ".join(f"{'ratio ' + e.split(':')[0]:>18}" for e in EVALS) + \
            f" {'quant s':>8} {'threads':>7} {'peak RSS MiB':>12} {'above base / bound':>18}"
        print(head)
        print(f"{'fp':<18} {'-':<6} " + " ".join(f"{fp[e]:>17.2f}" for e in EVALS))
    for name in configs:
        reps = {m: quantize(args, name, m, args.calib) for m in methods}
        vals = {m: {e: ppl(args, reps[m]["path"], e, cache) for e in EVALS} for m in reps}
        for m, rep in reps.items():
            ratios = [ratio(fp[e], vals["rtn"][e], vals["gptq"][e]) if m == "gptq" and "rtn" in vals else ""
                      for e in EVALS]
            print(f"{name:<18} {m.upper():<6} " + " ".join(f"{vals[m][e]:>17.2f}" for e in EVALS) + " " +
                  " ".join(f"{r:>18}" for r in ratios) +
                  f" {rep['wall_seconds']:>8.1f} {rep['threads']:>7} {rep['peak_rss_mb']:>12.0f} "
                  f"{_above(rep):>18}")

    if not cross:
        return 0
    print(f"\ntable 2: cross-domain, calibration {args.cross_nsamples or args.nsamples}x{args.seqlen} on one corpus; ratio <= 1 "
          "means GPTQ is no worse than RTN")
    print(f"{'calibrated on':<14} {'config':<8} {'eval on':<18} {'fp':>7} {'RTN':>7} {'GPTQ':>7} {'ratio':>6}" +
          (f" {'+refine':>8} {'ratio':>6}" if args.refine else ""))
    rtns = {name: quantize(args, name, "rtn", args.calib) for name in cross}  # no calibration
    args.nsamples = args.cross_nsamples or args.nsamples
    for calib in args.cross_calib:
        for name in cross:
            rtn, gptq = rtns[name], quantize(args, name, "gptq", calib)
            refined = quantize(args, name, "gptq-refine", calib) if args.refine else None
            for e in EVALS:
                r, g = ppl(args, rtn["path"], e, cache), ppl(args, gptq["path"], e, cache)
                where = "in domain" if e.startswith(calib) else "OUT of domain"
                more = ""
                if refined is not None:
                    gr = ppl(args, refined["path"], e, cache)
                    more = f" {gr:>8.2f} {ratio(fp[e], r, gr):>6}"
                print(f"{calib:<14} {name:<8} {e:<18} {fp[e]:>7.2f} {r:>7.2f} {g:>7.2f} "
                      f"{ratio(fp[e], r, g):>6}{more}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
