"""ChildMemo: a decoder block's children's outputs kept across the block's passes, so that attention
runs once per batch and path instead of once per group (the README has the measurement)."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from vllm_gptq_plugin.offline_quant.devices import Placement


class ChildMemo:
    """A block's children's outputs per batch, reused by the block's later passes.

    Each group's Hessians take a pass of the block's forward over the calibration set, and each pass
    recomputes everything before the group, attention included (scaled_dot_product_attention was a
    third of a run). A direct child of the block holding target Linears (attention, MLP) is *final*
    from the pass after its last Linear's group is quantized: its weights and inputs no longer
    change, so its output from one pass is its output in every later one. In the fp block every
    child is final from the start. A child's output is recorded in the pass where it becomes
    final (or computed from its last Linear's input, see passthrough_children) when later passes
    can reuse it, into one [nsamples, ...] buffer per child in the forward dtype, freed with the
    memo after the block (one allocation, not one per batch: per-batch tensors fragmented the heap
    and held ~300 MB more RSS). Only outputs that are a tensor, or a tuple of one tensor and Nones,
    at most limit_bytes per batch, are kept; a child called twice in one forward is left out.
    The buffers live where `place` keeps activations (the device, or pinned CPU memory).
    """

    def __init__(self, block: torch.nn.Module, groups: list[list[str]], batches: list[slice],
                 fp: bool = False, passthrough: dict[str, tuple[str, int | None]] | None = None,
                 place: Placement = Placement()):
        self.children = dict(block.named_children())
        self.batches = batches
        self.place = place
        self.passthrough = passthrough or {}
        self.last_held: dict[str, int] = {}  # child -> the last group with a member in it
        for gi, group in enumerate(groups):
            for name in group:
                self.last_held[name.split(".", 1)[0]] = gi
        # child -> how many quantized groups make it final
        self.ready_at = {c: 0 if fp else g + 1 for c, g in self.last_held.items()}
        self.buffers: dict[str, torch.Tensor] = {}  # child -> its outputs' tensor, all batches
        self.arity: dict[str, int | None] = {}      # child -> None (a tensor) or its tuple's length
        self.stored: set[tuple[str, int]] = set()   # (child, batch) held in buffers

    def recorded_in(self, done: int) -> list[str]:
        """The children whose output the pass after `done` quantized groups records: final ones no
        later group's members are in (so that later passes can reuse them)."""
        return [c for c, ready in self.ready_at.items() if ready <= done and self.last_held[c] <= done]

    def computable(self, members: Sequence[str], done: int) -> dict[str, str]:
        """{member: child} for the members whose solve finishes a passthrough child: its output is
        then that member's output on the inputs of this pass, and no later pass need recompute it."""
        return {self.passthrough[c][0]: c for c, g in self.last_held.items()
                if g == done and c in self.passthrough and self.passthrough[c][0] in members}

    def fill(self, child: str, inputs: torch.Tensor, linear: torch.nn.Module, autocast) -> None:
        """A passthrough child's output for every batch: its last Linear on `inputs` (that Linear's
        inputs in this pass, all batches), written over `inputs` when the shapes allow."""
        n = self.passthrough[child][1]
        for b, sl in enumerate(self.batches):
            with autocast():
                y = linear(self.place.fetch(inputs[sl]))
            if b == 0 and y.shape[1:] == inputs.shape[1:] and y.dtype == inputs.dtype:
                self.buffers[child] = inputs  # each batch's slot is read before it is overwritten
            if not self._put(child, b, y, n, math.inf):
                self._forget(child)
                return

    def stop_after(self, members: Sequence[str], done: int) -> torch.nn.Module | None:
        """Where a pass that only wants `members`' inputs can stop and still complete what it records."""
        child = members[-1].split(".", 1)[0]
        return self.children[child] if child in self.recorded_in(done) else None

    def _store(self, child: str, b: int, out, limit_bytes: float) -> bool:
        """Keep a child's output for batch b if it is a tensor, or a tuple of one tensor and Nones."""
        if isinstance(out, torch.Tensor):
            return self._put(child, b, out, None, limit_bytes)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(o is None for o in out[1:]):
            return self._put(child, b, out[0], len(out), limit_bytes)
        return False

    def _put(self, child: str, b: int, head: torch.Tensor, n: int | None, limit_bytes: float) -> bool:
        """head: the output's tensor; n: None (the output is head) or the length of its tuple."""
        sl, buf = self.batches[b], self.buffers.get(child)
        if (head.shape[0] != sl.stop - sl.start or head.numel() * head.element_size() > limit_bytes
                or self.arity.get(child, n) != n):
            return False
        if buf is None:
            buf = self.buffers[child] = self.place.buffer((self.batches[-1].stop,) + head.shape[1:], head.dtype)
        elif buf.shape[1:] != head.shape[1:] or buf.dtype != head.dtype:
            return False
        buf[sl] = head
        self.arity[child] = n
        self.stored.add((child, b))
        return True

    def _load(self, child: str, b: int):
        y = self.place.fetch_copy(self.buffers[child][self.batches[b]])  # a copy: callers may modify it in place
        n = self.arity[child]
        return y if n is None else (y,) + (None,) * (n - 1)

    def _forget(self, child: str) -> None:
        self.ready_at.pop(child, None)
        self.buffers.pop(child, None)
        self.stored = {k for k in self.stored if k[0] != child}

    @contextlib.contextmanager
    def use(self, b: int, done: int, members: Sequence[str], limit_bytes: int):
        """Within: the children final once `done` groups are quantized give their output for batch b
        (except those holding one of `members`: their inputs are wanted), or record it when later
        passes will want it. limit_bytes: the most one batch's output may hold (else the child is
        left out); 0: reuse only, record nothing."""
        patched = []
        holding = {m.split(".", 1)[0] for m in members}
        record = set(self.recorded_in(done)) if limit_bytes else set()
        for name, ready in list(self.ready_at.items()):
            if ready > done:
                continue
            module, calls = self.children[name], []

            def forward(*args, _name=name, _calls=calls, _orig=module.forward, _reuse=name not in holding, **kw):
                _calls.append(1)
                if len(_calls) > 1:  # called again within one forward: its output is not one thing
                    self._forget(_name)
                    return _orig(*args, **kw)
                if _reuse and (_name, b) in self.stored:
                    return self._load(_name, b)
                out = _orig(*args, **kw)
                if _name in record and not self._store(_name, b, out, limit_bytes):
                    self._forget(_name)
                return out
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        try:
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own


def use_memo(memo: ChildMemo | None, b: int, done: int, members: Sequence[str], limit_bytes: int):
    """memo.use(...), or nothing without a memo."""
    return memo.use(b, done, members, limit_bytes) if memo is not None else contextlib.nullcontext()
