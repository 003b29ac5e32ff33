"""GPTQ speed on one Linear, side by side: Hessian accumulation vs the machine's fp32 GEMM rate, and our
solve vs a plain paper-form solve (the reference gptq.py's fasterquant: Cholesky, cholesky_inverse,
Cholesky again, lazy blocks of 128, a per-column loop) at 1 and 2 threads.

    python benchmarks/quant_speed.py            # 4096x4096 Linear, 128 x 512 tokens, 4-bit g128
    python benchmarks/quant_speed.py --quick    # small shapes, a smoke run

Issue 4 targets: our solve >= 2x faster than the paper-form solve at its best thread count; the Hessian
accumulation >= 70% of the fp32 GEMM rate measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import grid
from vllm_gptq_plugin.offline_quant.gptq import GPTQ
from vllm_gptq_plugin.offline_quant.calibration import Calibration


def paper_form_solve(W: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int, sym: bool,
                     blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The reference fasterquant (IST-DASLab/gptq gptq.py), without act-order: returns Q [N, K]."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = grid.find_params(W, bits, sym)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=H.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = grid.find_params(W[:, (i1 + i):(i1 + i + groupsize)], bits, sym)
            q = grid.dequantize(grid.quantize(w, scale, zero, bits), scale, zero)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def calibration_batches(k: int, tokens_per_batch: int, distinct: int, seed: int = 0) -> list[torch.Tensor]:
    """`distinct` different [tokens, k] batches (reused cyclically): channel-correlated, uneven scales."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, k, generator=g) / 4
    channel_scale = torch.exp(0.5 * torch.randn(k, generator=g))
    return [(torch.randn(tokens_per_batch, k, generator=g)
             + torch.randn(tokens_per_batch, 64, generator=g) @ basis) * channel_scale for _ in range(distinct)]


def timed(fn, threads: int, repeat: int = 1):
    """(best wall time of `repeat` runs, last result) with torch set to `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out
    finally:
        torch.set_num_threads(old)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes: 1024x1024, 16 x 256 tokens")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    p.add_argument("--skip-paper", action="store_true", help="skip the paper-form solve (it is slow)")
    p.add_argument("--repeat", type=int, default=None, help="best of R runs per measurement "
                   "(default 3 with --quick, else 1)")
    args = p.parse_args(argv)
    R = args.repeat or (3 if args.quick else 1)
    N = K = 1024 if args.quick else 4096
    nbatches, seqlen = (16, 256) if args.quick else (128, 512)
    bits, group_size = 4, 128
    cfg = fmt.QuantConfig(bits=bits, group_size=group_size, sym=True)
    torch.manual_seed(0)
    layer = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    batches = calibration_batches(K, seqlen, distinct=min(nbatches, 16))
    flops = 2 * nbatches * seqlen * K * K
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"# Linear {N}x{K}, calibration {nbatches} x {seqlen} tokens, {bits}-bit g{group_size} sym")

    rows = []
    H = None
    A = torch.randn(K, K)
    for th in args.threads:
        t_sq, _ = timed(lambda: torch.mm(A, A), th, R)
        rows.append((f"fp32 GEMM {K}x{K}x{K}, {th} thread(s)", t_sq, f"{2 * K ** 3 / t_sq / 1e9:.1f} GFLOP/s", ""))
    del A
    for th in args.threads:
        def gemm():  # the same GEMMs without accumulation: the machine's fp32 rate for this shape
            for b in range(nbatches):
                x = batches[b % len(batches)]
                torch.mm(x.t(), x)
        t_gemm, _ = timed(gemm, th, R)

        def accumulate():
            g = GPTQ(layer, name="bench")
            for b in range(nbatches):
                g.add_batch(batches[b % len(batches)])
            return g
        t_h, g = timed(accumulate, th, R)
        H = g.H
        rows.append((f"Hessian accumulation, {th} thread(s)", t_h, f"{flops / t_h / 1e9:.1f} GFLOP/s",
                     f"{100 * t_gemm / t_h:.0f}% of torch.mm on the same shapes ({flops / t_gemm / 1e9:.1f} GFLOP/s)"))
        with Calibration(forward_dtype="bf16").hessian_gemms():  # what the quantizer runs by default
            t_hb, _ = timed(accumulate, th, R)
        rows.append((f"Hessian accumulation, bf16-forward setting, {th} thread(s)", t_hb,
                     f"{flops / t_hb / 1e9:.1f} GFLOP/s", f"{100 * t_gemm / t_hb:.0f}% of torch.mm (fp32)"))

    ours, paper = {}, {}
    for th in args.threads:
        def solve():
            g = GPTQ(layer, name="bench")
            g.H = H.clone()
            return g.fasterquant(cfg)
        ours[th], res = timed(solve, th, R)
    for th in ([] if args.skip_paper else args.threads):
        paper[th], Q_paper = timed(
            lambda: paper_form_solve(layer.weight.detach(), H, bits, group_size, True), th, R)
    best_paper = min(paper.values()) if paper else math.nan
    for th in args.threads:
        rows.append((f"solve, ours, {th} thread(s)", ours[th], "", f"speed-up {best_paper / ours[th]:.2f}x "
                     "over the paper form at its best thread count" if paper else ""))
    for th in paper:
        rows.append((f"solve, paper form, {th} thread(s)", paper[th], "", ""))
    if paper:  # same algorithm, so the same layer-output error up to fp32 rounding and grid placement
        W = layer.weight.detach()
        err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))  # noqa: E731  tr(dW H dW^T)
        rows.append(("check: tr(dW H dW^T) ours / paper form", err(res.Q) / err(Q_paper), "", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'seconds':>8}  {'rate':>16}  comparison")
    for name, sec, rate, cmp in rows:
        print(f"{name:<{width}}  {sec:>8.3f}  {rate:>16}  {cmp}")
    return rows


if __name__ == "__main__":
    main()
