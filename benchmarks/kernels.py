"""CPU dequant-GEMM benchmark: time per call of gptq_gemm vs dense F.linear, side by side, one run.

    .venv/bin/python benchmarks/kernels.py            # 4096x4096 and 4096x11008 (K x N), M 1..256
    .venv/bin/python benchmarks/kernels.py --quick    # small shapes, a smoke run (seconds)
    python benchmarks/kernels.py --gpu                # Triton vs cuBLAS fp16, 4096x4096 and 4096x14336

Columns per shape, M and bits: dense bf16 and fp32 F.linear (ms); gptq_gemm with bf16 activations
(ms) and the path the dispatch took (kernels.cpu_path); the candidate paths forced where the layer's
layout allows them (int4pack kernel, fused bf16 kernel, dequantized W^T tiles + GEMM), to re-tune the
dispatch; speedup = dense / gptq (> 1 is faster); resident weight memory / bf16. Targets (issue 5):
M=1 speedup vs bf16 >= 3.5; M >= 64 speedup >= 1/1.2 = 0.83; memory <= 0.3 (8-bit values alone are
0.5x bf16); 8-bit faster than bf16 at small M.
"""
from __future__ import annotations

import argparse
import time

import torch

from vllm_gptq_plugin import kernels
from vllm_gptq_plugin.kernels import cpu, cpu_ext
from vllm_gptq_plugin.kernels.testing import random_layer


def time_ms(fn, min_time: float, min_reps: int = 5, warm_up: bool = True) -> float:
    """Best ms per call over >= min_reps calls and >= min_time seconds, after one warm-up call (the
    minimum, not the median: on a shared machine other processes only ever add time)."""
    if warm_up:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def gpu_table(args) -> None:
    """Triton dequant-GEMM vs fp16 cuBLAS (torch.matmul), timed with CUDA events via triton's do_bench."""
    from triton.testing import do_bench
    shapes = [(4096, 4096), (4096, 14336)]
    print(f"{torch.cuda.get_device_name()}, fp16, group_size {args.group_size}, act_order {args.act_order} "
          f"({args.act_order_mode}); ms per call")
    print(f"{'K x N':>11} {'M':>4} {'bits':>4} {'cuBLAS':>8} {'triton':>8} {'speedup':>7}")
    for k, n in shapes:
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
        layers = {bits: kernels.prepare(**{name: t.cuda() for name, t in random_layer(
            n, k, bits, args.group_size, act_order=args.act_order).items()}, bits=bits, dtype=torch.float16,
            act_order_mode=args.act_order_mode) for bits in args.bits}
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_dense = do_bench(lambda: torch.matmul(x, dense.t()))
            for bits, w in layers.items():
                t_q = do_bench(lambda x=x, w=w: kernels.gptq_gemm(x, w))
                print(f"{f'{k}x{n}':>11} {m:>4} {bits:>4} {t_dense:>8.4f} {t_q:>8.4f} {t_dense / t_q:>6.2f}x",
                      flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke run)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timing (default 0.3; longer finds the quiet moments of a busy machine)")
    p.add_argument("--interleave", type=float, default=None, metavar="SECONDS",
                   help="time every case in turn, over and over for SECONDS, keep the best of each")
    p.add_argument("--gpu", action="store_true", help="Triton on CUDA vs cuBLAS fp16 (needs a GPU)")
    p.add_argument("--act-order-mode", choices=["permute", "gather"], default="permute",
                   help="--gpu with --act-order: how the Triton kernel serves act-order")
    args = p.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA device (this torch sees none)")
        return gpu_table(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = args.min_time or (0.02 if args.quick else 0.3)
    ext = "compiled" if cpu_ext.load() is not None else "torch ops (extension not built)"
    how = (f"every case in turn for {args.interleave:.0f} s, best of each" if args.interleave
           else "best of >= 5")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, group_size {args.group_size}, "
          f"act_order {args.act_order}, dequantizer: {ext}; ms per call ({how})")
    if not args.interleave:
        return cpu_table(args, lambda key, fn: time_ms(fn, min_time), print)
    # A busy machine: timing each case once catches whatever the other jobs do at that moment;
    # cycling through all of them for a long window gives each its quiet moments.
    cases, best = {}, {}
    cpu_table(args, lambda key, fn: cases.setdefault(key, fn) and 1.0, lambda *a, **kw: None)
    end = time.perf_counter() + args.interleave
    while time.perf_counter() < end:
        for key, fn in cases.items():
            fn()
            best[key] = min(best.get(key, float("inf")), time_ms(fn, 0, min_reps=3, warm_up=False))
    cpu_table(args, lambda key, fn: best[key], print)


def cpu_table(args, timer, emit) -> None:
    """The CPU table; timer(key, fn) -> ms per call of fn (key names the case), emit prints a line.
    (The lambdas bind their tensors as defaults: --interleave calls them after the loops moved on.)"""
    shapes = [(512, 512), (512, 1408)] if args.quick else [(4096, 4096), (4096, 11008)]
    header = (f"{'K x N':>11} {'M':>4} {'bits':>4} {'bf16':>8} {'fp32':>8} {'gptq':>8} {'path':>8} "
              f"{'int4pack':>8} {'fused':>8} {'tiles':>8} {'vs bf16':>7} {'vs fp32':>7} {'mem/bf16':>8}")
    emit(header)
    emit("-" * len(header))
    for k, n in shapes:
        dense_bf16 = torch.randn(n, k).bfloat16()
        dense_fp32 = dense_bf16.float()
        layers = {bits: kernels.prepare(**random_layer(n, k, bits, args.group_size, act_order=args.act_order),
                                        bits=bits, dtype=torch.bfloat16) for bits in args.bits}
        for m in args.ms:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            t_bf16 = timer((k, n, m, "bf16"), lambda x=x, d=dense_bf16: torch.nn.functional.linear(x, d))
            t_fp32 = timer((k, n, m, "fp32"), lambda x=x32, d=dense_fp32: torch.nn.functional.linear(x, d))
            for bits, w in layers.items():
                t_q = timer((k, n, m, bits, "gptq"), lambda x=x, w=w: kernels.gptq_gemm(x, w))
                forced = {name: timer((k, n, m, bits, name), lambda fn=fn, x=x, w=w: fn(x, w.impl)) if ok else None
                          for name, ok, fn in (
                              ("int4pack", w.backend == "int4pack", cpu.int4pack_gemm),
                              ("fused", w.impl.segments is not None, cpu.fused_gemm),
                              ("tiles", w.backend == "int4pack" or w.impl.q.dim() == 2, cpu.dequant_gemm))}
                forced = " ".join(f"{t:>8.3f}" if t is not None else f"{'-':>8}" for t in forced.values())
                mem = w.nbytes() / (n * k * 2)
                emit(f"{f'{k}x{n}':>11} {m:>4} {bits:>4} {t_bf16:>8.3f} {t_fp32:>8.3f} {t_q:>8.3f} "
                     f"{kernels.cpu_path(w, m):>8} {forced} {t_bf16 / t_q:>6.2f}x {t_fp32 / t_q:>6.2f}x "
                     f"{mem:>8.3f}", flush=True)

if __name__ == "__main__":
    main()
