"""Where the quantizer's tensors live.

The model stays on the CPU (embeddings, norms, the blocks not being quantized); one decoder block at a
time moves to the compute device (`--device`) with its weights streamed from the safetensors files,
and the calibration activations live there too, or in pinned CPU memory with --offload-activations
(each batch is copied to the device when a forward needs it). Hessians and solves run on the compute
device. On the CPU all of this is a no-op: tensors are where they already are.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_gptq_plugin import format as fmt

DEVICES = ("auto", "cuda", "cpu")


def resolve(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU. `cuda` with a local_rank (a torchrun
    launch): that rank's GPU of its node."""
    name = str(name)
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise fmt.FormatError(f"unknown device {name!r}: choose one of {DEVICES}")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise fmt.FormatError(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__} is {build}): "
                              "pass --device cpu (or auto), or run where torch.cuda.is_available() is True")
    if ":" in name:
        device = torch.device(name)
    else:
        device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise fmt.FormatError(f"--device {device}: torch sees only {torch.cuda.device_count()} GPU(s) "
                              "(run at most that many ranks per node)")
    return device


@dataclasses.dataclass(frozen=True)
class Placement:
    """compute: where blocks, Hessians and solves run; offload: activation buffers in pinned CPU memory
    instead of on `compute` (only meaningful on a GPU)."""
    compute: torch.device = torch.device("cpu")
    offload: bool = False

    @property
    def store(self) -> torch.device:
        """Where the activation buffers live."""
        return torch.device("cpu") if self.offload else self.compute

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised activation buffer; pinned when offloaded from a GPU, so that copies to
        the device run at full bus speed."""
        pin = self.offload and self.compute.type == "cuda"
        return torch.empty(shape, dtype=dtype, device=self.store, pin_memory=pin)

    def adopt(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor (e.g. read back from disk) as an activation buffer: t itself when it may
        stay where it is, else a copy in a buffer()."""
        if self.store == t.device and not (self.offload and self.compute.type == "cuda"):
            return t
        out = self.buffer(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """t on the compute device: t itself when it is there already."""
        return t.to(self.compute)

    def fetch_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t on the compute device, never t itself (callers may modify it in place)."""
        return t.to(self.compute, copy=True)


def to_device(obj: Any, device: torch.device) -> Any:
    """A block's keyword arguments (tensors in dicts, tuples, lists) with every tensor on `device`;
    anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples too
    return obj


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since reset_peak_memory, in MiB; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
