"""The `vllm-gptq quantize` command: its arguments, the QuantConfig they make, and the run. Under
torchrun (`torchrun --nproc-per-node N -m vllm_gptq_plugin.cli quantize ...`) every rank runs it.

The quantizers live in their own modules: driver (GPTQ on a whole model, block by block) and rtn
(round-to-nearest); the Python API is api.quantize.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import devices, distributed, driver, report as rpt, rtn, stopping
from vllm_gptq_plugin.offline_quant.refine import DEFAULT_ITERS as DEFAULT_REFINE_ITERS
from vllm_gptq_plugin.offline_quant.calibration import (DEFAULT_BATCH, DEFAULT_CALIB, DEFAULT_FORWARD_DTYPE,
                                                        DEFAULT_NSAMPLES, DEFAULT_SEQLEN, FORWARD_DTYPES,
                                                        Calibration)

METHODS = ("gptq", "rtn")
DEFAULTS = {"act_order": True, "sym": False, "mse": True, "fp_targets": True, "refine_scales": False}
RULE_KEYS = {"bits": int, "group_size": int, "sym": lambda v: v.lower() in ("1", "true", "yes"),
             "desc_act": lambda v: v.lower() in ("1", "true", "yes")}


def parse_rule(text: str) -> tuple[str, dict[str, Any]]:
    """'REGEX=bits:8,group_size:128' -> ('+:REGEX', {'bits': 8, 'group_size': 128})."""
    regex, eq, spec = text.rpartition("=")
    if not eq or not regex:
        raise fmt.FormatError(f"--rule {text!r}: expected REGEX=key:value[,key:value], e.g. "
                              r"'.*\.down_proj$=bits:8'")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, colon, value = item.partition(":")
        if not colon or key not in RULE_KEYS:
            raise fmt.FormatError(f"--rule {text!r}: {item!r} is not key:value with key in {sorted(RULE_KEYS)}")
        try:
            overrides[key] = RULE_KEYS[key](value)
        except ValueError as e:
            raise fmt.FormatError(f"--rule {text!r}: {key} must be an integer, got {value!r}") from e
    return f"+:{regex}", overrides


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF causal LM folder (fp16/bf16/fp32 safetensors)")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--method", choices=METHODS, default="gptq", help="gptq (calibrated) or rtn (baseline)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 for per-channel")
    # Defaults: the best settings measured on SmolLM2 (README, "GPTQ vs RTN"); vLLM's built-in gptq
    # path reads only --sym --no-act-order checkpoints, this plugin reads all of them.
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--act-order", action=on_off, default=DEFAULTS["act_order"],
                   help="desc_act: quantize columns by descending H diag")
    p.add_argument("--asym", dest="sym", action="store_false", default=DEFAULTS["sym"],
                   help="asymmetric grid, a zero point per group (the default)")
    p.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid")
    p.add_argument("--static-groups", action="store_true", help="group grids fixed before the solve")
    p.add_argument("--damp-percent", type=float, default=0.01, help="damping, a fraction of mean diag(H)")
    p.add_argument("--mse", action=on_off, default=DEFAULTS["mse"], help="MSE-optimal clipping of each group's grid")
    p.add_argument("--fp-targets", action=on_off, default=DEFAULTS["fp_targets"],
                   help="fit each layer to the fp model's outputs, not its own on quantized inputs (GPTAQ)")
    p.add_argument("--fp-target-damp", type=float, default=None,
                   help="damping of the fp-target correction, a fraction of mean diag(H) (default 0.1)")
    p.add_argument("--refine-scales", action=on_off, default=DEFAULTS["refine_scales"],
                   help="re-fit group scales to GPTQ's levels by least squares on H after the solve")
    p.add_argument("--refine", action=on_off, default=False,
                   help="after GPTQ, tune each block's group scales against the fp block's outputs (Adam, "
                        "offline_quant/refine.py); GPTQ's codes and the checkpoint format stay")
    p.add_argument("--refine-iters", type=int, default=None, metavar="N",
                   help="refinement steps per block, one calibration batch each (default %d)" % DEFAULT_REFINE_ITERS)
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="quantize all of a block's Linears from fp inputs (faster, slightly worse)")
    p.add_argument("--format", dest="checkpoint_format", choices=fmt.FORMATS, default="gptq")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=bits:B,group_size:G",
                   help="per-module override (re.match on the module name), repeatable")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX", help="leave matching modules fp")
    p.add_argument("--calib", nargs="+", default=list(DEFAULT_CALIB),
                   help="calibration sources: mix (default), pydocs, shakespeare, corpus:split, .txt/.jsonl "
                        "files or HF dataset folders")
    p.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES)
    p.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-dtype", choices=FORWARD_DTYPES, default=DEFAULT_FORWARD_DTYPE,
                   help="dtype of the calibration forward passes; auto: bf16 on GPUs and on CPUs with "
                        "AVX512-BF16 or AMX (2-4x faster there), fp32 elsewhere")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="calibration samples per forward")
    p.add_argument("--device", choices=devices.DEVICES, default="auto",
                   help="where GPTQ runs: auto (the GPU when torch sees one), cuda or cpu; under torchrun "
                        "each rank takes its node's GPU LOCAL_RANK")
    p.add_argument("--offload-activations", action="store_true",
                   help="on a GPU, keep the calibration activations in pinned CPU memory (when they do not fit)")
    p.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (rank 0's solve of a group) "
                        "before it stops with an error naming the ranks that did not answer")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run of the same command (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="discard an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args) -> fmt.QuantConfig:
    if args.refine_iters is not None and (args.refine_iters < 1 or not args.refine):
        raise fmt.FormatError(f"--refine-iters {args.refine_iters}: needs --refine and a count >= 1")
    dynamic: dict[str, dict[str, Any]] = {f"-:{regex}": {} for regex in args.skip}
    dynamic.update(parse_rule(r) for r in args.rule)
    return fmt.QuantConfig(bits=args.bits, group_size=args.group_size, desc_act=args.act_order,
                           static_groups=args.static_groups, sym=args.sym,
                           damp_percent=args.damp_percent, true_sequential=args.true_sequential,
                           checkpoint_format=args.checkpoint_format, lm_head=args.lm_head, dynamic=dynamic,
                           meta={**{k: True for k in ("mse", "fp_targets", "refine_scales") if getattr(args, k)},
                                 **({"fp_target_damp": args.fp_target_damp} if args.fp_target_damp is not None else {}),
                                 **({"refine": {"iters": args.refine_iters or DEFAULT_REFINE_ITERS}}
                                    if args.refine else {})})


def run(args) -> int:
    cfg = config_from_args(args)
    calib = Calibration(tuple(args.calib), args.nsamples, args.seqlen, args.seed, args.forward_dtype, args.device)
    if args.method == "rtn":
        path, rep = rtn.quantize_checkpoint(args.model, args.out, cfg, overwrite=args.overwrite,
                                            threads=args.threads, progress=args.progress)
    else:
        try:
            path, rep = driver.quantize_model(args.model, args.out, cfg, calib, resume=args.resume,
                                              overwrite=args.overwrite, batch_size=args.batch_size,
                                              threads=args.threads, progress=args.progress,
                                              offload_activations=args.offload_activations,
                                              dist_timeout=args.dist_timeout)
        except stopping.Interrupted as e:  # not an error: the exit status names the signal, as a shell's does
            print(f"vllm-gptq quantize: {e}", file=sys.stderr)
            return 128 + e.signum
    if rep is None:  # a rank other than 0 of a distributed run: rank 0 prints the report
        return 0
    print(rpt.table(rep["layers"]))
    print(rpt.summary(rep))
    print(f"checkpoint written to {path} (report: {path / rpt.REPORT_FILE})")
    return 0
