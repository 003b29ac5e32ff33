"""Data-parallel calibration over torch.distributed.

    torchrun --nproc-per-node N -m vllm_gptq_plugin.cli quantize --model M --out OUT ...

Each rank forwards its own contiguous share of the calibration samples through the current block;
the Hessians' fp64 sums (and the fp-target matrices') are summed over the ranks, so rank 0 holds
what one process would have accumulated (sums of fp32 GEMM outputs in fp64 do not depend on their
order, in practice: a 2-rank run writes the same checkpoint as one process); rank 0 solves and
broadcasts each quantized weight, so all ranks run the next group and block on the same weights;
rank 0 alone writes the checkpoint. Collectives run on NCCL for GPUs and gloo on CPUs.

A rank that dies must stop the others with an error naming it, not hang them. gloo reports a peer
that died only to the ranks talking to it at that moment, so every collective is preceded by a
roll call on a separate gloo group: each rank checks in with rank 0, rank 0 tells every live rank
which ranks did not (a dead rank's socket fails at once; a hung one after the timeout), and all
live ranks raise RankFailure. On NCCL a collective with a dead peer would hang until NCCL's watchdog
kills the process, so the roll call is what names the rank there too.

One process (no torchrun, WORLD_SIZE unset or 1) is a World of size 1 whose collectives do nothing.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Callable

import torch

from vllm_gptq_plugin import format as fmt

DEFAULT_TIMEOUT_S = 1800.0  # the longest one rank may wait for another: rank 0's solve of a group
_CHECK_IN, _VERDICT = 7, 8  # point-to-point tags of the roll call


class RankFailure(fmt.FormatError):
    """Another rank stopped (died, or failed and exited) or stopped answering; nothing was written."""


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int | None = None
    timeout: datetime.timedelta = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    group: Any = None    # the collectives' process group (NCCL or gloo); None: the default one
    control: Any = None  # a gloo group for the roll call and small objects
    owned: bool = False  # this World initialised torch.distributed and will destroy it

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n calibration samples (sizes differ by at most one)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    # --- collectives (no-ops in one process) --------------------------------------------------

    def roll_call(self, what: str) -> None:
        """Return once every rank has reached this point; raise RankFailure naming those that can't."""
        if self.size == 1:
            return
        import torch.distributed as dist
        token = torch.zeros(1, dtype=torch.int64)
        if self.leader:
            gone = []
            for r in range(1, self.size):
                try:
                    dist.irecv(token, src=r, group=self.control, tag=_CHECK_IN).wait(self.timeout)
                except Exception:  # noqa: BLE001  gloo raises RuntimeError subclasses of its own
                    gone.append(r)
            verdict = torch.full((self.size,), -1, dtype=torch.int64)
            verdict[0] = len(gone)
            verdict[1:1 + len(gone)] = torch.tensor(gone, dtype=torch.int64)
            for r in set(range(1, self.size)) - set(gone):
                try:
                    dist.isend(verdict, dst=r, group=self.control, tag=_VERDICT).wait(self.timeout)
                except Exception:  # noqa: BLE001  it will find out itself
                    pass
        else:
            verdict = torch.empty(self.size, dtype=torch.int64)
            try:
                dist.isend(token, dst=0, group=self.control, tag=_CHECK_IN).wait(self.timeout)
                dist.irecv(verdict, src=0, group=self.control, tag=_VERDICT).wait(self.timeout)
            except Exception as e:  # noqa: BLE001
                raise RankFailure(self._stopped([0], what)) from e
            gone = verdict[1:1 + int(verdict[0])].tolist()
        if gone:
            raise RankFailure(self._stopped(gone, what))

    def all_reduce_sum_(self, t: torch.Tensor, what: str) -> None:
        self._collective(what, lambda dist: dist.all_reduce(t, group=self.group))

    def broadcast_(self, t: torch.Tensor, what: str) -> None:
        """t <- rank 0's t, in place."""
        self._collective(what, lambda dist: dist.broadcast(t, src=0, group=self.group))

    def gather(self, obj: Any, what: str) -> list[Any]:
        """[every rank's obj] on every rank (small picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._collective(what, lambda dist: dist.all_gather_object(out, obj, group=self.control))
        return out

    def decide(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() run by rank 0 alone and its result (or its FormatError) given to every rank."""
        if self.size == 1:
            return fn()
        box: list[Any] = [None]
        if self.leader:
            try:
                box[0] = ("ok", fn())
            except fmt.FormatError as e:
                box[0] = ("error", str(e))
        self._collective(what, lambda dist: dist.broadcast_object_list(box, src=0, group=self.control))
        kind, value = box[0]
        if kind == "error":
            raise fmt.FormatError(value)
        return value

    def check(self, problem: str | None, what: str) -> None:
        """Every rank raises if any rank has a problem (a message naming the first such rank)."""
        problems = self.gather(problem, what)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            r, p = bad[0]
            raise fmt.FormatError(p if self.size == 1 else f"rank {r}: {p}")

    def merge_hessians(self, gptq, what: str) -> None:
        """gptq's sums of x x^T (and x~ x^T) and its token count <- their sums over all ranks, before its H
        is made: what one process would hold (fp64 sums of fp32 GEMMs do not depend on their order)."""
        if self.size == 1:
            return
        assert gptq.Hsum is not None, "merge_hessians after H was made"
        tokens = torch.tensor([gptq.nsamples], dtype=torch.int64, device=gptq.Hsum.device)
        self.all_reduce_sum_(tokens, what)
        for S in (gptq.Hsum, gptq.Csum):
            if S is not None:
                self.all_reduce_sum_(S, what)
        gptq.nsamples = int(tokens.item())

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001  a group with a dead peer may not shut down cleanly
                pass

    # ---------------------------------------------------------------------------------------------

    def _collective(self, what: str, op: Callable[[Any], Any]) -> None:
        if self.size == 1:
            return
        import torch.distributed as dist
        self.roll_call(what)
        try:
            op(dist)
        except Exception as e:  # noqa: BLE001  a peer died between the roll call and the collective
            self.roll_call(what)  # names it, if it is gone
            raise RankFailure(f"rank {self.rank}: {what} failed ({e}); no checkpoint was written") from e

    def _stopped(self, ranks: list[int], what: str) -> str:
        who = ", ".join(map(str, ranks))
        return (f"rank{'s' if len(ranks) > 1 else ''} {who} of {self.size} stopped (died, failed, or did not "
                f"answer within {self.timeout.total_seconds():.0f} s) during {what}; rank {self.rank} stops too "
                "and no checkpoint was written. See that rank's own error; rerun the same command to resume "
                "from the last finished block")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device_kind: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The World this process belongs to: size 1 without torchrun, else the process group torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) describes, initialised here
    with NCCL for device_kind "cuda" and gloo otherwise (or the one the caller already initialised)."""
    size = world_size_from_env()
    timeout = datetime.timedelta(seconds=timeout_s)
    if size == 1:
        return World(timeout=timeout)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, timeout, None, control, owned)
