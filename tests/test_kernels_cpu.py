"""The CPU paths (int4pack for small M, dequant + dense GEMM for large M, generic dequant, the fused
bf16 kernel) against tests/gptq_reference.py (written independently of format.py): every bits x sym/asym x v1/v2 x act-order x group size, M in
{1, 3, 16, 33} (both sides of INT4PACK_MAX_M), bf16/fp16/fp32. Tolerance: max|y - ref| <= TOL * max|ref|
(int4pack folds zeros into a float offset (8 - zero) * scale rounded to T: one extra rounding in T).
"""
import pytest
import torch

import gptq_reference as ref
from vllm_gptq_plugin.kernels import cpu, cpu_dispatch, gptq_gemm, prepare
from gptq_reference import CASES, ZERO_CONVENTIONS, assert_close, random_layer

MS = (1, 3, 16, 33)


def reference(x, t, bits, checkpoint_format, bias=None):
    return ref.linear(x, t, bits, checkpoint_format, bias)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def test_small_m_and_large_m_both_tested():
    assert min(MS) <= cpu_dispatch.INT4PACK_MAX_M < max(MS)  # the default dispatch (no table in tests)


@pytest.mark.parametrize("sym,checkpoint_format", ZERO_CONVENTIONS)
@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_dispatched_path_matches_reference(bits, group_size, act_order, sym, checkpoint_format):
    n, k = 128, 256
    t = random_layer(n, k, bits, group_size, act_order=act_order, sym=sym,
                     checkpoint_format=checkpoint_format, seed=bits * 1000 + group_size)
    for dtype in DTYPES:
        w = prepare(**t, bits=bits, checkpoint_format=checkpoint_format, dtype=dtype)
        assert w.backend == ("int4pack" if bits <= 4 else "dequant")
        for m in MS:
            x = torch.randn(m, k).to(dtype)
            assert_close(gptq_gemm(x, w), reference(x, t, bits, checkpoint_format), dtype)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("act_order", [False, True])
def test_generic_dequant_path_matches_reference(bits, act_order):
    n, k = 96, 256  # N % 64 != 0: int4pack cannot take it, dispatch falls back
    t = random_layer(n, k, bits, 32, act_order=act_order, seed=bits)
    w = prepare(**t, bits=bits, dtype=torch.bfloat16)
    assert w.backend == "dequant"
    bias = torch.randn(n).bfloat16()
    for m in (1, 33):
        x = torch.randn(m, k).bfloat16()
        assert_close(gptq_gemm(x, w, bias), reference(x, t, bits, "gptq", bias), torch.bfloat16)


def test_int4pack_scales_and_zeros_convention():
    # torch's int4pack computes W = (q - 8) * s + zf: check it on a one-group layer by hand.
    n, k, gs = 64, 32, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    s, zero = torch.rand(1, n) + 0.5, torch.randint(0, 16, (1, n)).float()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s, (8 - zero) * s], dim=-1)
    x = torch.randn(2, k)
    want = x @ ((q.float() - zero.t()) * s.t()).t()
    torch.testing.assert_close(torch._weight_int4pack_mm_for_cpu(x, packed, gs, sz), want)


def test_act_order_tp_shard_with_uneven_groups_falls_back_and_matches():
    # A row-parallel shard: g_idx points into all groups of the full layer, runs are not 32-aligned.
    n, k, bits = 64, 256, 4
    full = random_layer(n, k, bits, 32, act_order=True, seed=5)
    shard = {"qweight": full["qweight"][16:].contiguous(), "qzeros": full["qzeros"],
             "scales": full["scales"], "g_idx": full["g_idx"][128:].contiguous()}
    w = prepare(**shard, bits=bits, dtype=torch.float32)
    assert w.backend == "dequant"
    x = torch.randn(5, 128)
    assert_close(gptq_gemm(x, w), reference(x, shard, bits, "gptq"), torch.float32)


def test_activation_dtype_other_than_prepared_dtype():
    t = random_layer(128, 256, 4, 64, seed=1)
    w = prepare(**t, bits=4, dtype=torch.bfloat16)
    x = torch.randn(3, 256)
    y = gptq_gemm(x, w)
    assert y.dtype == torch.float32
    assert_close(y.bfloat16(), reference(x.bfloat16(), t, 4, "gptq"), torch.bfloat16)


def test_int4pack_memory_within_budget_and_no_dense_copy():
    n, k = 1024, 1024
    w = prepare(**random_layer(n, k, 4, 128, act_order=True), bits=4, dtype=torch.bfloat16)
    assert w.backend == "int4pack"
    assert w.nbytes() <= 0.3 * n * k * 2
    assert not any(t.numel() >= n * k for t in vars(w.impl).values() if isinstance(t, torch.Tensor))


def test_int4pack_group_size_picks_largest_run():
    g = torch.arange(512) // 128
    assert cpu.int4pack_group_size(g) == 128
    assert cpu.int4pack_group_size(torch.zeros(512, dtype=torch.long)) == 256
    assert cpu.int4pack_group_size(torch.arange(512) // 16) == 0


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("bits,n", [(4, 192), (8, 160), (3, 96)])
def test_column_tiles_match_reference_with_and_without_extension(monkeypatch, compiled, bits, n):
    from vllm_gptq_plugin.kernels import cpu_ext
    if compiled:
        assert cpu_ext.load() is not None, "the CPU extension did not build here (g++/ninja?): see cpu_ext.py"
    if not compiled:
        monkeypatch.setattr(cpu_ext, "load", lambda: None)
    k = 256
    monkeypatch.setattr(cpu, "WT_TILE_BYTES", 64 * k * 2)  # 64-column tiles: several per layer
    t = random_layer(n, k, bits, 64, act_order=True, seed=n)
    for dtype in DTYPES:
        w = prepare(**t, bits=bits, dtype=dtype)
        x = torch.randn(33, k).to(dtype)
        assert_close(gptq_gemm(x, w), reference(x, t, bits, "gptq"), dtype)


@pytest.mark.parametrize("m", [0, 1, 40])
def test_batched_noncontiguous_and_empty_inputs(m):
    t = random_layer(128, 256, 4, 128, act_order=True, seed=2)
    w = prepare(**t, bits=4, dtype=torch.bfloat16)
    x = torch.randn(2, m, 512).bfloat16()[..., ::2]  # [2, m, 256], stride 2 along K
    bias = torch.randn(128).bfloat16()
    y = gptq_gemm(x, w, bias)
    assert y.shape == (2, m, 128)
    if m:
        assert_close(y, reference(x, t, 4, "gptq", bias), torch.bfloat16)


def _fused_available() -> bool:
    from vllm_gptq_plugin.kernels import cpu_ext
    return cpu_ext.load() is not None and cpu_ext.load().has_gemm_bf16()


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (3, -1, False), (8, 64, True),
                                                       (2, 128, False), (8, -1, False)])
def test_fused_kernel_every_row_tail_and_segment(bits, group_size, act_order):
    # M = 1..13 covers every micro-kernel height (6 rows + 0..5 tail); K = 640 makes group -1 split into
    # 256-row segments with a 128-row tail; int4pack layers are forced through fused at small M too.
    # Without an AVX512-BF16 build the same layers must take the other paths and give the same results.
    n, k = 192, 640
    t = random_layer(n, k, bits, group_size, act_order=act_order, seed=bits + group_size)
    w = prepare(**t, bits=bits, dtype=torch.bfloat16)
    fused = _fused_available()
    assert (w.impl.segments is not None) == fused
    for m in range(1, 14):
        x = torch.randn(m, k).bfloat16()
        assert cpu.path(w.impl, m) == ("fused" if fused else "int4pack" if bits <= 4 else "tiles")
        assert_close(gptq_gemm(x, w), reference(x, t, bits, "gptq"), torch.bfloat16)
        if fused:
            x2 = x if w.impl.perm is None else x.index_select(1, w.impl.perm)
            assert_close(cpu.fused_gemm(x2, w.impl), reference(x, t, bits, "gptq"), torch.bfloat16)


def test_fused_segments_refuse_odd_group_runs_and_other_dtypes():
    g = torch.tensor([0, 0, 0, 1, 1, 1])  # a run ends at k = 3: a bf16 pair would straddle two groups
    assert cpu.fused_segments(g, torch.bfloat16, 64) is None
    assert cpu.fused_segments(torch.zeros(6, dtype=torch.long), torch.float16, 64) is None
    assert cpu.fused_segments(torch.zeros(6, dtype=torch.long), torch.bfloat16, 96) is None


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch's extension builder waits for ever on a `lock` file a killed build left behind: one older
    than cpu_ext.STALE_LOCK_S is removed with a warning, a younger one (a build in progress) is not."""
    import os
    import time
    from vllm_gptq_plugin.kernels import cpu_ext
    lock = tmp_path / "lock"
    assert not cpu_ext.clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not cpu_ext.clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - cpu_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        assert cpu_ext.clear_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in caplog.text and str(lock) in caplog.text
