"""A GPTQ packer and dequantizer written from docs/FORMAT.md alone, independent of
vllm_gptq_plugin.format: kernel tests draw their layers and their expected outputs from here, so a
bug shared by format.py's packer and a kernel cannot hide.

Slow and obvious on purpose: one loop over the values of the packed dimension and one over the bits
of each value, in numpy (vectorized only across the other dimension).

    bit stream: value i of the packed dimension occupies bits [i*b, (i+1)*b); stream bit j is bit
                j % 32 of word j // 32 (little-endian), words stored as int32 with the same bits.
    qweight [K*b/32, N] packs q[k, n] along K; qzeros [G, N*b/32] packs the stored zeros along N.
    W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k], zero = stored + 1 for "gptq" (v1).
"""
from __future__ import annotations

import numpy as np
import torch

# The matrix every kernel path is tested on: bits x group size x act-order, and the zero conventions.
CASES = [(bits, gs, act) for bits in (2, 3, 4, 8) for gs in (-1, 32, 64, 128) for act in (False, True)
         if not (gs == -1 and act)]  # one group: act-order means nothing
ZERO_CONVENTIONS = [(True, "gptq"), (False, "gptq"), (True, "gptq_v2"), (False, "gptq_v2")]


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """values [L, C] (ints in [0, 2^bits)) -> int32 words [L*bits/32, C], packed along axis 0."""
    length, cols = values.shape
    assert (length * bits) % 32 == 0, "whole words only"
    assert values.min() >= 0 and values.max() < (1 << bits)
    words = np.zeros((length * bits // 32, cols), dtype=np.uint64)
    for i in range(length):
        for b in range(bits):
            j = i * bits + b
            bit = (values[i].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)
            words[j // 32] |= bit << np.uint64(j % 32)
    return words.astype(np.uint32).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: int32 words [W, C] -> int64 values [W*32/bits, C]."""
    u = words.view(np.uint32).astype(np.uint64)
    length = words.shape[0] * 32 // bits
    values = np.zeros((length, words.shape[1]), dtype=np.int64)
    for i in range(length):
        for b in range(bits):
            j = i * bits + b
            bit = (u[j // 32] >> np.uint64(j % 32)) & np.uint64(1)
            values[i] |= bit.astype(np.int64) << b
    return values


def random_layer(n: int, k: int, bits: int, group_size: int, *, act_order: bool = False, sym: bool = False,
                 checkpoint_format: str = "gptq", seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of a random N x K layer, packed by pack_bits (zeros in [1, 2^b) so that v1,
    which stores zero - 1, can hold them; sym: zero = 2^(b-1); act-order: a shuffled g_idx)."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = rng.integers(0, 1 << bits, size=(k, n))
    zeros = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(1, 1 << bits, size=(groups, n))
    scales = ((rng.random((groups, n)) + 0.5) * (4.0 / (1 << bits))).astype(np.float16)
    g_idx = np.zeros(k, dtype=np.int64) if group_size == -1 else np.arange(k) // group_size
    if act_order:
        g_idx = g_idx[rng.permutation(k)]
    stored = zeros - (1 if checkpoint_format == "gptq" else 0)
    return {"qweight": torch.from_numpy(pack_bits(q, bits)),
            "qzeros": torch.from_numpy(np.ascontiguousarray(pack_bits(stored.T, bits).T)),
            "scales": torch.from_numpy(scales),
            "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


def dequantize(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in fp32: scales rounded to `dtype` (what a kernel running in it sees), the product in
    fp32, then rounded to `dtype` once."""
    q = unpack_bits(t["qweight"].cpu().numpy(), bits)                              # [K, N]
    zeros = unpack_bits(np.ascontiguousarray(t["qzeros"].cpu().numpy().T), bits).T  # [G, N]
    zeros = zeros + (1 if checkpoint_format == "gptq" else 0)
    scales = t["scales"].cpu().to(dtype).float().numpy()
    g = t["g_idx"].cpu().numpy().astype(np.int64)
    w = np.empty(q.shape, dtype=np.float32)
    for kk in range(q.shape[0]):
        w[kk] = (q[kk] - zeros[g[kk]]).astype(np.float32) * scales[g[kk]]
    return torch.from_numpy(w.T.copy()).to(dtype).float()


def linear(x: torch.Tensor, t: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The expected y = x @ W^T (+ bias) in fp32 on the CPU, W dequantized in x's dtype."""
    w = dequantize(t, bits, checkpoint_format, x.dtype)
    y = x.detach().cpu().float() @ w.t()
    return y if bias is None else y + bias.detach().cpu().float()


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """max|y - ref| <= TOL[dtype] * max|ref| (fp32 accumulation in another order, and y rounded to
    dtype: a few ulps of dtype at the output's scale)."""
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert tuple(y.shape) == tuple(ref.shape), f"output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    err = (y.detach().cpu().float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max error {err} vs max |ref| {ref.abs().max().item()}"
