"""The Triton dequant-GEMM against format.dequantize + F.linear, in Triton's interpreter on CPU.

Every bits x sym/asym x v1/v2 x act-order x group size, M in {1, 3, 16, 33}, fp16 and fp32 (the
interpreter computes bf16 wrongly; bf16 is for GPU runs). Tolerance: max|y - ref| <= TOL * max|ref|.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton defines the kernel

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_gptq_plugin import format as fmt  # noqa: E402
from vllm_gptq_plugin.kernels import gptq_gemm, prepare  # noqa: E402
from vllm_gptq_plugin.kernels import triton_gemm as tg  # noqa: E402
from vllm_gptq_plugin.kernels.testing import (  # noqa: E402
    CASES, MS, ZERO_CONVENTIONS, assert_close, random_layer, reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.float32) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


def to_device(t):
    return {name: v.to(DEVICE) for name, v in t.items()}


@pytest.mark.parametrize("sym,checkpoint_format", ZERO_CONVENTIONS)
@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_matches_reference(bits, group_size, act_order, sym, checkpoint_format):
    n, k = 96, 256  # N=96 is not a multiple of BLOCK_N: exercises the N mask
    t = to_device(random_layer(n, k, bits, group_size, act_order=act_order, sym=sym,
                               checkpoint_format=checkpoint_format, seed=bits * 1000 + group_size))
    # Act-order alternates between its two modes across the matrix (both cover every bits).
    mode = "gather" if (group_size // 32 + (checkpoint_format == "gptq")) % 2 else "permute"
    w = prepare(**t, bits=bits, checkpoint_format=checkpoint_format, backend="triton", act_order_mode=mode)
    assert (w.impl.group_size == 0) == (act_order and mode == "gather")
    assert (w.impl.perm is not None) == (act_order and mode == "permute")
    for dtype in DTYPES:
        for m in MS:
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            assert_close(gptq_gemm(x, w), reference(x, t, bits, checkpoint_format), dtype)


@pytest.mark.parametrize("mode", tg.ACT_ORDER_MODES)
@pytest.mark.parametrize("split_k", [1, 3, 4])
def test_split_k_and_bias_match_reference(split_k, mode):
    n, k, bits = 64, 512, 4  # split 3: the last split is shorter than the others
    t = to_device(random_layer(n, k, bits, 64, act_order=True, checkpoint_format="gptq_v2", seed=7))
    w = tg.prepare_triton(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, "gptq_v2", mode)
    x = torch.randn(2, 5, k, device=DEVICE)  # leading dims are flattened and restored
    bias = torch.randn(n, device=DEVICE)
    cfg = tg.TileConfig(16, 32, 64, split_k, 4, 2)
    y = tg.triton_gemm(x, w, bias, config=cfg)
    assert y.shape == (2, 5, n)
    assert_close(y, reference(x, t, bits, "gptq_v2", bias), torch.float32)


def test_tp_shard_g_idx_into_full_scales():
    # A row-parallel shard under act-order: half of K, g_idx pointing into all groups of the layer.
    n, k, bits = 64, 256, 3
    full = random_layer(n, k, bits, 32, act_order=True, seed=3)
    words = k * bits // 32
    shard = {"qweight": full["qweight"][words // 2:].contiguous(), "qzeros": full["qzeros"],
             "scales": full["scales"], "g_idx": full["g_idx"][k // 2:].contiguous()}
    shard = to_device(shard)
    w = prepare(**shard, bits=bits, backend="triton")  # asks for "permute": must fall back to gather
    assert w.impl.perm is None and w.impl.group_size == 0
    x = torch.randn(3, k // 2, device=DEVICE)
    assert_close(gptq_gemm(x, w), reference(x, shard, bits, "gptq"), torch.float32)


def test_clamped_block_k_divides_group():
    for group_size in (32, 64, 128, 256):
        assert group_size % tg._clamp_block_k(128, group_size) == 0
    assert tg._clamp_block_k(128, 0) == 128  # act-order: no clamp


def test_split_k_only_for_small_m():
    h100_sms = 132
    assert tg.pick_config(1, 4096, 4096, h100_sms).split_k > 1
    assert tg.pick_config(1, 4096, 4096, h100_sms).split_k * 4 * 128 <= 4096  # >= 4 K steps a split
    assert tg.pick_config(256, 4096, 4096, h100_sms).split_k == 1


@pytest.mark.opt_in
@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
def test_larger_shape_matches_reference(bits):
    n, k = 512, 1024
    t = to_device(random_layer(n, k, bits, 128, act_order=True, seed=bits))
    w = prepare(**t, bits=bits, backend="triton")
    for m in (1, 64, 130):
        x = torch.randn(m, k, device=DEVICE).half()
        assert_close(gptq_gemm(x, w), reference(x, t, bits, "gptq"), torch.float16)
