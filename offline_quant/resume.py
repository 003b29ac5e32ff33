"""Resume: after finished blocks (each one on small models, see WorkState.block_done), their packed
tensors, the next block's inputs and the report so far go to `<out>.partial/` (each file written to a
temporary name and renamed; the state file last).
Rerunning the same command continues from there and writes a bit-identical model.safetensors;
different settings refuse to resume. A distributed run resumes with the same number of ranks."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant.calibration import Calibration
from vllm_gptq_plugin.offline_quant.distributed import World

log = logging.getLogger(__name__)
STATE_VERSION = 2
SAVE_TIME_RATIO = 20  # compute time between resume saves, in multiples of a save's own time


class WorkState:
    """Finished blocks' packed tensors, the next block's inputs and the report rows, on disk.

    With several ranks (distributed.World) each rank writes its own share of the inputs,
    inputs-<done>.rank<r>.f32, and rank 0 the packed blocks and state.json, last, once every rank's
    file is in place; each rank reads back its own share. Ranks on other machines need --out on a
    filesystem they all see (or the same path on each, holding that machine's ranks' files).
    """

    def __init__(self, out: Path, key: dict[str, Any], world: World = World()):
        self.dir = out.with_name(out.name + ".partial")
        self.key = json.loads(json.dumps(key))  # as state.json will hold it (tuples become lists)
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.world = world
        self.pending: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # finished blocks not saved yet
        self.last_save: tuple[float, float] | None = None  # (seconds it took, clock() when it ended)
        self.clock = time.perf_counter

    def _write(self, fname: str, writer: Callable[[Path], None]) -> None:
        tmp = self.dir / f".{fname}.tmp"
        try:
            writer(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / fname)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise fmt.FormatError(f"disk full while saving resume state to {self.dir}: free space "
                                      "and rerun the same command to continue") from e
            raise

    def load(self, resume: bool) -> dict[str, Any] | None:
        """The saved state to continue from, or None (starting afresh, old state removed); decided by
        rank 0 for all ranks, which must all run with the same settings."""
        digests = self.world.gather(self.digest, "comparing the ranks' settings")
        self.world.check(None if digests[self.world.rank] == digests[0] else
                         "its model files, settings or calibration samples differ from rank 0's: launch every "
                         "rank with the same command on the same files", "comparing the ranks' settings")
        return self.world.decide(lambda: self._load(resume), "reading the resume state")

    def _load(self, resume: bool) -> dict[str, Any] | None:
        state_file = self.dir / "state.json"
        if not state_file.exists():
            shutil.rmtree(self.dir, ignore_errors=True)  # died before finishing a block: nothing to keep
            return None
        state = json.loads(state_file.read_text())
        if not resume:
            log.info("discarding the earlier partial run in %s (resume is off)", self.dir)
            shutil.rmtree(self.dir)
            return None
        if state.get("version") != STATE_VERSION:
            raise fmt.FormatError(f"{self.dir} holds a partial run of an older version of this quantizer: "
                                  "pass --no-resume to discard it and start over")
        if state.get("digest") != self.digest:
            old = state.get("key", {})
            diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            raise fmt.FormatError(f"{self.dir} holds a partial run with different settings ({', '.join(diff)} "
                                  "differ): rerun with the same arguments to resume it, or pass --no-resume "
                                  "to discard it and start over")
        return state

    def restore(self, state: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """(the finished blocks' packed tensors: rank 0's alone, {} on the others; this rank's inputs)."""
        from safetensors.torch import load_file
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(state["done"] if self.world.leader else 0):
            for key, t in load_file(self.dir / f"block-{i:04d}.safetensors").items():
                name, sfx = key.rsplit(".", 1)
                packed.setdefault(name, {})[sfx] = t
        path = self.dir / state["inputs"][self.world.rank]
        self.world.check(None if path.exists() else
                         f"cannot resume: {path} is missing (each rank keeps its share of the resume state "
                         "under --out; use a filesystem every node sees, or pass --no-resume)", "restoring the inputs")
        hidden = np.fromfile(path, dtype=np.float32)
        return packed, torch.from_numpy(hidden.reshape(state["inputs_shape"][self.world.rank]))

    def block_done(self, done: int, block_packed: dict[str, dict[str, torch.Tensor]], inps: torch.Tensor,
                   rows: list[dict[str, Any]]) -> None:
        """Block done - 1 is quantized and inps hold block done's inputs: save the state if it is due.

        Due after the first block, then whenever the time since the last save is at least
        SAVE_TIME_RATIO times what that save took: on a small model every block; on a big one on a GPU,
        where a block's inputs are gigabytes and a block takes seconds, often enough that a killed run
        loses little and the saves cost at most ~1/SAVE_TIME_RATIO of the run. Rank 0 decides for all.
        """
        self.pending[done - 1] = block_packed
        due = self.world.decide(lambda: self.last_save is None or
                                self.clock() - self.last_save[1] >= SAVE_TIME_RATIO * self.last_save[0],
                                "deciding whether to save the resume state")
        if due:
            t0 = self.clock()
            self.save(done, self.pending, inps, rows)
            self.pending = {}
            self.last_save = (self.clock() - t0, self.clock())

    def flush(self, done: int, inps: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        """Save the blocks finished since the last save now (a run about to stop), due or not."""
        if self.pending:
            self.save(done, self.pending, inps, rows)
            self.pending = {}

    def save(self, done: int, pending: dict[int, dict[str, dict[str, torch.Tensor]]], inps: torch.Tensor,
             rows: list[dict[str, Any]]) -> None:
        """Write the blocks in `pending` ({block index: packed tensors}) and the state after block done - 1."""
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        # Raw fp32 bytes, written straight from the buffer: safetensors would first copy it in memory.
        assert inps.dtype == torch.float32 and inps.is_contiguous()
        inputs = f"inputs-{done:04d}.rank{self.world.rank}.f32"
        self._write(inputs, lambda p: _tofile(inps, p))
        shapes = self.world.gather(list(inps.shape), "saving the resume state")  # every rank's file is in place
        if self.world.leader:
            for i, block_packed in pending.items():
                flat = {f"{n}.{s}": t.contiguous() for n, ts in block_packed.items() for s, t in ts.items()}
                self._write(f"block-{i:04d}.safetensors", lambda p: save_file(flat, p))
            state = {"version": STATE_VERSION, "digest": self.digest, "key": self.key, "done": done,
                     "inputs": [f"inputs-{done:04d}.rank{r}.f32" for r in range(self.world.size)],
                     "inputs_shape": shapes, "rows": rows}
            self._write("state.json", lambda p: p.write_text(json.dumps(state)))  # json keeps inf
        self.world.roll_call("saving the resume state")  # state.json names the new files: the old can go
        for old in self.dir.glob(f"inputs-*.rank{self.world.rank}.f32"):
            if old.name != inputs:
                old.unlink()

    def remove(self) -> None:
        """After the checkpoint is written: rank 0 removes the folder, every other rank its own files."""
        if self.world.leader:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for f in self.dir.glob(f"inputs-*.rank{self.world.rank}.f32"):
                f.unlink(missing_ok=True)


def _tofile(t: torch.Tensor, path: Path) -> None:
    """t's raw bytes: from its own memory on the CPU, through the CPU in 256 MiB pieces from a GPU."""
    if t.device.type == "cpu":
        t.numpy().tofile(path)
        return
    with open(path, "wb") as fh:
        write_pieces(t, fh, (256 << 20) // t.element_size())


def write_pieces(t: torch.Tensor, fh, step: int) -> None:
    """t's raw bytes (t contiguous, any device) written `step` elements at a time via CPU memory."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), step):
        flat[i:i + step].cpu().numpy().tofile(fh)


def run_key(model_dir: Path, cfg: fmt.QuantConfig, calib: Calibration, method: str, batch_size: int,
            ids: torch.Tensor | None, world_size: int = 1) -> dict[str, Any]:
    """Everything the result depends on; a saved state is resumed only if all of it matches. The
    device counts by its kind (a CPU and a GPU round differently), the ranks by their number (each
    holds its share of the inputs, and Hessians are summed in another order)."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    calibration = dataclasses.asdict(calib)
    device = torch.device(calibration.pop("device")).type
    return {"model": str(model_dir.absolute()), "weights": [list(w) for w in weights],
            "config": cfg.to_dict(), "method": method, "calibration": calibration, "device": device,
            "batch_size": batch_size, "world_size": world_size,
            "calibration_tokens": None if ids is None else hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
