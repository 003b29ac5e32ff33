"""What runs inside a decoder block, found by running it with hooks: the inputs the blocks receive
(capture_block_inputs), the true-sequential groups of its Linears (sequential_groups), the children
whose output is one Linear's output (passthrough_children), and what given Linears receive on a
batch (inputs_of)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from vllm_gptq_plugin import format as fmt


class StopForward(Exception):
    """Raised from a hook once a forward pass has produced everything needed from it."""


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def capture_block_inputs(model, blocks: torch.nn.ModuleList, ids: torch.Tensor, batches: list[slice],
                         keep_hidden: bool = True, paths: int = 1,
                         alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None):
    """(hidden states entering block 0 [paths, n, L, D] (each path a copy) or None, kwargs[batch][block]).

    alloc(shape, dtype): where the hidden states go (devices.Placement.buffer; default CPU memory).
    Each block's forward is replaced by a recorder that passes its input through, so only the
    embeddings and the per-layer arguments (rotary embeddings, masks: they differ per layer in e.g.
    Gemma3) are computed; the last recorder stops the model before the final norm and lm_head.
    """
    hidden = None
    kwargs: list[list[dict[str, Any]]] = []
    per_block: list[dict[str, Any]] = [{} for _ in blocks]

    def recorder(i):
        def forward(hidden_states, *args, **kw):
            assert not args, "decoder blocks are expected to take everything but the input by keyword"
            per_block[i] = kw
            if i == 0 and keep_hidden:
                captured.append(hidden_states)
            if i == len(blocks) - 1:
                raise StopForward
            return hidden_states
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for sl in batches:
            captured: list[torch.Tensor] = []
            try:
                model(input_ids=ids[sl], use_cache=False)
            except StopForward:
                pass
            if keep_hidden:
                if hidden is None:
                    shape = (paths, ids.shape[0]) + captured[0].shape[1:]
                    hidden = (alloc(shape, captured[0].dtype) if alloc else
                              torch.empty(shape, dtype=captured[0].dtype, device=captured[0].device))
                hidden[:, sl] = captured[0]
            kwargs.append(list(per_block))
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    return hidden, kwargs


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential_groups(block: torch.nn.Module, names: Sequence[str], x: torch.Tensor,
                      kw: dict[str, Any], true_sequential: bool) -> list[list[str]]:
    """The block's Linears `names` (relative to the block) in execution order, grouped by shared input.

    Linears reading the very same tensor (q/k/v; gate/up) are quantized together from one Hessian;
    each later group is quantized after the earlier ones, on their quantized outputs.
    """
    modules = dict(block.named_modules())
    order: list[str] = []
    inputs: list[torch.Tensor] = []  # kept alive so `is` compares tensors, not recycled ids
    handles = []
    for name in names:
        def hook(module, args, name=name):
            order.append(name)
            inputs.append(args[0])
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in order]
    if missing:
        raise fmt.FormatError(f"Linear layers {missing} never ran in the block's forward pass: this "
                              "architecture is not a plain stack of Linear blocks; exclude them with --skip")
    seen, groups = set(), []
    for i, name in enumerate(order):
        if name in seen:  # a Linear called twice: its first call decides its group
            continue
        seen.add(name)
        if groups and inputs[i] is inputs[order.index(groups[-1][0])]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups if true_sequential else [[n for g in groups for n in g]]


@torch.no_grad()
def passthrough_children(block: torch.nn.Module, groups: list[list[str]], x: torch.Tensor,
                         kw: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """Children of the block whose output is their last Linear's output itself (attention ending in
    o_proj): {child: (that Linear, None if the output is the tensor, else the length of the tuple
    it heads, the rest all None)}. Their output can be computed from the Linear's input alone."""
    modules = dict(block.named_modules())
    last = {n.split(".", 1)[0]: n for g in groups for n in g}  # each child's last Linear, in order
    outs: dict[str, Any] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, o))
               for n in last.values()]
    handles += [modules[c].register_forward_hook(lambda m, a, o, c=c: outs.setdefault(c, o))
                for c in last if c in modules and c not in last.values()]
    try:
        block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    found = {}
    for child, linear in last.items():
        out, y = outs.get(child), outs.get(linear)
        if y is None or out is None:
            continue
        if out is y:
            found[child] = (linear, None)
        elif isinstance(out, tuple) and out and out[0] is y and all(o is None for o in out[1:]):
            found[child] = (linear, len(out))
    return found


@torch.no_grad()
def inputs_of(block, members: list[str], x: torch.Tensor, kw: dict[str, Any], autocast,
              out: torch.Tensor | None = None, stop_after: torch.nn.Module | None = None
              ) -> dict[str, torch.Tensor]:
    """What each of the block's Linears `members` receives when the block runs on x.

    The forward stops after the last member's input is known (or, with stop_after, once that module
    has returned), unless `out` is given: then it runs to the end and writes the block's output
    there (x may be `out` itself).
    """
    modules = dict(block.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for m in members:
        def hook(module, args, m=m):
            got[m] = args[0]
            if m == members[-1] and out is None and stop_after is None:
                raise StopForward
        handles.append(modules[m].register_forward_pre_hook(hook))
    if out is None and stop_after is not None:
        def stop(module, args, output):
            raise StopForward
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with autocast():
            y = block_output(block(x, **kw))
        if out is not None:
            out[:] = y
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return got
