"""Quantize a model with GPTQModel on given calibration token ids.

Run by the GPTQModel venv's python (benchmarks/peers/setup.sh gptqmodel), never by ours:

    GPTQMODEL_CPU_WORKERS=1 .cache/peers/gptqmodel-venv/bin/python benchmarks/peers/run_gptqmodel.py \
        --model .cache/smollm2 --ids ids.safetensors --bits 4 --group-size 64 --asym --act-order \
        --threads 1 --out OUT

Writes GPTQModel's native GPTQ checkpoint (qweight/qzeros/scales/g_idx, checkpoint_format "gptq" =
v1) into --out; benchmarks/peers/convert.py maps it onto our format (docs/FORMAT.md). The model is
loaded and quantized in fp32 on the CPU (GPTQModel keeps fp16 scales in the checkpoint, as the GPTQ
format does). Each row of `input_ids` in --ids is one calibration sample, used as it is.

Settings and why:
- GPTQMODEL_CPU_WORKERS defaults to max(2, --threads) here. GPTQModel 7.7 sizes its CPU worker pool
  as (cpu_count + 1) // 2, i.e. 1 on a 2-core machine, and then fails at load with "Virtual pool
  'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1": its model-loader pool needs 2.
  The workers are threads; to keep the run on --threads cores, the process is pinned to that many
  cores (sched_setaffinity) and torch gets --threads intra-op threads.
- --act-order is desc_act=True with dynamic groups (g_idx is an arbitrary map), the classic GPTQ
  act-order; --static-groups fixes the groups first. --no-act-order is desc_act=False, where
  GPTQModel 7.x turns on its own "act_group_aware" (GAR) reordering by default; --no-gar disables it.
- --damp defaults to GPTQModel's own damp_percent (0.05 in 7.7).
- The model is evaluated through our loader (dequantized), never through GPTQModel's kernels: its
  fp32 CPU kernel was seen returning garbage for asymmetric checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF causal LM folder")
    p.add_argument("--ids", required=True, help="safetensors file with int64 input_ids [nsamples, seqlen]")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="desc_act (dynamic groups unless --static-groups)")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--no-gar", action="store_true",
                   help="without act-order: disable GPTQModel's default act_group_aware reordering")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true")
    g.add_argument("--asym", dest="sym", action="store_false")
    p.set_defaults(sym=False)
    p.add_argument("--damp", type=float, default=None, help="damp_percent (default: GPTQModel's own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads)))
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[:max(1, args.threads)])
    import torch
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    import importlib.metadata as md
    from gptqmodel import GPTQModel, QuantizeConfig

    versions = {p: md.version(p) for p in ("gptqmodel", "transformers", "torch")}
    print(f"run_gptqmodel: {versions}", flush=True)
    ids = load_file(args.ids)["input_ids"].to(torch.long)
    nsamples, seqlen = ids.shape
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * seqlen} for row in ids]

    kwargs = dict(bits=args.bits, group_size=args.group_size, desc_act=args.act_order, sym=args.sym,
                  static_groups=args.static_groups, device="cpu")
    if args.damp is not None:
        kwargs["damp_percent"] = args.damp
    if not args.act_order and args.no_gar:
        kwargs["act_group_aware"] = False
    if args.act_order:
        kwargs["act_group_aware"] = False  # implied by desc_act; explicit to silence its warning
    qcfg = QuantizeConfig(**kwargs)
    print(f"run_gptqmodel: {qcfg}", flush=True)
    model = GPTQModel.load(args.model, qcfg, dtype=torch.float32)
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    wall = time.perf_counter() - t0
    model.save(args.out)
    info = {"peer": "gptqmodel", "versions": versions, "wall_s": round(wall, 1), "threads": args.threads,
            "nsamples": nsamples, "seqlen": seqlen, "dtype": "float32",
            "cpu_workers": os.environ["GPTQMODEL_CPU_WORKERS"], "args": vars(args),
            "damp_percent": qcfg.damp_percent}
    with open(os.path.join(args.out, "peer_run.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"run_gptqmodel: gptqmodel {versions['gptqmodel']}: quantized {nsamples}x{seqlen} windows in "
          f"{wall:.1f} s ({args.threads} thread(s)) -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
