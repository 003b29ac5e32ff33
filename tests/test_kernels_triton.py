"""The Triton kernels (GEMV and tensor-core GEMM, split-K or not) against tests/gptq_reference.py, a
packer and dequantizer written independently of vllm_gptq_plugin.format.

On a GPU the kernels run compiled (every dtype, bf16 included); with no GPU in Triton's interpreter
(kernels/triton_env.py chooses it only then). The interpreter multiplies bf16 wrongly in tl.dot (a
16x16 bf16 tl.dot of small integers is off by ~1e7 there, fp16 and fp32 are exact), so under the
interpreter bf16 runs through the GEMV only, whose products are fp32; TestDtypes states it.
Tolerance: max|y - ref| <= TOL[dtype] * max|ref| (gptq_reference.assert_close).
"""
import os

import pytest
import torch

import gptq_reference as ref
from vllm_gptq_plugin.kernels import gptq_gemm, ops, prepare, triton_env, triton_tiles  # noqa: F401
from vllm_gptq_plugin.kernels.triton_tiles import Tile

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DOT_DTYPES = (torch.float16, torch.float32) + ((torch.bfloat16,) if not INTERPRETED else ())
GEMV_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
CASES, ZERO_CONVENTIONS = ref.CASES, ref.ZERO_CONVENTIONS
MS = (1, 2, 3, 16, 33, 70)   # GEMV buckets, 16-row tiles with split-K, larger tiles


def layer(n, k, bits, gs, act=False, sym=False, fmt_="gptq", seed=0):
    t = ref.random_layer(n, k, bits, gs, act_order=act, sym=sym, checkpoint_format=fmt_, seed=seed)
    return {name: v.to(DEVICE) for name, v in t.items()}


def run_tile(x, w, tile, bias=None):
    """One launch of `tile` on prepared weights (the dispatch's own launcher, counters sized here)."""
    weights = list(w.tensors)
    weights[5] = torch.zeros(1024, dtype=torch.int32, device=x.device)
    x2 = x.reshape(-1, w.in_features)
    out = torch.empty(x2.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    perm = weights[4]
    y = ops._launch(tile, x2, weights, perm, bias, out, w.bits, w.meta[4], w.in_features, w.out_features)
    assert not weights[5].any(), "split-K counters must be back to zero after the call"
    return y


@pytest.mark.parametrize("sym,checkpoint_format", ZERO_CONVENTIONS)
@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_dispatch_matches_reference(bits, group_size, act_order, sym, checkpoint_format):
    n, k = 96, 256  # N=96 is not a multiple of BLOCK_N: exercises the N mask
    t = layer(n, k, bits, group_size, act_order, sym, checkpoint_format, seed=bits * 1000 + group_size)
    # Act-order alternates between its two modes across the matrix (both cover every bits).
    mode = "gather" if act_order and (group_size // 32 + (checkpoint_format == "gptq")) % 2 else "permute"
    w = prepare(**t, bits=bits, checkpoint_format=checkpoint_format, dtype=torch.float16,
                backend="triton", act_order_mode=mode)
    assert (w.meta[4] == 0) == (mode == "gather")
    assert (w.impl.perm.numel() > 0) == (act_order and mode == "permute")
    for m in MS:
        for dtype in DOT_DTYPES if m > 2 else GEMV_DTYPES:
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            ref.assert_close(gptq_gemm(x, w), ref.linear(x, t, bits, checkpoint_format), dtype)


@pytest.mark.parametrize("kernel,mode", [("gemv", "permute"), ("gemv", "gather"), ("gemm", "permute"),
                                         ("gemm", "gather"), ("gemvw", "permute")])  # gemvw: no gather mode
@pytest.mark.parametrize("split_k", [1, 3, 4])
def test_each_kernel_with_split_k_and_bias(kernel, split_k, mode):
    n, k, bits = 64, 512, 4  # split 3: the last split is shorter than the others
    t = layer(n, k, bits, 64, act=True, fmt_="gptq_v2", seed=7)
    w = prepare(**t, bits=bits, checkpoint_format="gptq_v2", dtype=torch.float32, backend="triton",
                act_order_mode=mode)
    bias = torch.randn(n, device=DEVICE)
    tile = Tile(kernel, {"gemv": 2, "gemvw": 1, "gemm": 16}[kernel], 32, 64, split_k, 4, 2)
    x = torch.randn(*((1,) if kernel == "gemvw" else (2, 5)), k, device=DEVICE)  # leading dims flattened
    y = run_tile(x, w, tile, bias)
    ref.assert_close(y, ref.linear(x.reshape(-1, k), t, bits, "gptq_v2", bias), torch.float32)
    assert torch.equal(run_tile(x, w, tile, bias), y), "split-K sums in a fixed order: same bits every call"


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("group_size", (-1, 32, 128))
def test_words_gemv_every_width_and_group(bits, group_size):
    n, k = 96, 256
    t = layer(n, k, bits, group_size, act=group_size == 32, seed=bits + group_size)
    w = prepare(**t, bits=bits, dtype=torch.float16, backend="triton")
    for dtype in GEMV_DTYPES:
        x = torch.randn(1, k, device=DEVICE).to(dtype)
        for split in (1, 2):
            y = run_tile(x, w, Tile("gemvw", 1, 64, 32, split, 4, 1))
            ref.assert_close(y, ref.linear(x, t, bits), dtype)


def test_tp_shard_g_idx_into_full_scales_falls_back_to_gather():
    # A row-parallel shard under act-order: half of K, g_idx pointing into all groups of the layer.
    n, k, bits = 64, 256, 3
    full = ref.random_layer(n, k, bits, 32, act_order=True, seed=3)
    words = k * bits // 32
    shard = {"qweight": full["qweight"][words // 2:].contiguous(), "qzeros": full["qzeros"],
             "scales": full["scales"], "g_idx": full["g_idx"][k // 2:].contiguous()}
    shard = {name: v.to(DEVICE) for name, v in shard.items()}
    w = prepare(**shard, bits=bits, backend="triton", dtype=torch.float32)  # asks for "permute"
    assert w.meta[4] == 0 and w.impl.perm.numel() == 0
    for m in (1, 3, 40):
        x = torch.randn(m, k // 2, device=DEVICE)
        ref.assert_close(gptq_gemm(x, w), ref.linear(x, shard, bits), torch.float32)


def test_batched_noncontiguous_empty_and_bias():
    t = layer(128, 256, 4, 128, act=True, seed=2)
    w = prepare(**t, bits=4, dtype=torch.float16, backend="triton")
    bias = torch.randn(128, device=DEVICE).half()
    for m in (0, 1, 40, 90):  # 90 > PERM_IN_KERNEL_MAX_M: x permuted on the host
        x = torch.randn(2, m, 512, device=DEVICE).half()[..., ::2]  # stride 2 along K
        y = gptq_gemm(x, w, bias)
        assert y.shape == (2, m, 128)
        if m:
            ref.assert_close(y.reshape(-1, 128), ref.linear(x.reshape(-1, 256), t, 4, "gptq", bias), torch.float16)


# ---------------------------------------------------------------------------------------------
# The tile table: what it may pick
# ---------------------------------------------------------------------------------------------

H200 = ("NVIDIA H200", 132, 232448)


def test_rule_of_thumb_tiles_pass_their_own_checks_on_every_bucket():
    for bits in (2, 3, 4, 8):
        for group in (-1, 0, 32, 128):
            for k, n in ((4096, 4096), (14336, 4096), (8192, 28672), (256, 96)):
                p = triton_tiles.plan(*H200, bits, group, k, n, 2)
                for i, (bucket, tile) in enumerate(zip(p.limits, p.tiles)):
                    last = i == len(p.tiles) - 1
                    assert triton_tiles.check(tile, bucket, group, k, bits, 2, H200[2], last) is None, tile


def test_tiles_over_the_shared_memory_limit_are_refused_and_shrunk():
    big = Tile("gemm", 128, 256, 128, 1, 8, 4)  # the 3-bit case that asked for 254,720 B on an H200
    assert "shared memory" in triton_tiles.check(big, 4096, 128, 8192, 3, 2, H200[2], True)
    small = triton_tiles.fit(big, 4096, 128, 8192, 3, 2, H200[2], True)
    assert triton_tiles.check(small, 4096, 128, 8192, 3, 2, H200[2], True) is None
    assert triton_tiles.smem_bytes(small, 3, 2) <= H200[2]


@pytest.mark.parametrize("tile,why", [
    (Tile("gemm", 16, 64, 128, 1, 4, 2), "does not divide the group size"),
    (Tile("gemm", 8, 64, 32, 1, 4, 2), "at least 16"),
    (Tile("gemv", 1, 96, 32, 1, 4, 1), "powers of two"),
    (Tile("gemm", 16, 64, 32, 4, 4, 2), "bounded bucket"),
    (Tile("warp", 16, 64, 32, 1, 4, 2), "unknown kernel"),
    (Tile("gemvw", 1, 64, 32, 1, 4, 1), "gemvw serves M = 1"),   # bucket 4096, not 1
])
def test_bad_tiles_are_refused_with_a_reason(tile, why):
    assert why in triton_tiles.check(tile, 4096, 64, 4096, 4, 2, H200[2], last=True)


def test_table_entries_nearest_shape_and_bad_entries(tmp_path, monkeypatch, caplog):
    table = {"version": 1, "devices": {"NVIDIA H200": {"layers": {
        "b4/g128/k4096/n4096": {"1": ["gemv", 1, 128, 128, 8, 4, 1], "16": ["gemm", 16, 64, 128, 99, 4, 9]},
        "b4/g128/k8192/n28672": {"1": ["gemv", 1, 256, 64, 4, 4, 1]}}}}}
    path = tmp_path / "tiles.json"
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setattr(triton_tiles, "TABLE", path)
    triton_tiles._table.cache_clear()
    triton_tiles.plan.cache_clear()
    try:
        exact = triton_tiles.plan(*H200, 4, 128, 4096, 4096, 2)
        assert exact.tile(1) == Tile("gemv", 1, 128, 128, 8, 4, 1)
        assert exact.tile(16) != Tile("gemm", 16, 64, 128, 99, 4, 9)   # K too short for 99 splits
        assert "dropped" in caplog.text
        near = triton_tiles.plan(*H200, 4, 128, 8192, 14336, 2)        # nearest: 8192 x 28672
        assert near.tile(1) == Tile("gemv", 1, 256, 64, 4, 4, 1)
        assert triton_tiles.plan(*H200, 3, 128, 4096, 4096, 2).tile(1).kernel == "gemv"  # rule of thumb
        path.write_text("{not json")
        triton_tiles._table.cache_clear()
        triton_tiles.plan.cache_clear()
        assert triton_tiles.plan(*H200, 4, 128, 4096, 4096, 2).tile(1) == \
            triton_tiles.fit(triton_tiles.rule_of_thumb(1, 128, 4096, 4096, 4, 132), 1, 128, 4096, 4, 2,
                             H200[2], False)
        assert "ignoring the Triton tile table" in caplog.text
    finally:
        triton_tiles._table.cache_clear()
        triton_tiles.plan.cache_clear()


def test_shipped_table_is_valid():
    data = __import__("json").loads(triton_tiles.TABLE.read_text())
    assert data["version"] == 1 and isinstance(data["devices"], dict)
    for name, dev in data["devices"].items():
        for key, buckets in dev["layers"].items():
            bits, group, k, n = triton_tiles._parse_key(key)
            for bucket, entry in buckets.items():
                tile = Tile(entry[0], *entry[1:])
                last = int(bucket) == triton_tiles.BUCKETS[-1]
                assert triton_tiles.check(tile, int(bucket), group, k, bits, 2, 232448, last) is None, (name, key)


def test_tuner_writes_a_table_the_dispatch_then_follows(tmp_path, monkeypatch):
    from vllm_gptq_plugin.kernels import triton_tune
    out = tmp_path / "tiles.json"
    assert triton_tune.main(["--quick", "--out", str(out), "--bits", "4", "--budget-s", "20"]) == 0
    monkeypatch.setattr(triton_tiles, "TABLE", out)
    triton_tiles._table.cache_clear()
    triton_tiles.plan.cache_clear()
    try:
        name, sms, smem = triton_tiles.device_limits(torch.device(DEVICE))
        entry = __import__("json").loads(out.read_text())["devices"][name]["layers"]["b4/g128/k256/n128"]
        assert list(entry) == [str(b) for b in triton_tiles.BUCKETS]
        p = triton_tiles.plan(name, sms, smem, 4, 128, 256, 128, 2)
        assert [t.as_list() for t in p.tiles] == list(entry.values())
    finally:
        triton_tiles._table.cache_clear()
        triton_tiles.plan.cache_clear()


@pytest.mark.opt_in
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_larger_shape_matches_reference(bits):
    n, k = 512, 1024
    t = layer(n, k, bits, 128, act=True, seed=bits)
    w = prepare(**t, bits=bits, backend="triton")
    for m in (1, 64, 130):
        x = torch.randn(m, k, device=DEVICE).half()
        ref.assert_close(gptq_gemm(x, w), ref.linear(x, t, bits), torch.float16)
