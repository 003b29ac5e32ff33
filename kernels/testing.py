"""Random GPTQ layers in the checkpoint layout, for benchmarks and the tile tuner (no quantizer needed).
Kernel tests draw theirs from tests/gptq_reference.py, which does not share format.py's packer."""
from __future__ import annotations

import torch

from vllm_gptq_plugin import format as fmt


def random_layer(n: int, k: int, bits: int, group_size: int, *, act_order: bool = False, sym: bool = False,
                 checkpoint_format: str = "gptq", seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of an N x K layer from random integer q, zeros and scales.

    Asym zeros are drawn from [1, 2^bits - 1] so that v1 ('gptq', stores zero - 1) can hold them;
    sym uses zero = 2^(bits-1) everywhere, as a symmetric checkpoint does. Act-order shuffles g_idx.
    Made on `device` (a GPU packs an 8192 x 28672 layer in well under a second).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = fmt.num_groups(k, group_size)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, device=device)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1), device=device)
    else:
        zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, device=device)
    # Scales ~ what GPTQ gives a unit-variance weight: max|W| ~ 3 over the integer range.
    scales = (torch.rand(groups, n, generator=gen, device=device) + 0.5) * (4.0 / (1 << bits))
    g_idx = fmt.default_g_idx(k, group_size).to(device)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen, device=device)]
    return fmt.pack_layer(q, zeros, scales, g_idx, bits, checkpoint_format)
