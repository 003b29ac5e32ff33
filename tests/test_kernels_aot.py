"""The Triton kernels compiled for Hopper (sm_90) without a GPU (kernels/triton_aot.py): every tile the
plan gives an H200 (132 SMs, 232,448 B of shared memory per block) when no tuned table entry exists
must compile, fit the chip's shared memory, stay within triton_tiles' own estimate (which `fit` relies
on to shrink tiles) and not spill registers. On the GPU, 3-bit tiles once asked for 254,720 B and did
not launch; this catches such a tile in CI.

Needs Triton's ptxas and cuobjdump (in the triton wheel) and runs in its own process, since this one
imports triton in interpreter mode (conftest.py)."""
import json
import os
import subprocess
import sys

import pytest

from vllm_gptq_plugin.kernels import triton_tiles

H200_SMEM = 232448
# 3-bit: two weight planes, the largest tiles; 4-bit: the common case; gather mode (act-order shards)
# for both; 2 and 8 bits on the default group. The K x N of a 8B model's gate/up projection.
SURVEYS = [(["3", "4"], ["128", "0"]), (["2", "8"], ["128"])]


@pytest.mark.parametrize("bits,groups", SURVEYS, ids=["bits3-4", "bits2-8"])
def test_every_planned_tile_compiles_for_sm90_within_shared_memory_and_registers(bits, groups):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "vllm_gptq_plugin.kernels.triton_aot", "--json",
                           "--shape", "4096x14336", "--bits", *bits, "--group", *groups],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    # every bucket of every (bits, group) plan was compiled
    for b in bits:
        for g in groups:
            served = sorted(x for r in rows if (r["bits"], r["group"]) == (int(b), int(g)) for x in r["buckets"])
            assert served == list(triton_tiles.BUCKETS), (b, g, served)
    for r in rows:
        where = f"{r['bits']}-bit group {r['group']} tile {r['tile']}"
        assert r["shared"] <= H200_SMEM, where
        assert r["shared"] <= r["smem_estimate"], f"{where}: compiled to {r['shared']} B, estimated {r['smem_estimate']}"
        assert r["local"] == 0, f"{where} spills {r['local']} B of registers per thread"
        assert r["registers"] <= 255, where
    # M = 1 of 2/4/8-bit layers takes the word-wise GEMV, whose registers stay far from the cap
    for r in rows:
        if r["buckets"] == [1] and r["bits"] != 3 and r["group"] != 0:
            assert r["tile"][0] == "gemvw" and r["registers"] < 192, r
