"""Which kernel and tile serve M rows of a layer: the shipped table (triton_tiles.json, written on the
device by `python -m vllm_gptq_plugin.kernels.triton_tune`), else a rule of thumb; never a tile the
chip cannot launch.

`plan(...)` runs once per layer at prepare time and returns a Plan: one Tile per M bucket (BUCKETS;
M takes the smallest bucket >= M, the last bucket also serves every larger M). The op looks the bucket
up per call: no other per-call Python decides anything.

Table format (JSON): {"version": 1, "devices": {<torch.cuda.get_device_name()>: {"meta": {...},
"layers": {"b<bits>/g<group>/k<K>/n<N>": {"<bucket>": [kernel, BM, BN, BK, SPLIT_K, warps, stages]}}}}}
with kernel "gemv", "gemvw" (M = 1, words unpacked in registers) or "gemm" and group as in triton_weights (-1 one group, 0 gather). A layer absent from
the table takes the entries of the nearest tuned shape with the same bits and group class (log-distance
of K and N), then the rule of thumb. Entries that break a rule below are dropped with a warning.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)
TABLE = Path(__file__).with_name("triton_tiles.json")
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
KERNELS = ("gemv", "gemvw", "gemm")
# What a GPU without properties (Triton's interpreter) is taken to have.
INTERPRETER_SMS, INTERPRETER_SMEM = 4, 101376


@dataclasses.dataclass(frozen=True)
class Tile:
    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def as_list(self) -> list:
        return [self.kernel, self.block_m, self.block_n, self.block_k, self.split_k, self.num_warps,
                self.num_stages]


SAFE = Tile("gemm", 16, 64, 32, 1, 4, 1)  # launches on any GPU Triton supports (~20 KB of shared memory)


@dataclasses.dataclass(frozen=True)
class Plan:
    limits: tuple[int, ...]  # bucket upper bounds, ascending
    tiles: tuple[Tile, ...]

    def tile(self, m: int) -> Tile:
        return self.tiles[min(bisect.bisect_left(self.limits, m), len(self.tiles) - 1)]

    def counters_needed(self, n: int) -> int:
        """Arrival counters for the largest split-K launch of this plan (one per output tile)."""
        return max([math.ceil(m / t.block_m) * math.ceil(n / t.block_n)
                    for m, t in zip(self.limits, self.tiles) if t.split_k > 1] or [0])


def layer_key(bits: int, group: int, k: int, n: int) -> str:
    return f"b{bits}/g{group}/k{k}/n{n}"


def smem_bytes(tile: Tile, bits: int, x_bytes: int) -> int:
    """An upper estimate of the shared memory Triton gives the tile: the pipelined loads (x's tile and
    the int32 words of the weight tile, two loads for 3-bit planes) per stage, the dequantized operand
    on its way to the tensor cores, and the fp32 accumulator's layout change in the epilogue. The
    GEMVs keep nothing in flight there: only tl.sum's cross-warp scratch (compiled for sm_90 they take
    4 B to 2 KiB; triton_aot.py checks every estimate against the compiler's number)."""
    if tile.kernel in ("gemv", "gemvw"):
        return max(2 * tile.block_m * tile.block_n * 4, 4096)
    words = (2 if bits == 3 else 1) * tile.block_k * tile.block_n * 4
    per_stage = tile.block_m * tile.block_k * x_bytes + words
    return (max(tile.num_stages, 1) * per_stage + tile.block_k * tile.block_n * x_bytes
            + tile.block_m * tile.block_n * 4)


def check(tile: Tile, bucket: int, group: int, k: int, bits: int, x_bytes: int, smem_limit: int,
          last: bool) -> str | None:
    """Why a tile cannot serve this bucket of this layer, or None."""
    if tile.kernel not in KERNELS:
        return f"unknown kernel {tile.kernel!r}"
    sizes = (tile.block_m, tile.block_n, tile.block_k)
    if any(s < 1 or s & (s - 1) for s in sizes):
        return f"block sizes must be powers of two, found {sizes}"
    if tile.kernel == "gemm" and min(sizes) < 16:
        return "tl.dot needs blocks of at least 16"
    if tile.kernel == "gemvw" and (bucket != 1 or tile.block_m != 1 or bits == 3 or group == 0
                                   or tile.block_k < 32 // bits):
        return "gemvw serves M = 1 of 2/4/8-bit layers outside gather mode, BLOCK_K >= one word"
    if group > 0 and group % tile.block_k:
        return f"BLOCK_K={tile.block_k} does not divide the group size {group}"
    if tile.split_k < 1 or (tile.split_k > 1 and last):
        return "split-K needs a bounded bucket (its counters are sized per bucket)"
    if tile.split_k > 1 and k < tile.split_k * tile.block_k:
        return f"SPLIT_K={tile.split_k} leaves splits without a K tile (K={k})"
    if tile.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps={tile.num_warps}"
    need = smem_bytes(tile, bits, x_bytes)
    if need > smem_limit:
        return f"needs ~{need} B of shared memory, the device has {smem_limit} B per block"
    return None


def rule_of_thumb(bucket: int, group: int, k: int, n: int, bits: int, num_sms: int) -> Tile:
    """Decode is bandwidth-bound: GEMV at M <= 2, 16-row tensor-core tiles to 64 rows, K split until
    about 2 waves of programs cover the SMs (>= 4 K steps per split); larger M, larger tiles. At M = 1
    the word-wise GEMV where it applies: compiled for sm_90 it holds 63-133 registers a thread where
    "gemv" (a word per K row) hits the 255 cap (triton_aot.py)."""
    if bucket == 1 and bits != 3 and group != 0:
        kernel, bm, bn, bk, warps, stages = "gemvw", 1, 256, 128, 4, 1
    elif bucket <= 2:
        kernel, bm, bn, bk, warps, stages = "gemv", bucket, 64, 128, 4, 1
    elif bucket <= 64:
        kernel, bm, bn, bk, warps, stages = "gemm", 16 if bucket <= 16 else bucket, 64, 128, 4, 3
    elif bucket <= 128:
        kernel, bm, bn, bk, warps, stages = "gemm", 64, 128, 64, 4, 3
    else:
        kernel, bm, bn, bk, warps, stages = "gemm", 128, 128, 64, 8, 3
    if group > 0:
        bk = min(bk, group)
    split = 1
    if bucket <= 64:
        tiles = math.ceil(bucket / bm) * math.ceil(n / bn)
        split = max(1, min(math.ceil(2 * num_sms / tiles), k // (4 * bk), 16))
    return Tile(kernel, bm, bn, bk, split, warps, stages)


@functools.cache
def _table() -> dict:
    try:
        data = json.loads(TABLE.read_text())
        if data.get("version") != 1 or not isinstance(data.get("devices"), dict):
            raise ValueError("not a version-1 table")
        return data["devices"]
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:
        log.warning("vllm_gptq_plugin: ignoring the Triton tile table %s (%s); using rules of thumb", TABLE, e)
        return {}


def _tuned(device_name: str, bits: int, group: int, k: int, n: int) -> dict[int, Tile]:
    layers = _table().get(device_name, {}).get("layers", {})
    key = layer_key(bits, group, k, n)
    if key not in layers:  # nearest tuned shape of the same bits and group class
        cls = (group > 0, group == -1, group == 0)
        near = [(abs(math.log(kk / k)) + abs(math.log(nn / n)), name) for name in layers
                for b, g, kk, nn in [_parse_key(name)] if b == bits and (g > 0, g == -1, g == 0) == cls]
        if not near:
            return {}
        key = min(near)[1]
    out = {}
    for bucket, entry in layers[key].items():
        try:
            out[int(bucket)] = Tile(str(entry[0]), *(int(v) for v in entry[1:]))
        except (TypeError, ValueError):
            log.warning("vllm_gptq_plugin: bad tile entry %s[%s] = %r ignored", key, bucket, entry)
    return out


def _parse_key(name: str) -> tuple[int, int, int, int]:
    b, g, k, n = name.split("/")
    return int(b[1:]), int(g[1:]), int(k[1:]), int(n[1:])


@functools.cache
def device_limits(device: torch.device) -> tuple[str, int, int]:
    """(name, SMs, shared memory per block) of the device the kernels launch on (asked once per
    device: get_device_properties costs microseconds a call)."""
    if device.type != "cuda":
        return "interpreter", INTERPRETER_SMS, INTERPRETER_SMEM
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 101376
    return props.name, props.multi_processor_count, smem


@functools.cache
def plan(device_name: str, num_sms: int, smem_limit: int, bits: int, group: int, k: int, n: int,
         x_bytes: int) -> Plan:
    tuned = _tuned(device_name, bits, group, k, n)
    tiles = []
    for i, bucket in enumerate(BUCKETS):
        last = i == len(BUCKETS) - 1
        tile = tuned.get(bucket)
        why = tile and check(tile, bucket, group, k, bits, x_bytes, smem_limit, last)
        if why:
            log.warning("vllm_gptq_plugin: tuned tile %s for M<=%d of %s dropped: %s", tile.as_list(), bucket,
                        layer_key(bits, group, k, n), why)
        if tile is None or why:
            tile = fit(rule_of_thumb(bucket, group, k, n, bits, num_sms), bucket, group, k, bits, x_bytes,
                       smem_limit, last)
        tiles.append(tile)
    return Plan(BUCKETS, tuple(tiles))


def fit(tile: Tile, bucket: int, group: int, k: int, bits: int, x_bytes: int, smem_limit: int,
        last: bool) -> Tile:
    """Shrink a rule-of-thumb tile until `check` accepts it (fewer stages, then smaller K, N, M
    blocks), else SAFE."""
    for _ in range(16):
        if check(tile, bucket, group, k, bits, x_bytes, smem_limit, last) is None:
            return tile
        if tile.num_stages > 2:
            tile = dataclasses.replace(tile, num_stages=tile.num_stages - 1)
        elif tile.block_k > 32:
            tile = dataclasses.replace(tile, block_k=tile.block_k // 2)
        elif tile.block_n > 32:
            tile = dataclasses.replace(tile, block_n=tile.block_n // 2)
        elif tile.split_k > 1:
            tile = dataclasses.replace(tile, split_k=max(1, min(tile.split_k, k // tile.block_k) // 2))
        elif tile.block_m > 16:
            tile = dataclasses.replace(tile, block_m=tile.block_m // 2)
        else:
            break
    return SAFE
