"""The quantizer on a GPU at Llama scale (issue 16), side by side.

A model with Llama-3.1-8B's shapes (32 blocks, hidden 4096, MLP 14336, 8 KV heads, vocab 128256), or
Llama-3.2-1B's, is made from its config with random bf16 weights and saved, then quantized 4-bit g128
with the CLI's defaults (asym, act-order, MSE, fp targets) and 128 x 2048 calibration tokens, once as
is and once with --no-fp-targets, each a fresh `vllm-gptq quantize` process: wall time, peak GPU
memory against the bound (one block's weights in fp32 + the activation buffers + 2 GB), peak RSS.
First, on the same device, our solve next to the paper-form solve of benchmarks/quant_speed.py on the
shapes of one block's Linears (Hessians from 128 x 2048 random correlated tokens).

    python benchmarks/quant_gpu.py                     # on a GPU: solves, then 1B and 8B shapes, both runs
    python benchmarks/quant_gpu.py --shape llama-3.1-8b --runs no-fp-targets   # one piece of it
    python benchmarks/quant_gpu.py --tiny              # a tiny config on the CPU: that it all works

Issue 16's targets for the 8B shapes: <= 8 minutes with the defaults, <= 4 with --no-fp-targets, peak
GPU memory <= the bound. Calibration text is random words of a word-level tokenizer made here (no hub,
no corpus on the GPU machine); time and memory do not depend on what the tokens say. The printed
output goes under benchmarks/results/ with the device in its name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import models
from vllm_gptq_plugin.offline_quant.calibration import Calibration
from vllm_gptq_plugin.offline_quant.gptq import GPTQ

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import paper_form_solve  # noqa: E402  the reference solve has one owner

LLAMA3_ROPE = dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, **LLAMA3_ROPE,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         **LLAMA3_ROPE,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, **LLAMA3_ROPE),
}
RUNS = {"defaults": [], "no-fp-targets": ["--no-fp-targets"]}
TARGET_S = {("llama-3.1-8b", "defaults"): 480, ("llama-3.1-8b", "no-fp-targets"): 240}  # issue 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(shape: str, root: Path, device: torch.device, tokens: int) -> tuple[Path, Path]:
    """(model folder, calibration text) for `shape`, made once and reused: random bf16 weights made on
    `device`, a word-level tokenizer over the vocabulary, random words for twice `tokens` tokens."""
    folder, cfg = root / shape, dict(SHAPES[shape], model_type="llama")
    if not (folder / "config.json").exists():
        t0 = time.perf_counter()
        models.random_causal_lm(folder, cfg, torch.bfloat16, device)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
        print(f"# {shape}: made and saved in {time.perf_counter() - t0:.0f} s ({size:.1f} GB of bf16 safetensors)",
              flush=True)
    return folder, models.random_words(root / f"{shape}-calib.txt", cfg["vocab_size"], 2 * tokens)


def quantize(model: Path, calib: Path, out: Path, device: str, extra: list[str], nsamples: int, seqlen: int,
             threads: int | None) -> tuple[float, dict]:
    """One `vllm-gptq quantize` process: (its wall time, its quant_report.json)."""
    cmd = [sys.executable, "-m", "vllm_gptq_plugin.cli", "quantize", "--model", str(model), "--out", str(out),
           "--bits", "4", "--group-size", "128", "--calib", str(calib), "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--device", device, "--no-progress", "--overwrite", "--no-resume", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    report = json.loads((out / "quant_report.json").read_text())
    shutil.rmtree(out)  # an 8B checkpoint is ~6 GB: keep the disk for the next run
    return wall, report


def random_hessian_inputs(k: int, tokens: int, device: torch.device, distinct: int = 16, seed: int = 0):
    """`tokens` tokens of k channels in batches of up to 2048 (`distinct` different ones, reused):
    correlated through 64 directions, uneven channel scales, like quant_speed.calibration_batches."""
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(64, k, generator=g, device=device) / 4
    scale = torch.exp(0.5 * torch.randn(k, generator=g, device=device))
    per = min(2048, tokens)
    made = [(torch.randn(per, k, generator=g, device=device)
             + torch.randn(per, 64, generator=g, device=device) @ basis) * scale for _ in range(distinct)]
    return [made[i % distinct] for i in range(tokens // per)]


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def solves(shape: str, device: torch.device, tokens: int) -> list[str]:
    """Our solve (the defaults; and sym, no act-order, no MSE like the paper form) vs the paper form,
    on the shapes [N, K] of one block's Linears."""
    h, m = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    lines = [f"{'Linear N x K':<14} {'Hessian s':>9} {'TFLOP/s':>8} {'ours s':>7} {'ours plain s':>12} "
             f"{'paper s':>8} {'paper/ours plain':>16} {'paper/ours':>10} {'tr(dW H dW^T) plain/paper':>26}"]
    defaults = fmt.QuantConfig(bits=4, group_size=128, desc_act=True, sym=False, meta={"mse": True})
    plain = fmt.QuantConfig(bits=4, group_size=128, sym=True)
    for n, k in ((h, h), (m, h), (h, m)):  # q/o (k, v are narrower), gate/up, down
        torch.manual_seed(0)
        layer = torch.nn.Linear(k, n, bias=False, device=device)
        torch.nn.init.normal_(layer.weight, 0, 0.02)
        batches = random_hessian_inputs(k, tokens, device)
        g = GPTQ(layer, "bench")
        with Calibration(device=str(device)).hessian_gemms():  # the quantizer's GEMM mode for bf16 forwards
            t_h, _ = timed(lambda: [g.add_batch(x) for x in batches], device)
        H, g_tokens = g.H, g.nsamples
        del batches

        def ours(cfg):
            s = GPTQ(layer, "bench")
            s.H = H.clone()
            return s.fasterquant(cfg)
        t_ours, _ = timed(lambda: ours(defaults), device)
        t_plain, res = timed(lambda: ours(plain), device)
        t_paper, Q_paper = timed(lambda: paper_form_solve(layer.weight.detach(), H, 4, 128, True), device)
        W = layer.weight.detach()
        err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))  # noqa: E731
        lines.append(f"{f'{n} x {k}':<14} {t_h:>9.2f} {2 * g_tokens * k * k / t_h / 1e12:>8.1f} {t_ours:>7.2f} "
                     f"{t_plain:>12.2f} {t_paper:>8.2f} {t_paper / t_plain:>15.2f}x {t_paper / t_ours:>9.2f}x "
                     f"{err(res.Q) / err(Q_paper):>26.4f}")
        del g, H, res, Q_paper, layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: llama-3.2-1b, llama-3.1-8b")
    p.add_argument("--runs", default="defaults,no-fp-targets", help=f"comma-separated, of {sorted(RUNS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the quantizer (CPU)")
    p.add_argument("--work", default=os.environ.get("QUANT_GPU_WORK", "/tmp/quant_gpu"),
                   help="where the models are made (reused) and the checkpoints written (then removed)")
    p.add_argument("--skip-solves", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the tiny shape, 8 x 64 tokens, on the CPU: a smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.device, args.nsamples, args.seqlen = ["tiny"], "cpu", 8, 64
        args.threads = args.threads or 1
    shapes = args.shape or ["llama-3.2-1b", "llama-3.1-8b"]
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(RUNS):
        p.error(f"unknown runs {sorted(unknown)}: choose from {sorted(RUNS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    tokens = args.nsamples * args.seqlen
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    name = (f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} "
            f"GiB, CUDA {torch.version.cuda}") if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    print(f"# device: {name}; torch {torch.__version__}; {os.cpu_count()} CPUs; calibration {args.nsamples} x "
          f"{args.seqlen} tokens; 4-bit g128", flush=True)

    if not args.skip_solves:
        print(f"\n## solves on {device.type}, shapes of one {shapes[-1]} block, Hessians of {tokens} tokens "
              "(ours: the defaults, asym + act-order + MSE; plain: sym, no act-order, no MSE, as the paper form)",
              flush=True)
        for line in solves(shapes[-1], device, tokens):
            print(line, flush=True)

    for shape in shapes:
        model, calib = make_model(shape, root, device, tokens)
        c = SHAPES[shape]
        print(f"\n## {shape}: {c['num_hidden_layers']} blocks, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
              f"{c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}", flush=True)
        print(f"{'run':<14} {'wall s':>7} {'quantizer s':>11} {'target s':>8} {'peak GPU MiB':>12} {'bound MiB':>9} "
              f"{'= block fp32':>12} {'+ activations':>13} {'+ slack':>7} {'peak RSS MiB':>12}", flush=True)
        for run in runs:
            wall, rep = quantize(model, calib, root / f"{shape}-{run}-q", device.type, RUNS[run], args.nsamples,
                                 args.seqlen, args.threads)
            mem, peak = rep["memory"], rep["peak_gpu_mb"]
            target = TARGET_S.get((shape, run))
            gpu = (f"{peak:>12.0f} {mem['gpu_bound_mb']:>9.0f} {mem['block_mb']:>12.0f} {mem['activations_mb']:>13.0f} "
                   f"{2048:>7}") if peak is not None else f"{'-':>12} {'-':>9} {'-':>12} {mem['activations_mb']:>13.0f} {'-':>7}"
            verdict = []
            if target is not None:
                verdict.append("time " + ("met" if wall <= target else "MISSED"))
            if peak is not None:
                verdict.append("memory " + ("met" if peak <= mem["gpu_bound_mb"] else "MISSED"))
            print(f"{run:<14} {wall:>7.1f} {rep['wall_seconds']:>11.1f} {target or '-':>8} {gpu} "
                  f"{rep['peak_rss_mb']:>12.0f}  {', '.join(verdict)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
