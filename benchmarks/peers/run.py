"""Quantize a model with a peer GPTQ quantizer on OUR calibration windows and convert the result.

    .venv/bin/python benchmarks/peers/run.py --peer llmcompressor --model .cache/smollm2 \
        --calib pydocs --nsamples 32 --seqlen 512 --bits 4 --group-size 64 --asym --act-order \
        --threads 1 --out .cache/peers/out/llmcompressor-4b-g64-asym-act

Runs in our venv: the windows are vllm_gptq_plugin.offline_quant.data.calibration_samples(tokenizer,
calib, nsamples, seqlen, seed), the same ones `vllm-gptq quantize --calib ... --nsamples ... --seqlen ...
--seed ...` uses; convert.quantize_with_peer hands them to the peer's runner (its own venv) as token
ids and converts the peer checkpoint. Prints the converted folder, which `vllm-gptq ppl --model` reads.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert  # noqa: E402  (benchmarks/peers/convert.py; this folder is not a package)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, choices=convert.PEERS)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", nargs="+", default=["pydocs"])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true")
    g.add_argument("--asym", dest="sym", action="store_false")
    p.set_defaults(sym=False)
    p.add_argument("--damp", type=float, default=None, help="default: the peer's own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="the converted checkpoint folder")
    args, extra = p.parse_known_args(argv)  # anything else goes to the peer's runner
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import transformers
    from vllm_gptq_plugin.offline_quant.data import calibration_samples
    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = calibration_samples(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    out = convert.quantize_with_peer(args.peer, args.model, ids, args.bits, args.group_size, args.act_order,
                                     args.sym, args.out, threads=args.threads, damp=args.damp,
                                     extra_args=tuple(extra))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
