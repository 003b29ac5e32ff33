"""How the calibration passes run: which samples (sources, count, length, seed) and in which dtype,
with the contexts the block forwards and the Hessian GEMMs run in."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

DEFAULT_CALIB = ("mix",)  # Shakespeare + Python docs: generalizes better than either alone
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 512  # the paper uses 128 x 2048; 512 tokens suffice for small models and 4x faster
DEFAULT_BATCH = 4  # samples per forward: 8 ran no faster and its temporaries fragmented the heap (peak RSS)
# Block forwards are ~3/4 of a run; bf16 matmuls are ~4x faster than fp32 on AVX512-BF16 CPUs and
# GPUs, and cost no measurable quality (benchmarks/quality.py, README). Weights and solves stay fp32.
FORWARD_DTYPES = ("bf16", "fp32")
DEFAULT_FORWARD_DTYPE = "bf16"


@dataclasses.dataclass(frozen=True)
class Calibration:
    sources: tuple[str, ...] = DEFAULT_CALIB
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    forward_dtype: str = DEFAULT_FORWARD_DTYPE

    def autocast(self):
        """The context the decoder blocks run in: bf16 matmuls (H still accumulates in fp32)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.forward_dtype == "bf16")

    @contextlib.contextmanager
    def hessian_gemms(self):
        """The context H and C accumulate in: with bf16 forwards, fp32 GEMMs may read their inputs as
        bf16 (oneDNN's fpmath mode; the Linears see bf16 inputs anyway) but sum and write fp32. On
        AVX512 CPUs this also takes oneDNN's AVX512 kernels where MKL runs AVX2 ones (AMD): 2x here."""
        onednn = torch.backends.mkldnn
        if self.forward_dtype != "bf16" or not onednn.is_available():
            yield
            return
        old = onednn.matmul.fp32_precision
        onednn.matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            onednn.matmul.fp32_precision = old
