"""Dequant-GEMM benchmark: gptq_gemm against the dense GEMM, side by side, measured in one run.

    .venv/bin/python benchmarks/kernels.py                 # CPU: 4096x4096 and 4096x11008 (K x N)
    .venv/bin/python benchmarks/kernels.py --quick         # CPU smoke run (small shapes, seconds)
    python benchmarks/kernels.py --gpu                     # GPU: the Triton table (below)
    python benchmarks/kernels.py --gpu --quick             # its smoke run (runs in Triton's interpreter too)

A served model streams every layer's weights from memory once per step, so each case cycles through
enough copies of its layer (its own copies for every column) that they exceed the last-level cache:
2x L2 on a GPU (at least 256 MiB), 2x L3 on a CPU (read from sysfs); --hot times one copy instead.

GPU (--gpu): K x N in 4096x4096, 4096x14336, 14336x4096, 8192x28672, M in 1..4096, bf16, group 128,
µs per call under a CUDA graph (triton.testing.do_bench_cudagraph): cuBLAS bf16 (F.linear), ours at
2/3/4/8 bits and 4-bit act-order, torch's int4 tinygemm (_weight_int4pack_mm, the anchor a user has
without this package); speedups over cuBLAS; effective GB/s of the 4-bit call (weights + x + y) next
to the copy bandwidth measured in the same run; and the 4-bit call's eager time minus its graph time
(host overhead per call).

CPU: dense bf16 and fp32 F.linear, gptq_gemm (bf16 activations) and the path the dispatch took
(kernels.cpu.path: this machine's table from `vllm-gptq tune-cpu`, else the default rule), and each
candidate path forced where the layer's layout allows it (int4pack kernel, fused bf16 kernel,
dequantized W^T tiles + GEMM); speedup = dense / gptq; resident weight memory / bf16.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from vllm_gptq_plugin import kernels
from vllm_gptq_plugin.kernels import cpu, cpu_ext
from vllm_gptq_plugin.kernels.cpu_dispatch import l3_bytes, machine, table_path, time_ms
from vllm_gptq_plugin.kernels.testing import random_layer

GPU_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
GPU_MS = (1, 4, 16, 32, 64, 128, 256, 1024, 4096)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def tinygemm_copies(k: int, n: int, copies: int, group_size: int = 128):
    """torch's int4 GEMM operands: weight [N, K/2] uint8 packed by _convert_weight_to_int4pack
    (inner K tiles 8) and scales_and_zeros [K/gs, N, 2] bf16 (gpt-fast's recipe)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    w = torch._convert_weight_to_int4pack(packed, 8)
    sz = torch.randn(k // group_size, n, 2, device="cuda", dtype=torch.bfloat16)
    return [(w.clone(), sz.clone()) for _ in range(copies)]


def copy_bandwidth_gbs(bench_us) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_us([lambda: dst.copy_(src)]) / 1e3


def gpu_table(args) -> None:
    from vllm_gptq_plugin.kernels import triton_tune
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float16  # the interpreter's bf16 tl.dot is wrong
    shapes, ms = (((256, 128),), (1, 16)) if args.quick else (GPU_SHAPES, tuple(args.ms or GPU_MS))
    if on_gpu:
        import triton
        props = torch.cuda.get_device_properties(device)
        stream = 0 if args.hot else max(256 << 20, 2 * props.L2_cache_size)
        print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
              f"torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
              f"{copy_bandwidth_gbs(triton_tune.bench_us):.0f} GB/s (1 GiB copy, same run)")
    else:
        stream = 0
        print("no GPU: a smoke run in Triton's interpreter (fp16, one copy); the times mean nothing")
    print(f"{dtype}, group 128; us per call {'under a CUDA graph' if on_gpu else '(interpreter)'}; every case cycles through its own copies of "
          f"the layer, > {stream >> 20} MiB of weights (cache-{'hot' if args.hot else 'cold'}); "
          f"eager+ = eager time - graph time of the 4-bit call")
    cols = ["cuBLAS", "2b", "3b", "4b", "8b", "4b-act", "tiny4b"]
    head = (f"{'K x N':>11} {'M':>4} " + " ".join(f"{c:>8}" for c in cols) +
            f" {'4b/cuB':>6} {'3b/cuB':>6} {'2b/cuB':>6} {'8b/cuB':>6} {'act/4b':>6} {'4b/tiny':>7}"
            f" {'4b GB/s':>7} {'eager+':>7}")
    print(head)
    print("-" * len(head))
    for k, n in shapes:
        dense = torch.randn(n, k, device=device).to(dtype)
        dense = [dense] + [dense.clone() for _ in range(triton_tune.copies_for(dense.nbytes, stream) - 1)]
        ours = {f"{b}b": triton_tune.prepared_copies(k, n, b, device, dtype, stream_bytes=stream) for b in (2, 3, 4, 8)}
        ours["4b-act"] = triton_tune.prepared_copies(k, n, 4, device, dtype, act_order=True, stream_bytes=stream)
        tiny = tinygemm_copies(k, n, triton_tune.copies_for(n * k // 2, stream)) if on_gpu else None
        w4_bytes = ours["4b"][0].nbytes()
        for m in ms:
            x = torch.randn(m, k, device=device).to(dtype)
            us = {"cuBLAS": triton_tune.bench_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])}
            for key, ws in ours.items():
                us[key] = triton_tune.bench_us([lambda w=w: kernels.gptq_gemm(x, w) for w in ws])
            us["tiny4b"] = triton_tune.bench_us([lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1])
                                                 for t in tiny]) if tiny else math.nan
            eager = triton_tune.bench_us([lambda w=w: kernels.gptq_gemm(x, w) for w in ours["4b"]], cuda_graph=False)
            gbs = (w4_bytes + (m * k + m * n) * x.element_size()) / us["4b"] / 1e3
            print(f"{f'{k}x{n}':>11} {m:>4} " + " ".join(f"{us[c]:>8.2f}" for c in cols) +
                  f" {us['cuBLAS'] / us['4b']:>5.2f}x {us['cuBLAS'] / us['3b']:>5.2f}x {us['cuBLAS'] / us['2b']:>5.2f}x"
                  f" {us['cuBLAS'] / us['8b']:>5.2f}x {us['4b-act'] / us['4b']:>6.2f} {us['tiny4b'] / us['4b']:>6.2f}x"
                  f" {gbs:>7.0f} {eager - us['4b']:>7.2f}", flush=True)
        del dense, ours, tiny
        if on_gpu:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------

def cpu_name() -> str:
    m = machine()
    table = "its tuned CPU table" if table_path(m).exists() else "no tuned CPU table: the default dispatch"
    return f"{m['cpu']} ({', '.join(m['isa'])}; torch capability {m['torch_capability']}; {table})"


def copies(make, nbytes: int, stream: int) -> list:
    return [make() for _ in range(max(1, math.ceil(stream / nbytes)))]


def cpu_table(args, timer, emit) -> None:
    """The CPU table; timer(key, fns) -> ms per call (key names the case), emit prints a line.
    (The lambdas bind their tensors as defaults: --interleave calls them after the loops moved on.)"""
    shapes = [(512, 512), (512, 1408)] if args.quick else [(4096, 4096), (4096, 11008)]
    stream = 0 if (args.hot or args.quick) else 2 * l3_bytes()
    header = (f"{'K x N':>11} {'M':>4} {'bits':>4} {'bf16':>8} {'fp32':>8} {'gptq':>8} {'path':>8} "
              f"{'int4pack':>8} {'fused':>8} {'tiles':>8} {'vs bf16':>7} {'vs fp32':>7} {'mem/bf16':>8}")
    emit(f"each case cycles through > {stream >> 20} MiB of its own weight copies "
         f"({'cache-hot' if not stream else '2x the largest CPU cache'})")
    emit(header)
    emit("-" * len(header))
    for k, n in shapes:
        dense = torch.randn(n, k).bfloat16()
        bf16 = copies(dense.clone, dense.nbytes, stream)
        fp32 = copies(dense.float, 2 * dense.nbytes, stream)
        layers = {}
        for bits in args.bits:
            t = random_layer(n, k, bits, args.group_size, act_order=args.act_order)
            first = kernels.prepare(**t, bits=bits, dtype=torch.bfloat16)
            more = max(1, math.ceil(stream / first.nbytes())) - 1
            layers[bits] = [first] + [kernels.prepare(**t, bits=bits, dtype=torch.bfloat16) for _ in range(more)]
        for m in args.ms:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            lin = torch.nn.functional.linear
            t_bf16 = timer((k, n, m, "bf16"), [lambda x=x, d=d: lin(x, d) for d in bf16])
            t_fp32 = timer((k, n, m, "fp32"), [lambda x=x32, d=d: lin(x, d) for d in fp32])
            for bits, ws in layers.items():
                w = ws[0]
                t_q = timer((k, n, m, bits, "gptq"), [lambda x=x, w=w: kernels.gptq_gemm(x, w) for w in ws])
                xp = x if w.impl.perm is None else x.index_select(1, w.impl.perm)
                forced = {name: timer((k, n, m, bits, name), [lambda fn=fn, w=w, xp=xp: fn(xp, w.impl) for w in ws])
                          if ok else None for name, ok, fn in (
                              ("int4pack", w.backend == "int4pack", cpu.int4pack_gemm),
                              ("fused", w.impl.segments is not None, cpu.fused_gemm),
                              ("tiles", w.backend == "int4pack" or w.impl.q.dim() == 2, cpu.dequant_gemm))}
                forced = " ".join(f"{t:>8.3f}" if t is not None else f"{'-':>8}" for t in forced.values())
                mem = w.nbytes() / (n * k * 2)
                emit(f"{f'{k}x{n}':>11} {m:>4} {bits:>4} {t_bf16:>8.3f} {t_fp32:>8.3f} {t_q:>8.3f} "
                     f"{cpu.path(w.impl, m):>8} {forced} {t_bf16 / t_q:>6.2f}x {t_fp32 / t_q:>6.2f}x "
                     f"{mem:>8.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke run)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--ms", type=int, nargs="+", default=None, help="M values (CPU default 1 4 16 64 256)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--hot", action="store_true", help="time one copy of each layer (cache-hot)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timing (default 0.3; longer finds the quiet moments of a busy machine)")
    p.add_argument("--interleave", type=float, default=None, metavar="SECONDS",
                   help="time every case in turn, over and over for SECONDS, keep the best of each")
    p.add_argument("--gpu", action="store_true", help="the Triton table on a CUDA GPU (with --quick: any machine)")
    args = p.parse_args()
    if args.gpu:
        if not torch.cuda.is_available() and not args.quick:
            p.error("--gpu needs a CUDA device (this torch sees none); --gpu --quick runs the interpreter")
        return gpu_table(args)
    args.ms = args.ms or ([1, 16] if args.quick else [1, 4, 16, 64, 256])
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = args.min_time or (0.02 if args.quick else 0.3)
    ext = "compiled" if cpu_ext.load() is not None else "torch ops (extension not built)"
    how = (f"every case in turn for {args.interleave:.0f} s, best of each" if args.interleave
           else "best of >= 5")
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, group_size "
          f"{args.group_size}, act_order {args.act_order}, dequantizer: {ext}; ms per call ({how})")
    if not args.interleave:
        return cpu_table(args, lambda key, fns: time_ms(fns, min_time), print)
    # A busy machine: timing each case once catches whatever the other jobs do at that moment;
    # cycling through all of them for a long window gives each its quiet moments.
    cases, best = {}, {}
    cpu_table(args, lambda key, fns: cases.setdefault(key, fns) and 1.0, lambda *a, **kw: None)
    end = time.perf_counter() + args.interleave
    while time.perf_counter() < end:
        for key, fns in cases.items():
            best[key] = min(best.get(key, float("inf")), time_ms(fns, 0, min_reps=3))
    cpu_table(args, lambda key, fns: best[key], print)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    main()
