"""Refusals before any launch: `can_implement(...) -> (ok, reason)` for prepare, `check_input` per call.

Callers that want an exception use `require(...)`, which raises FormatError carrying the reason.
"""
from __future__ import annotations

import torch

from vllm_gptq_plugin import format as fmt

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def can_implement(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  bits: int, checkpoint_format: str, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether checkpoint tensors (layouts of vllm_gptq_plugin.format) can be served; else the reason.

    scales may have more groups than K/group_size: a row-parallel shard under act-order keeps the full
    scales/qzeros and its g_idx points into them.
    """
    if bits not in fmt.SUPPORTED_BITS:
        return False, f"bits={bits} is not supported: use one of {fmt.SUPPORTED_BITS}"
    if checkpoint_format not in fmt.FORMATS:
        return False, f"unknown checkpoint_format {checkpoint_format!r}: expected one of {fmt.FORMATS}"
    if dtype not in ACTIVATION_DTYPES:
        return False, f"activation dtype {dtype} is not supported: use one of {ACTIVATION_DTYPES}"
    for name, t, want in (("qweight", qweight, (torch.int32,)), ("qzeros", qzeros, (torch.int32,)),
                          ("g_idx", g_idx, (torch.int32, torch.int64)), ("scales", scales, SCALE_DTYPES)):
        if not isinstance(t, torch.Tensor):
            return False, f"{name} must be a torch.Tensor, found {type(t).__name__}"
        if t.dtype not in want:
            return False, f"{name} must have dtype in {want}, found {t.dtype}"
        if not t.is_contiguous():
            return False, f"{name} must be contiguous (call .contiguous() when loading)"
        if t.device != qweight.device:
            return False, f"{name} is on {t.device} but qweight is on {qweight.device}"
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        return False, ("expected qweight [K*b/32, N], qzeros [G, N*b/32], scales [G, N], g_idx [K]; found "
                       f"{list(qweight.shape)}, {list(qzeros.shape)}, {list(scales.shape)}, {list(g_idx.shape)}")
    k, n = g_idx.shape[0], scales.shape[1]
    groups = scales.shape[0]
    if k * bits % 32 or n * bits % 32:
        return False, f"K={k} and N={n} must fill whole 32-bit words at {bits} bits"
    if tuple(qweight.shape) != (k * bits // 32, n):
        return False, f"qweight must be [{k * bits // 32}, {n}] for K={k} (from g_idx), N={n} (from scales); " \
                      f"found {list(qweight.shape)}"
    if tuple(qzeros.shape) != (groups, n * bits // 32):
        return False, f"qzeros must be [{groups}, {n * bits // 32}] to match scales {list(scales.shape)}; " \
                      f"found {list(qzeros.shape)}"
    if k == 0 or n == 0 or groups == 0:
        return False, "empty layer: K, N and the number of groups must be > 0"
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= groups:
        return False, f"g_idx values must lie in [0, {groups}) (rows of scales), found [{lo}, {hi}]"
    return True, None


def check_input(x: torch.Tensor, in_features: int, device: torch.device,
                bias: torch.Tensor | None, out_features: int) -> tuple[bool, str | None]:
    if not isinstance(x, torch.Tensor):
        return False, f"x must be a torch.Tensor, found {type(x).__name__}"
    if x.dtype not in ACTIVATION_DTYPES:
        return False, f"x dtype {x.dtype} is not supported: use one of {ACTIVATION_DTYPES}"
    if x.dim() < 1 or x.shape[-1] != in_features:
        return False, f"x must be [..., {in_features}], found {list(x.shape)}"
    if x.device != device:
        return False, f"x is on {x.device} but the weights are on {device}"
    if bias is not None and (bias.shape != (out_features,) or bias.device != device):
        return False, f"bias must be [{out_features}] on {device}, found {list(bias.shape)} on {bias.device}"
    return True, None


def require(ok_reason: tuple[bool, str | None]) -> None:
    ok, reason = ok_reason
    if not ok:
        raise fmt.FormatError(reason)
