"""Tune the Triton tiles on this GPU and write them into the table the package ships (triton_tiles.json):

    python -m vllm_gptq_plugin.kernels.triton_tune --out kernels/triton_tiles.json --budget-s 240

For each layer shape, bit width and tuned M (TUNED_MS), a coordinate search starts from the rule of
thumb (triton_tiles.rule_of_thumb) and moves one knob at a time (kernel, BLOCK_N, BLOCK_K, SPLIT_K,
warps, stages, BLOCK_M) while that makes the call faster, keeping only tiles `triton_tiles.check`
accepts. Each candidate is timed under a CUDA graph over enough copies of the layer that the weights
stream from memory, as they do in a served model (bench_us), never from the L2 cache. Buckets that are
not tuned take the tile of the next tuned bucket above. Shapes and bits are tuned in order of value
(decode on the large layers first), so a run cut short by --budget-s still writes what it found.
Without a GPU it runs in Triton's interpreter on small shapes (--quick): a check that the machinery
works, not a tuning.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from . import prepare, triton_tiles
from .testing import random_layer
from .triton_tiles import Tile

SHAPES = ((8192, 28672), (4096, 14336), (14336, 4096), (4096, 4096))  # K x N, largest first
TUNED_MS = (1, 16, 4, 32, 64, 128, 256, 1024, 4096)                  # decode first
GROUP_SIZE = 128
# The weights a timing cycles through exceed this many bytes (the H200's L2 is 60 MB).
STREAM_BYTES = 256 << 20


def bench_us(fns, cuda_graph: bool = True) -> float:
    """Microseconds per call of the functions in `fns`, called in turn (each on its own copy of a
    layer). On a GPU: triton.testing.do_bench_cudagraph (no host overhead) or do_bench (eager, host
    overhead included where it exceeds the GPU time); on a CPU: the best of a few wall-clock runs."""
    def run():
        for f in fns:
            f()
    if torch.cuda.is_available():
        import triton.testing
        ms = triton.testing.do_bench_cudagraph(run, rep=40) if cuda_graph else triton.testing.do_bench(run, rep=40)
        return ms * 1e3 / len(fns)
    run()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / len(fns)


def copies_for(nbytes: int, stream_bytes: int = STREAM_BYTES) -> int:
    """How many copies of a layer of `nbytes` a timing cycles through so that they exceed the cache."""
    return max(1, math.ceil(stream_bytes / max(nbytes, 1)))


def prepared_copies(k: int, n: int, bits: int, device, dtype, act_order: bool = False, stream_bytes=STREAM_BYTES):
    layer = random_layer(n, k, bits, GROUP_SIZE, act_order=act_order, device=device)
    first = prepare(**layer, bits=bits, dtype=dtype, backend="triton")
    return [first] + [prepare(**{name: t.clone() for name, t in layer.items()}, bits=bits, dtype=dtype,
                              backend="triton")
                      for _ in range(copies_for(first.nbytes(), stream_bytes) - 1)]


def time_tile(tile: Tile, ws, x: torch.Tensor) -> float:
    from . import ops
    m, n = x.shape[0], ws[0].out_features
    outs = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = math.ceil(m / tile.block_m) * math.ceil(n / tile.block_n)

    def call(w):  # the candidate may split K over more tiles than prepare sized the counters for
        weights = w.tensors[:5] + [torch.zeros(tiles, dtype=torch.int32, device=x.device)]
        return lambda: ops._launch(tile, x, weights, weights[4], None, outs, w.bits, w.meta[4],
                                   w.in_features, w.out_features)
    return bench_us([call(w) for w in ws])


def neighbours(tile: Tile, bucket: int) -> list[Tile]:
    r = dataclasses.replace
    out = [r(tile, kernel=kind, block_m=bm, num_stages=stages) for kind, bm, stages in
           (("gemm", 16, 3), ("gemv", min(bucket, 4), 1), ("gemvw", 1, 1))
           if bucket <= 4 and kind != tile.kernel]
    for f, values in (("block_n", (32, 64, 128, 256)), ("block_k", (32, 64, 128, 256)),
                      ("split_k", (1, 2, 4, 8, 16, 32)), ("num_warps", (2, 4, 8)), ("num_stages", (1, 2, 3, 4, 5)),
                      ("block_m", (16, 32, 64, 128, 256))):
        cur = getattr(tile, f)
        if f == "block_m" and tile.kernel == "gemv":
            continue
        i = values.index(cur) if cur in values else None
        for j in ((i - 1, i + 1) if i is not None else range(len(values))):
            if 0 <= j < len(values):
                out.append(r(tile, **{f: values[j]}))
    return out


def tune_bucket(ws, bucket: int, bits: int, group: int, k: int, n: int, limits, dtype, deadline: float,
                log) -> tuple[Tile, float, float]:
    """(best tile, its µs, the rule of thumb's µs) for M = bucket."""
    name, sms, smem = limits
    x_bytes = torch.empty((), dtype=dtype).element_size()
    last = bucket == triton_tiles.BUCKETS[-1]
    start = triton_tiles.fit(triton_tiles.rule_of_thumb(bucket, group, k, n, bits, sms), bucket, group, k,
                             bits, x_bytes, smem, last)
    x = torch.randn(bucket, k, device=ws[0].device).to(dtype)
    best, best_us = start, time_tile(start, ws, x)
    base_us, seen, improved = best_us, {start}, True
    while improved and time.time() < deadline:
        improved = False
        for cand in neighbours(best, bucket):
            if cand in seen or triton_tiles.check(cand, bucket, group, k, bits, x_bytes, smem, last):
                continue
            seen.add(cand)
            try:
                us = time_tile(cand, ws, x)
            except Exception as e:  # OutOfResources the estimate missed, a compile failure: not a candidate
                log(f"    {cand.as_list()} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            if us < best_us * 0.99:  # 1%: timing noise must not walk the search
                best, best_us, improved = cand, us, True
            if time.time() > deadline:
                break
    return best, best_us, base_us


def tune(shapes, bits_list, budget_s: float, dtype, log=print) -> dict[str, dict[str, list]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    limits = triton_tiles.device_limits(device)
    deadline = time.time() + budget_s
    layers = {}
    for k, n in shapes:
        for bits in bits_list:
            if time.time() > deadline:
                log(f"budget spent: {k}x{n} {bits}-bit and later not tuned")
                return layers
            ws = prepared_copies(k, n, bits, device, dtype,
                                 stream_bytes=STREAM_BYTES if device.type == "cuda" else 0)
            group = ws[0].meta[4]
            tuned = {}
            for bucket in TUNED_MS:
                if time.time() > deadline:
                    break
                tile, us, base = tune_bucket(ws, bucket, bits, group, k, n, limits, dtype, deadline, log)
                tuned[bucket] = tile
                log(f"{k:>6}x{n:<6} {bits}-bit M={bucket:<5} {us:9.2f} us (rule of thumb {base:9.2f}) "
                    f"{tile.as_list()}")
            if tuned:
                layers[triton_tiles.layer_key(bits, group, k, n)] = fill_buckets(tuned)
            del ws
    return layers


def fill_buckets(tuned: dict[int, Tile]) -> dict[str, list]:
    """Every bucket of triton_tiles.BUCKETS: its tuned tile, else the next tuned bucket's above (the
    last bucket's never splits K: its counters could not be sized)."""
    out = {}
    for i, bucket in enumerate(triton_tiles.BUCKETS):
        above = [b for b in sorted(tuned) if b >= bucket]
        tile = tuned[above[0]] if above else tuned[max(tuned)]
        if i == len(triton_tiles.BUCKETS) - 1 and tile.split_k > 1:
            tile = dataclasses.replace(tile, split_k=1)
        out[str(bucket)] = tile.as_list()
    return out


def write_table(path: Path, device_name: str, layers: dict, meta: dict) -> None:
    """Merge this device's layers into the table at `path` (written whole, then renamed: a crash
    never leaves half a table)."""
    data = json.loads(path.read_text()) if path.exists() else {"version": 1, "devices": {}}
    dev = data["devices"].setdefault(device_name, {"meta": {}, "layers": {}})
    dev["meta"] = meta
    dev["layers"].update(layers)
    for d in data["devices"].values():  # buckets in numeric order
        d["layers"] = {key: dict(sorted(b.items(), key=lambda kv: int(kv[0]))) for key, b in sorted(d["layers"].items())}
    text = json.dumps(data, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                  text)  # one tile per line
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="table to merge into (default on a GPU: the shipped one; without a GPU: required)")
    p.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's four layer shapes)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2, 8])
    p.add_argument("--budget-s", type=float, default=240.0, help="stop tuning after this many seconds")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run, e.g. in the interpreter)")
    args = p.parse_args(argv)
    if args.out is None:
        if not torch.cuda.is_available():
            p.error("no GPU: interpreter timings mean nothing for the shipped table; pass --out FILE")
        args.out = triton_tiles.TABLE
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else ((256, 128),) if args.quick else SHAPES)
    dtype = getattr(torch, args.dtype)
    if not torch.cuda.is_available() and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter's bf16 tl.dot is wrong (tests/test_kernels_triton.py)
    if args.quick:
        global TUNED_MS
        TUNED_MS = (1, 16)
    name = triton_tiles.device_limits(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]
    t0 = time.time()
    layers = tune(shapes, args.bits, args.budget_s, dtype)
    import triton
    meta = {"torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype).split(".")[-1],
            "made": datetime.date.today().isoformat(), "seconds": round(time.time() - t0),
            "group_size": GROUP_SIZE, "timed": "CUDA graph, weights streamed from memory (> L2)"
            if torch.cuda.is_available() else "Triton interpreter (a smoke run: not a tuning)"}
    write_table(args.out, name, layers, meta)
    print(f"wrote {len(layers)} layer entries for {name} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
