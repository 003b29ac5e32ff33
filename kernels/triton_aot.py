"""Compile the Triton kernels for a GPU architecture on a machine without that GPU, and report what each
tile of a layer's plan costs the chip: shared memory, registers, local memory (spills).

Triton compiles a kernel to PTX and ptxas assembles it for a target (GPUTarget("cuda", 90, 32) is
Hopper) without a device; only loading it needs one. So the launch failures of the GPU issue (tiles
asking for more shared memory than the SM has, OutOfResources at the first call) and register
spills can be caught in CI, before any device time is spent. Timings still need the GPU
(triton_tune.py).

    TRITON_INTERPRET=0 python -m vllm_gptq_plugin.kernels.triton_aot [--arch 90 --sms 132 --smem 232448]

Must run in a process where `triton` was not yet imported in interpreter mode (this module sets
TRITON_INTERPRET=0 first); the test suite calls it in a subprocess.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise ImportError("triton_aot needs triton's compiler, but triton was imported in interpreter mode "
                      "(TRITON_INTERPRET=1): run it in its own process")
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import triton_tiles  # noqa: E402
from .triton_gemm import gemm_kernel  # noqa: E402
from .triton_gemv import gemv_words_kernel  # noqa: E402

H200 = dict(arch=90, sms=132, smem=232448)  # measured on the device (the GPU issue)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class Compiled:
    shared: int       # bytes of shared memory per block, as the launch will ask for
    registers: int    # per thread
    local: int        # bytes of local memory per thread: register spills (and stack arrays)
    seconds: float


def compile_tile(tile: triton_tiles.Tile, bits: int, group: int, has_perm: bool, has_bias: bool,
                 dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> Compiled:
    """Compile the kernel `tile` names with ops._launch's arguments for sm_`arch`."""
    import time
    kernel = gemv_words_kernel if tile.kernel == "gemvw" else gemm_kernel
    t, names = DTYPES[dtype], kernel.arg_names
    # x, qweight, scales, zeros, g_idx, perm, bias, out, ws, counters; then M, N, K, K_PER_SPLIT, SPLIT_K, stride_xm
    pointers = [f"*{t}", "*i32", f"*{t}", "*i16", "*i32", "*i32", f"*{t}", f"*{t}", "*fp32", "*i32"]
    constexprs = dict(BITS=bits, GROUP=group, HAS_PERM=has_perm, HAS_BIAS=has_bias, BLOCK_M=tile.block_m,
                      BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, USE_SPLIT=tile.split_k > 1,
                      DOT=tile.kernel == "gemm")
    signature = dict(zip(names, pointers + ["i32"] * 6))
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(name),): value for name, value in constexprs.items()})
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    seconds = time.perf_counter() - t0
    registers, local = _resource_usage(compiled.asm["cubin"])
    return Compiled(compiled.metadata.shared, registers, local, seconds)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) as cuobjdump (shipped with Triton) reads them."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(tool), "-res-usage", fh.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output: {text!r}")
    return int(found.group(1)), int(found.group(2))


def plan_tiles(bits: int, group: int, k: int, n: int, dtype: torch.dtype, sms: int, smem: int
               ) -> dict[triton_tiles.Tile, list[int]]:
    """The distinct tiles of the layer's plan on a device with `sms` SMs and `smem` bytes per block,
    each with the M buckets it serves (the shipped table for that device name is not consulted: the
    rule of thumb, fitted to the limits, is what a device without a tuned entry gets)."""
    plan = triton_tiles.plan("aot", sms, smem, bits, group, k, n, dtype.itemsize)
    tiles: dict[triton_tiles.Tile, list[int]] = {}
    for bucket, tile in zip(plan.limits, plan.tiles):
        tiles.setdefault(tile, []).append(bucket)
    return tiles


def survey(bits_list, groups, k: int, n: int, arch: int, sms: int, smem: int):
    """One row per distinct tile of each (bits, group) plan of a K x N bf16 layer: (bits, group, the
    buckets it serves, the tile, the shared memory triton_tiles estimates, what it compiles to)."""
    for bits in bits_list:
        for group in groups:
            for tile, buckets in plan_tiles(bits, group, k, n, torch.bfloat16, sms, smem).items():
                yield (bits, group, buckets, tile, triton_tiles.smem_bytes(tile, bits, 2),
                       compile_tile(tile, bits, group, has_perm=group == 0, has_bias=True, arch=arch))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=H200["arch"], help="compute capability x 10 (90: Hopper)")
    ap.add_argument("--sms", type=int, default=H200["sms"])
    ap.add_argument("--smem", type=int, default=H200["smem"], help="shared memory per block (opt-in), bytes")
    ap.add_argument("--shape", default="4096x14336", help="K x N of the layer whose plan is compiled")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group", type=int, nargs="+", default=[128, 0],
                    help="GROUP constexprs: a group size, -1 one group, 0 gather mode (act-order shards)")
    ap.add_argument("--json", action="store_true", help="one JSON object per tile instead of the table")
    args = ap.parse_args(argv)
    k, n = (int(v) for v in args.shape.split("x"))
    if not args.json:
        print(f"sm_{args.arch}, {args.sms} SMs, {args.smem} B shared memory per block, layer {k}x{n}, bf16, "
              f"triton {triton.__version__}")
        print("bits group buckets        kernel  BM  BN  BK split warps stages | smem est   smem  regs local  s")
    for bits, group, buckets, tile, est, c in survey(args.bits, args.group, k, n, args.arch, args.sms, args.smem):
        if args.json:
            print(json.dumps(dict(bits=bits, group=group, buckets=buckets, tile=tile.as_list(), smem_estimate=est,
                                  **dataclasses.asdict(c))), flush=True)
            continue
        span = f"{buckets[0]}-{buckets[-1]}" if len(buckets) > 1 else str(buckets[0])
        print(f"{bits:>4} {group:>5} {span:<13} {tile.kernel:>6} {tile.block_m:>3} {tile.block_n:>3} "
              f"{tile.block_k:>3} {tile.split_k:>5} {tile.num_warps:>5} {tile.num_stages:>6} | "
              f"{est:>8} {c.shared:>6} {c.registers:>5} {c.local:>5} {c.seconds:>3.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
