"""Random GPTQ layers in the checkpoint layout, for kernel tests and benchmarks (no quantizer needed)."""
from __future__ import annotations

import torch

from vllm_gptq_plugin import format as fmt


def random_layer(n: int, k: int, bits: int, group_size: int, *, act_order: bool = False, sym: bool = False,
                 checkpoint_format: str = "gptq", seed: int = 0) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of an N x K layer from random integer q, zeros and scales.

    Asym zeros are drawn from [1, 2^bits - 1] so that v1 ('gptq', stores zero - 1) can hold them;
    sym uses zero = 2^(bits-1) everywhere, as a symmetric checkpoint does. Act-order shuffles g_idx.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = fmt.num_groups(k, group_size)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1))
    else:
        zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen)
    # Scales ~ what GPTQ gives a unit-variance weight: max|W| ~ 3 over the integer range.
    scales = (torch.rand(groups, n, generator=gen) + 0.5) * (4.0 / (1 << bits))
    g_idx = fmt.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return fmt.pack_layer(q, zeros, scales, g_idx, bits, checkpoint_format)


# The test matrix and the comparison every kernel path is held to (tests/test_kernels_*.py).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max|y - ref| / max|ref|
MS = (1, 3, 16, 33)
CASES = [(bits, gs, act) for bits in fmt.SUPPORTED_BITS for gs in fmt.SUPPORTED_GROUP_SIZES
         for act in (False, True) if not (gs == -1 and act)]  # one group: act-order means nothing
ZERO_CONVENTIONS = [(True, "gptq"), (False, "gptq"), (True, "gptq_v2"), (False, "gptq_v2")]


def reference(x, t, bits, checkpoint_format, bias=None):
    """format.dequantize + F.linear in fp32: what every kernel must reproduce."""
    w = fmt.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, checkpoint_format,
                       dtype=x.dtype)
    return torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())


def assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"max error {err} vs max |ref| {ref.abs().max()}"
