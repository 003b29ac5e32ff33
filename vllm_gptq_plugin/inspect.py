"""`vllm-gptq inspect CHECKPOINT`: validate a checkpoint against docs/FORMAT.md and summarize it."""
from __future__ import annotations

import argparse
from collections import Counter

from vllm_gptq_plugin import format as fmt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--layers", action="store_true", help="print one line per quantized layer")


def run(args: argparse.Namespace) -> int:
    s = fmt.validate(args.checkpoint)
    cfg: fmt.QuantConfig = s["config"]
    layers = s["layers"]
    print(f"checkpoint      {args.checkpoint}")
    print(f"format          {cfg.checkpoint_format} (quant_method {cfg.quant_method}), valid")
    print(f"default         bits={cfg.bits} group_size={cfg.group_size} sym={cfg.sym} "
          f"desc_act={cfg.desc_act} static_groups={cfg.static_groups}")
    if cfg.dynamic:
        print(f"dynamic rules   {cfg.dynamic}")
    mix = Counter((v["bits"], v["group_size"], v["sym"], v["desc_act"]) for v in layers.values())
    for (bits, gs, sym, act), n in sorted(mix.items()):
        print(f"  {n:4d} layers   bits={bits} group_size={gs} sym={sym} act_order={act}")
    qparams = sum(v["in"] * v["out"] for v in layers.values())
    print(f"quantized       {len(layers)} layers, {qparams / 1e6:.2f} M weights")
    print(f"size on disk    {s['bytes'] / 2**20:.1f} MiB of tensors")
    if args.layers:
        for name, v in layers.items():
            print(f"  {name:50s} {v['out']}x{v['in']} bits={v['bits']} g={v['group_size']}")
    return 0
