"""Which CPU path serves M rows of a layer, chosen from timings taken on this machine.

The best path depends on the CPU family, not only on M: on an AMD EPYC with AVX-512 the fused kernel
beats dense bf16 up to M = 256, on an Intel Xeon with AMX oneDNN's dense GEMM (and so the tiles path,
which feeds it) wins from M ~ 16, and on AVX2 there is no fused kernel at all. So no threshold is
tuned on one machine: `vllm-gptq tune-cpu` times every path a layer's layout allows (cpu.py) at a few
M buckets and layer shapes and writes a table for this machine; `path` picks from it.

    vllm-gptq tune-cpu            # time and write the table (a minute or two on 2 cores)
    vllm-gptq tune-cpu --show     # print this machine's table and where it lives

Paths: "fused" (a layer with fused segments), "int4pack" (torch's kernel, int4pack layout), "tiles"
(dequantized W^T tiles + dense GEMM; any layout but the fused kernel's blocked 8-bit one).

Table: TABLE_DIR/<machine id>.json, one per machine (CPU model, the ISA flags that pick kernels, torch
version, threads), so that a home folder shared between machines never mixes them:

    {"version": 1, "machine": {...machine()...},
     "entries": {"<layout>/<dtype>/k<K>/n<N>": {"<M>": {"<path>": ms, ...}, ...}, ...}}

layout is "int4pack+fused" or "int4pack" (only layouts with a choice are timed). A layer takes the
entry of its layout and dtype nearest in log K + log N; M takes the smallest timed M >= it (the
largest for larger M); the path is the fastest timed there that the layer has (ties: PATHS order).
Without an entry, `default`: a rule from what was measured on both machine families here. A
table that cannot be read, of another version, or made on another machine is ignored with a warning.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PATHS = ("fused", "int4pack", "tiles")  # tie-break order: the fewest passes over memory first
VERSION = 1
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
TABLE_DIR = Path(os.environ.get("VLLM_GPTQ_CPU_TABLES")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm_gptq_plugin" / "cpu")
TUNE_MS = (1, 4, 16, 64, 256)
TUNE_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # K x N: attention, MLP up, MLP down
MAX_COPIES = 256  # of one layer, streamed through per timing (a 4096x4096 layer: 2 GiB)
INT4PACK_MAX_M = 16  # DEFAULT's int4pack / tiles crossover in bf16 (AMD EPYC AVX-512, 2 threads, 4096x4096)


def default(paths: tuple[str, ...], dtype: torch.dtype, m: int) -> str:
    """The rule without a table, from what was measured on both machine families here: fused where the
    layer has it; int4pack only in bf16 (in fp32 torch's int4pack kernel ran 24-60x slower than dense
    fp32 on an AMD EPYC with AVX2: tiles feed the fp32 GEMM instead), up to INT4PACK_MAX_M rows where
    the CPU has a fast bf16 GEMM (AVX512-BF16, AMX) for tiles to feed, at every M where it has not
    (AVX2: a bf16 GEMM there ran 6x slower than fp32, int4pack 20x faster than tiles at M = 64)."""
    if "fused" in paths:
        return "fused"
    if "int4pack" in paths and dtype == torch.bfloat16 and (m <= INT4PACK_MAX_M or not fast_bf16_gemm()):
        return "int4pack"
    return "tiles"


@functools.cache
def fast_bf16_gemm() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(machine()["isa"]))


def layout_key(paths: tuple[str, ...], dtype: torch.dtype, k: int, n: int) -> str:
    layout = "int4pack+fused" if "fused" in paths else "int4pack"
    return f"{layout}/{str(dtype).removeprefix('torch.')}/k{k}/n{n}"


# ---------------------------------------------------------------------------------------------
# The machine and its table
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    """What a table is valid for: timings move with every one of these."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def table_path(m: dict | None = None) -> Path:
    m = m or machine()
    digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]
    return TABLE_DIR / f"{digest}.json"


@functools.cache
def _entries(path: Path, m_json: str) -> dict:
    """The table's entries, {} (with a warning) when it is missing, unreadable or not this machine's."""
    if not path.exists():
        log.info("vllm_gptq_plugin: no CPU kernel table for this machine (%s): the default dispatch; "
                 "`vllm-gptq tune-cpu` measures one", path)
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, this package reads {VERSION}")
        if data.get("machine") != json.loads(m_json):
            raise ValueError(f"made on {data.get('machine')}, not this machine")
        entries = data["entries"]
        for key, by_m in entries.items():  # shape checks: a bad entry would fail at the first forward
            _parse_key(key)
            for mm, times in by_m.items():
                if int(mm) < 1 or not times or any(p not in PATHS or not float(t) > 0 for p, t in times.items()):
                    raise ValueError(f"entry {key} M={mm}: {times!r}")
        return entries
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("vllm_gptq_plugin: ignoring the CPU kernel table %s (%s); the default dispatch until "
                    "`vllm-gptq tune-cpu` rewrites it", path, e)
        return {}


def _parse_key(key: str) -> tuple[str, str, int, int]:
    layout, dtype, k, n = key.split("/")
    return layout, dtype, int(k.removeprefix("k")), int(n.removeprefix("n"))


@functools.cache
def plan(paths: tuple[str, ...], dtype: torch.dtype, k: int, n: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(M limits, path per limit) for a layer with these paths; empty when the default rule applies."""
    if len(paths) < 2:
        return (), ()
    m = machine()
    entries = _entries(table_path(m), json.dumps(m, sort_keys=True))
    layout, dt = layout_key(paths, dtype, k, n).split("/")[:2]
    near = [(abs(math.log(kk / k)) + abs(math.log(nn / n)), key) for key in entries
            for lay, d, kk, nn in [_parse_key(key)] if (lay, d) == (layout, dt)]
    if not near:
        return (), ()
    by_m = entries[min(near)[1]]
    limits = tuple(sorted(int(mm) for mm in by_m))
    picks = []
    for mm in limits:
        times = {p: float(t) for p, t in by_m[str(mm)].items() if p in paths}
        picks.append(min(times, key=lambda p: (times[p], PATHS.index(p))) if times else default(paths, dtype, mm))
    return limits, tuple(picks)


def path(paths: tuple[str, ...], dtype: torch.dtype, k: int, n: int, m: int) -> str:
    """The path for M rows: from this machine's table, else `default`."""
    limits, picks = plan(paths, dtype, k, n)
    if not limits:
        return default(paths, dtype, m)
    return picks[min(bisect.bisect_left(limits, m), len(picks) - 1)]


def clear_cache() -> None:
    """Forget the table read (after `tune-cpu` wrote one, or in tests)."""
    _entries.cache_clear()
    plan.cache_clear()


# ---------------------------------------------------------------------------------------------
# Timing: `vllm-gptq tune-cpu`
# ---------------------------------------------------------------------------------------------

def l3_bytes() -> int:
    """The largest cache sysfs lists for CPU 0 (0 when it cannot be read)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=0)


def time_ms(fns, min_time: float, min_reps: int = 5, warm_up: bool = True) -> float:
    """Best ms per call over >= min_reps cycles through `fns` and >= min_time seconds, after one warm-up
    cycle (the minimum, not the median: on a shared machine other processes only ever add time)."""
    def cycle():
        for f in fns:
            f()
    if warm_up:
        cycle()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        cycle()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3 / len(fns)


def measure(shapes=None, ms=None, dtype: torch.dtype = torch.bfloat16, min_time: float = 0.2,
            stream_bytes: int | None = None, timer=None) -> dict:
    """Time every path of every layout with a choice, per shape and M: the table's entries. Each case
    cycles through copies of its layer larger than stream_bytes (default 2x the L3: weights come from
    memory, as in serving, where every layer streams in turn). timer(key, fns) -> ms replaces the
    clock (tests)."""
    from . import cpu, prepare
    from .testing import random_layer
    shapes, ms = shapes or TUNE_SHAPES, ms or TUNE_MS
    stream = 2 * l3_bytes() if stream_bytes is None else stream_bytes
    timer = timer or (lambda key, fns: time_ms(fns, min_time))
    entries: dict[str, dict] = {}
    for k, n in shapes:
        t = random_layer(n, k, 4, 128)
        first = prepare(**t, bits=4, dtype=dtype, backend="int4pack")
        copies = min(max(1, math.ceil(stream / first.nbytes())), MAX_COPIES)
        layers = [first] + [prepare(**t, bits=4, dtype=dtype, backend="int4pack") for _ in range(copies - 1)]
        paths = cpu.paths(first.impl)
        by_m = entries.setdefault(layout_key(paths, dtype, k, n), {})
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            fns = {"fused": cpu.fused_gemm, "int4pack": cpu.int4pack_gemm, "tiles": cpu.dequant_gemm}
            by_m[str(m)] = {p: round(timer((k, n, m, p), [lambda f=fns[p], w=w: f(x, w.impl) for w in layers]), 4)
                            for p in paths}
            log.info("tune-cpu: %dx%d M=%d %s", k, n, m, by_m[str(m)])
    return entries


def write(entries: dict, path: Path | None = None) -> Path:
    """Write this machine's table (atomically: a reader never sees half a file)."""
    m = machine()
    path = path or table_path(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"version": VERSION, "machine": m, "entries": entries}, indent=1))
    os.replace(tmp, path)
    clear_cache()
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--show", action="store_true", help="print this machine's table and where it lives; time nothing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads to time with (default: torch's); a table holds for one thread count, "
                        "so tune with the count the server will use (vLLM: its OMP threads)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timing")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine()
    path = table_path(m)
    if not args.show:
        t0 = time.perf_counter()
        entries = measure(dtype=getattr(torch, args.dtype), min_time=args.min_time)
        old = _entries(path, json.dumps(m, sort_keys=True)) if path.exists() else {}
        write({**old, **entries}, path)
        print(f"measured in {time.perf_counter() - t0:.0f} s")
    print(show(m, path))
    return 0


def show(m: dict, table: Path) -> str:
    """The table as text: per entry and M, ms per path and the pick."""
    clear_cache()
    entries = _entries(table, json.dumps(m, sort_keys=True))
    lines = [f"CPU kernel table {table}", f"machine: {m['cpu']} ({', '.join(m['isa'])}; torch {m['torch']}, "
             f"capability {m['torch_capability']}, {m['threads']} threads)"]
    if not entries:
        return "\n".join(lines + ["no table: the default dispatch (cpu_dispatch.default: fused, else int4pack "
                                  f"in bf16 up to M={INT4PACK_MAX_M} or at every M without a fast bf16 GEMM, "
                                  "else tiles); `vllm-gptq tune-cpu` measures one"])
    for key, by_m in sorted(entries.items()):
        layout, dtype, k, n = _parse_key(key)
        paths = tuple(p for p in PATHS if any(p in t for t in by_m.values()))
        for mm in sorted(by_m, key=int):
            times = " ".join(f"{p} {by_m[mm][p]:.3f}" for p in PATHS if p in by_m[mm])
            lines.append(f"{layout:>15} {dtype:>9} {k:>6}x{n:<6} M={mm:<4} {times}  -> "
                         f"{path(paths, getattr(torch, dtype), k, n, int(mm))}")
    return "\n".join(lines)

