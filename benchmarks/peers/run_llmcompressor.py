"""Quantize a model with llm-compressor's GPTQModifier on given calibration token ids.

Run by the llm-compressor venv's python (benchmarks/peers/setup.sh llmcompressor), never by ours:

    .cache/peers/llmcompressor-venv/bin/python benchmarks/peers/run_llmcompressor.py \
        --model .cache/smollm2 --ids ids.safetensors --bits 4 --group-size 64 --asym --act-order \
        --threads 1 --out OUT

Writes llm-compressor's native checkpoint (compressed-tensors, format "pack-quantized") into --out;
benchmarks/peers/convert.py turns it into our GPTQ format. The model is loaded and quantized in fp32
on the CPU. The calibration windows are the rows of `input_ids` in --ids, used as they are (no
re-sampling, no shuffling, no truncation: max_seq_length = the window length).

Settings that differ from a plain `GPTQModifier(...)` call, and why:
- act-order: llm-compressor 0.14 (compressed-tensors 0.19) only has actorder "static"/"weight"
  (columns solved in act-order, groups fixed beforehand: static_groups in GPTQ terms); the
  dynamic-group "group" order was removed. --act-order therefore means actorder="static" and
  --no-act-order actorder=None.
- scale_dtype=float16 (unless --scale-dtype model): the scales are rounded to fp16 when computed, so
  GPTQ's error feedback sees the scales that the checkpoint (and our fp16-scale GPTQ format) keeps
  and the conversion is exact. With --scale-dtype model they stay fp32 and convert.py rounds them.
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
                   help="actorder='static' (llm-compressor's default) or None")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true")
    g.add_argument("--asym", dest="sym", action="store_false")
    p.set_defaults(sym=False)
    p.add_argument("--damp", type=float, default=None,
                   help="dampening_frac (default: llm-compressor's own, 0.01)")
    p.add_argument("--scale-dtype", choices=("float16", "model"), default="float16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    import importlib.metadata as md
    import datasets
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    versions = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    print(f"run_llmcompressor: {versions}", flush=True)
    ids = load_file(args.ids)["input_ids"].to(torch.long)
    nsamples, seqlen = ids.shape

    weights = {"num_bits": args.bits, "type": "int", "symmetric": args.sym,
               "strategy": "channel" if args.group_size == -1 else "group",
               "actorder": "static" if args.act_order else None}
    if args.group_size != -1:
        weights["group_size"] = args.group_size
    if args.scale_dtype == "float16":
        weights["scale_dtype"] = torch.float16
    kwargs = {}
    if args.damp is not None:
        kwargs["dampening_frac"] = args.damp
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"],
                          config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          **kwargs)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                     "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen,
            num_calibration_samples=nsamples, shuffle_calibration_samples=False, batch_size=1)
    wall = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    info = {"peer": "llmcompressor", "versions": versions, "wall_s": round(wall, 1),
            "threads": args.threads, "nsamples": nsamples, "seqlen": seqlen, "dtype": "float32",
            "args": {k: v for k, v in vars(args).items()}, "recipe_weights": {
                k: str(v) if isinstance(v, torch.dtype) else v for k, v in weights.items()}}
    with open(os.path.join(args.out, "peer_run.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"run_llmcompressor: llmcompressor {versions['llmcompressor']}: quantized {nsamples}x{seqlen} "
          f"windows in {wall:.1f} s ({args.threads} thread(s)) -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
