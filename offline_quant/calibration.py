"""How the calibration passes run: which samples (sources, count, length, seed), in which dtype and on
which device, with the contexts the block forwards and the Hessian GEMMs run in."""
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
# Where the CPU has no bf16 dot products (AVX2, AVX-512 without BF16) a bf16 GEMM ran 6x slower than
# fp32 (benchmarks/KERNELS.md): "auto" takes bf16 only where it is fast (resolve_forward_dtype).
FORWARD_DTYPES = ("auto", "bf16", "fp32")
DEFAULT_FORWARD_DTYPE = "auto"


def resolve_forward_dtype(name: str, device: str) -> str:
    """"auto" -> "bf16" on a GPU or a CPU with AVX512-BF16 / AMX, else "fp32"; others unchanged."""
    if name != "auto":
        return name
    if torch.device(device).type != "cpu":
        return "bf16"
    from vllm_gptq_plugin.kernels import cpu_dispatch
    return "bf16" if cpu_dispatch.fast_bf16_gemm() else "fp32"


@dataclasses.dataclass(frozen=True)
class Calibration:
    sources: tuple[str, ...] = DEFAULT_CALIB
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    forward_dtype: str = DEFAULT_FORWARD_DTYPE
    device: str = "cpu"  # where the blocks run: "cpu" or "cuda[:N]" (devices.resolve makes it from "auto")

    @property
    def bf16(self) -> bool:
        """Whether the forwards run in bf16 ("auto" resolved for this device)."""
        return resolve_forward_dtype(self.forward_dtype, self.device) == "bf16"

    def autocast(self):
        """The context the decoder blocks run in: bf16 matmuls (H still accumulates in fp32)."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def hessian_gemms(self):
        """The context H and C accumulate in: with bf16 forwards, fp32 GEMMs may round their inputs
        (the Linears see bf16 inputs anyway) but sum and write fp32.
        CPU: oneDNN's bf16 fpmath mode; on AVX512 CPUs this also takes oneDNN's AVX512 kernels where
        MKL runs AVX2 ones (AMD): 2x here. CUDA: TF32 tensor cores (10-bit mantissa products, fp32
        sums), ~8x the plain fp32 rate of an H100/H200."""
        if torch.device(self.device).type == "cuda":
            backend, fast = torch.backends.cuda.matmul, "tf32"
        else:
            backend, fast = torch.backends.mkldnn.matmul, "bf16"
            if not torch.backends.mkldnn.is_available():
                backend = None
        if not self.bf16 or backend is None:
            yield
            return
        # fp32_precision only: mixing it with the legacy allow_tf32 flag is an error in torch >= 2.9
        old = backend.fp32_precision
        backend.fp32_precision = fast
        try:
            yield
        finally:
            backend.fp32_precision = old
