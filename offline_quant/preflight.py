"""Checks that run before the slow part, so that a run that cannot finish stops at once with one
message naming the numbers and the fix, not after its first block (or with a raw allocator error):

- the output folder takes files (check_output_folder) and has room for the checkpoint and the resume
  state (disk_space_problem, from the model's Linear shapes and bits through format.expected_shapes);
- the calibration windows fit the model's positions (check_seqlen);
- the calibration activations fit in the memory they will live in (activation_memory_problem).

Sizes are estimates from shapes, not measurements; each function says what it counts.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_gptq_plugin import format as fmt

log = logging.getLogger(__name__)
DISK_SLACK = 1 << 20  # JSON files (config, report) and safetensors headers, generously


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} bytes"


def _existing_folder(path: Path) -> Path:
    """path, or its nearest ancestor that exists (the run creates the folders missing below it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(out: Path) -> None:
    """The checkpoint (a temporary sibling renamed to `out`) and the resume state (`out`.partial) are
    written next to `out`: creating a file there must work. A real file, removed at once, because
    neither os.access nor permission bits tell the truth for root or for read-only mounts."""
    folder = _existing_folder(out.parent)
    if not folder.is_dir():
        raise fmt.FormatError(f"cannot write {out}: {folder} is a file, not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=folder)
    except OSError as e:
        raise fmt.FormatError(f"cannot write {out}: creating a file in {folder} fails ({e.strerror}); the "
                              "checkpoint and its resume state go there: choose a writable --out") from e
    os.close(fd)
    os.unlink(probe)


def check_seqlen(model_dir: Path, seqlen: int) -> None:
    """seqlen within the model's max_position_embeddings (of its text model, for multimodal configs)."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return  # no or no usable config.json: the model loader names the problem
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise fmt.FormatError(f"--seqlen {seqlen} is more than the model's max_position_embeddings {limit}: "
                              f"calibration windows must fit the positions it was trained for; pass --seqlen "
                              f"{limit} or less")


def checkpoint_bytes(model: torch.nn.Module, targets: dict, dtype: torch.dtype, source: Path) -> tuple[int, int]:
    """(the checkpoint's size, the part of it that is quantized layers), as checkpoint.write lays it
    out: each target Linear's packed tensors at format.expected_shapes in format.EXPECTED_DTYPES and its
    bias in fp16, every other tensor in `dtype` (integer ones as they are), a tied lm_head once, the
    tokenizer files copied from `source`, and DISK_SLACK."""
    quantized = total = 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        module, kind = key.rsplit(".", 1)
        if module in targets and kind in ("weight", "bias"):
            linear, lcfg = targets[module]
            shapes = fmt.expected_shapes(linear.in_features, linear.out_features, lcfg) if kind == "weight" else {}
            n = (sum(math.prod(s) * fmt.EXPECTED_DTYPES[k].itemsize for k, s in shapes.items()) if shapes
                 else t.numel() * 2)
            quantized += n
        elif tied and key == "lm_head.weight":
            continue
        else:
            total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    tokenizer = sum((source / f).stat().st_size for f in fmt.TOKENIZER_FILES if (source / f).exists())
    return total + quantized + tokenizer + DISK_SLACK, quantized


def disk_space_problem(out: Path, checkpoint: int, quantized: int = 0, inputs: int = 0) -> str | None:
    """What the folder `out` goes in lacks, or None. At the peak, the resume state holds the finished
    blocks (`quantized` bytes) and the block inputs (`inputs` bytes, all ranks), twice while a save
    replaces them; at the end the checkpoint is written beside it before it is removed."""
    needed = quantized + inputs + max(inputs, checkpoint)
    folder = _existing_folder(out.parent)
    free = shutil.disk_usage(folder).free
    if needed <= free:
        return None
    parts = f"checkpoint {size(checkpoint)}"
    if inputs:
        parts += f", resume state up to {size(quantized + 2 * inputs)}"
    return (f"not enough disk space for {out}: the run needs about {size(needed)} ({parts}) but {folder} has "
            f"{size(free)} free; free space or choose another --out")


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes that can still be allocated on `device`, where the number comes from), or None if unknown.
    CPU: MemAvailable of /proc/meminfo (the kernel's estimate, page cache it can drop included; not
    a container's cgroup limit). GPU: torch.cuda.mem_get_info's free bytes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None


def activation_memory_problem(activations: int, device: torch.device, nsamples: int, seqlen: int,
                              fp_targets: bool) -> str | None:
    """What is missing for the calibration activations (`activations` bytes, report.memory's model of
    them: the block inputs in fp32 and the attention outputs kept by ChildMemo, per path) on `device`,
    where they live, or None. Only these buffers are counted: they are allocated first and kept to the
    end, so a run whose activations do not fit cannot finish, whatever else it needs."""
    available = available_memory(device)
    if available is None:
        log.info("cannot tell how much memory is available: the calibration activations (%s) are not checked",
                 size(activations))
        return None
    free, source = available
    if activations <= free:
        return None
    options = ["a smaller --nsamples or --seqlen (they grow with both)"]
    if fp_targets:
        options.append("--no-fp-targets (keeps one path, not two: half of them)")
    if device.type == "cuda":
        options.append("--offload-activations (keeps them in CPU memory)")
    return (f"the calibration activations ({nsamples} samples x {seqlen} tokens) need {size(activations)} "
            f"({activations} bytes) but {size(free)} ({free} bytes) is available ({source}): pass "
            + ", or ".join(options))
