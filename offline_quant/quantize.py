"""Whole-model quantization, one decoder block at a time, and the `vllm-gptq quantize` command.

The pipeline (the GPTQ paper's, as in its reference llama.py):
1. Capture what enters the decoder blocks for the calibration set: the hidden states entering block 0
   and each block's keyword arguments (position embeddings, mask, position ids), by replacing every
   block's forward with a recorder, so that only the embeddings run.
2. For each block: find its Linears' true-sequential groups by tracing one batch (Linears that read
   the same input tensor form a group: q/k/v, then o, then gate/up, then down), and for each group in
   order accumulate H from the block's forward over the calibration set (stopping right before the
   group's last Linear runs), solve, and write the dequantized Q back, so that later groups see the
   quantized outputs of earlier ones. Then run the quantized block to produce the next block's inputs.
   With fp targets (GPTAQ), the block's fp copy runs beside it on the fp model's inputs, and each
   Linear is fit to reproduce its fp outputs from its quantized inputs (gptq.GPTQ.add_batch).
   The passes after the attention's last group reuse its outputs (ChildMemo): attention runs once
   per batch and path, not once per group.
3. lm_head (opt-in) is quantized last on the final norm's output; embeddings and norms stay fp.

Memory: the model's embeddings and norms, one block's Linear weights at a time (BlockWeights), one
[nsamples, seqlen, hidden] fp32 activation buffer updated in place and one in the forward dtype for
the block's attention outputs (twice with fp targets: the fp model's path as well), plus one
group's Hessians.

Resume: after each block, the block's packed tensors, the next block's inputs and the report so far
go to `<out>.partial/` (each file written to a temporary name and renamed; the state file last).
Rerunning the same command continues from there and writes a bit-identical model.safetensors;
different settings refuse to resume.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import checkpoint, report as rpt

log = logging.getLogger(__name__)

DEFAULT_CALIB = ("mix",)  # Shakespeare + Python docs: generalizes better than either alone
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 512  # the paper uses 128 x 2048; 512 tokens suffice for small models and 4x faster
DEFAULT_BATCH = 4  # samples per forward: 8 ran no faster and its temporaries fragmented the heap (peak RSS)
# Block forwards are ~3/4 of a run; bf16 matmuls are ~4x faster than fp32 on AVX512-BF16 CPUs and
# GPUs, and cost no measurable quality (benchmarks/quality.py, README). Weights and solves stay fp32.
FORWARD_DTYPES = ("bf16", "fp32")
DEFAULT_FORWARD_DTYPE = "bf16"
METHODS = ("gptq", "rtn")
DEFAULTS = {"act_order": True, "sym": False, "mse": True, "fp_targets": True, "refine_scales": False}  # CLI
CAUSAL_LM_ARCHS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration")  # config.json architectures
STATE_VERSION = 1
# Where HF causal LMs keep their decoder blocks and final norm (first match wins).
BLOCK_LISTS = ("model.layers", "model.language_model.layers", "model.decoder.layers",
               "gpt_neox.layers", "transformer.h")
FINAL_NORMS = ("model.norm", "model.language_model.norm", "model.decoder.final_layer_norm",
               "gpt_neox.final_layer_norm", "transformer.ln_f")


class _StopForward(Exception):
    """Raised from a hook once a forward pass has produced everything needed from it."""


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


# ---------------------------------------------------------------------------------------------
# The model: loading, blocks, captured block inputs
# ---------------------------------------------------------------------------------------------

def load_causal_lm(model_dir: str | os.PathLike):
    """The fp model in fp32 (GPTQ's Hessians and solves need it) and its source dtype."""
    import transformers
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise fmt.FormatError(f"{model_dir} is not a Hugging Face model folder (no config.json): point "
                              "--model at a folder saved with save_pretrained")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING or (
            archs and not any(k in a for a in archs for k in CAUSAL_LM_ARCHS)):
        kind = ", ".join(archs) or "no architectures"
        raise fmt.FormatError(f"{model_dir} holds a {config.model_type!r} model ({kind}), which is not a "
                              "causal language model: GPTQ quantization here needs an AutoModelForCausalLM "
                              "checkpoint")
    src_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(src_dtype, str):
        src_dtype = getattr(torch, src_dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except OSError as e:  # no or unreadable weight files
        raise fmt.FormatError(f"cannot load the model weights from {model_dir}: {e}") from e
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model, src_dtype


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in BLOCK_LISTS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return path, blocks
    raise fmt.FormatError(f"cannot find the decoder blocks of {type(model).__name__}: expected a "
                          f"ModuleList at one of {BLOCK_LISTS} (add this architecture's path to BLOCK_LISTS)")


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise fmt.FormatError(f"cannot find the final norm of {type(model).__name__} (needed to quantize "
                          f"lm_head): expected one of {FINAL_NORMS}")


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def capture_block_inputs(model, blocks: torch.nn.ModuleList, ids: torch.Tensor, batches: list[slice],
                         keep_hidden: bool = True, paths: int = 1):
    """(hidden states entering block 0 [paths, n, L, D] (each path a copy) or None, kwargs[batch][block]).

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
                raise _StopForward
            return hidden_states
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for sl in batches:
            captured: list[torch.Tensor] = []
            try:
                model(input_ids=ids[sl], use_cache=False)
            except _StopForward:
                pass
            if keep_hidden:
                if hidden is None:
                    hidden = torch.empty((paths, ids.shape[0]) + captured[0].shape[1:], dtype=captured[0].dtype)
                hidden[:, sl] = captured[0]
            kwargs.append(list(per_block))
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    return hidden, kwargs


class BlockWeights:
    """A block's Linear weights in private memory only while the block is being quantized.

    transformers maps the checkpoint files and reads weights from the mapping: every page read
    counts in RSS until the process ends, so a plain run ends up holding the whole fp model.
    Reading a block's weights with a short-lived safe_open (its mapping closed right after) and
    dropping them once the block is done keeps one block's weights live at a time. A weight not
    found under its own name in the files is copied from the model instead (no saving, same result).
    """

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open
            self.where = {}
            for f in sorted(model_dir.glob("*.safetensors")):
                with safe_open(f, "pt") as fh:
                    self.where.update(dict.fromkeys(fh.keys(), f))

    def load(self, linears: dict[str, torch.nn.Linear]) -> None:
        from safetensors import safe_open
        for name, module in linears.items():
            w, f = module.weight, self.where.get(f"{name}.weight")
            t = None
            if f is not None:
                with safe_open(f, "pt") as fh:
                    t = fh.get_tensor(f"{name}.weight").to(w.dtype)
            if t is None or t.shape != w.shape:
                t = w.detach().clone()
            module.weight = torch.nn.Parameter(t, requires_grad=False)

    @staticmethod
    def drop(linears: dict[str, torch.nn.Linear]) -> None:
        """The packed tensors hold the result; nothing reads these weights again."""
        for module in linears.values():
            module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)


def _block_output(out):
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


# ---------------------------------------------------------------------------------------------
# Quantizing one block
# ---------------------------------------------------------------------------------------------

def _row(name: str, block: int, lcfg: fmt.QuantConfig, stats: dict[str, Any], sqnr: float,
         seconds: float) -> dict[str, Any]:
    return {"name": name, "block": block, "bits": lcfg.bits, "group_size": lcfg.group_size,
            "sym": lcfg.sym, "desc_act": lcfg.desc_act, "damp": stats.get("damp_percent"),
            "escalations": stats.get("damp_escalations", 0), "cond": stats.get("hessian_cond_est"),
            "dead_columns": stats.get("dead_columns", 0), "fallback": stats.get("fallback"),
            "hints": rpt.hints(stats), "loss": stats.get("loss"), "sqnr_db": sqnr, "seconds": seconds}


def _pack(module: torch.nn.Linear, result, lcfg: fmt.QuantConfig, checkpoint_format: str):
    packed = fmt.pack_layer(result.q, result.zeros, result.scales, result.g_idx, lcfg.bits,
                            checkpoint_format)
    if module.bias is not None:
        packed["bias"] = module.bias.detach().to(torch.float16)
    return packed


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
    """

    def __init__(self, block: torch.nn.Module, groups: list[list[str]], batches: list[slice],
                 fp: bool = False, passthrough: dict[str, tuple[str, int | None]] | None = None):
        self.children = dict(block.named_children())
        self.batches = batches
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
                y = linear(inputs[sl])
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
            buf = self.buffers[child] = head.new_empty((self.batches[-1].stop,) + head.shape[1:])
        elif buf.shape[1:] != head.shape[1:] or buf.dtype != head.dtype:
            return False
        buf[sl] = head
        self.arity[child] = n
        self.stored.add((child, b))
        return True

    def _load(self, child: str, b: int):
        y = self.buffers[child][self.batches[b]].clone()  # a copy: callers may modify it in place
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


@torch.no_grad()
def _inputs_of(block, members: list[str], x: torch.Tensor, kw: dict[str, Any], autocast,
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
                raise _StopForward
        handles.append(modules[m].register_forward_pre_hook(hook))
    if out is None and stop_after is not None:
        def stop(module, args, output):
            raise _StopForward
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with autocast():
            y = _block_output(block(x, **kw))
        if out is not None:
            out[:] = y
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def quantize_group(block, members: list[str], layers: dict[str, tuple[torch.nn.Linear, fmt.QuantConfig, str]],
                   acts: torch.Tensor, kwargs: list[dict[str, Any]], batches: list[slice],
                   cfg: fmt.QuantConfig, block_index: int, progress: Callable[[str], None], calib: Calibration,
                   fp_block=None, last: bool = False, memos: tuple[ChildMemo, ChildMemo | None] | None = None,
                   done: int = 0):
    """Hessians of `members` from the block's forward over the calibration set, then GPTQ each.

    acts[0] holds the block's inputs in the quantized model; with fp targets (fp_block: the block's
    fp copy), acts[1] holds them in the fp model, and each Linear is fit to its fp outputs; the
    block's `last` group also advances acts[1] to the fp block's outputs.
    Members reading the same input share one Hessian (accumulated once, copied). The forwards stop
    before the last member runs: nothing after it is needed. memos: the quantized and fp blocks'
    ChildMemos; done: how many of the block's groups are quantized already.
    """
    from vllm_gptq_plugin.offline_quant.gptq import GPTQ
    gptq = {m: GPTQ(layers[m][0], layers[m][2]) for m in members}
    alias: dict[str, str] = {}
    qmemo, fpmemo = memos or (None, None)
    computable = qmemo.computable(members, done) if qmemo is not None else {}
    kept: dict[str, torch.Tensor] = {}  # the inputs of the members in `computable`, all batches
    for b, sl in enumerate(batches):
        limit = acts[0][sl].numel() * acts.element_size()
        with _memo(qmemo, b, done, members, limit):
            xs = _inputs_of(block, members, acts[0][sl], kwargs[b], calib.autocast)
        targets = {}
        if fp_block is not None:
            # The fp block never changes: where a later pass can reuse the output of the child holding
            # the last member, this pass runs on to that child's end to record it (stop_after); the
            # last pass runs to the end and moves the fp path on to the next block's inputs.
            with _memo(fpmemo, b, done, members, 0 if last else limit):
                targets = _inputs_of(fp_block, members, acts[1][sl], kwargs[b], calib.autocast,
                                     out=acts[1][sl] if last else None,
                                     stop_after=fpmemo.stop_after(members, done) if fpmemo else None)
            assert set(targets) == set(members), f"the fp block's pass missed {set(members) - set(targets)}"
        for m in computable:
            if m not in kept:
                kept[m] = xs[m].new_empty((acts.shape[1],) + xs[m].shape[1:])
            kept[m][sl] = xs[m]
        with calib.hessian_gemms():
            for i, m in enumerate(members):
                src = next((s for s in members[:i] if xs[s] is xs[m]), None)
                if src is None:
                    gptq[m].add_batch(xs[m], targets.get(m))
                else:
                    alias[m] = src
        del xs, targets
    for m, src in alias.items():
        gptq[m].H = gptq[src].H.clone()
        gptq[m].C = None if gptq[src].C is None else gptq[src].C.clone()
        gptq[m].nsamples = gptq[src].nsamples
    packed, rows = {}, []
    for m in members:
        module, lcfg, full = layers[m]
        progress(full)
        t0 = time.perf_counter()
        H = gptq[m].H.clone()  # fasterquant damps H in place; SQNR needs the raw one
        result = gptq[m].fasterquant(lcfg)
        # SQNR against what the solve quantized: the fp-target weights W' when there are some
        W = gptq[m].target if gptq[m].target is not None else module.weight.detach().float().clone()
        module.weight.copy_(result.Q.to(module.weight.dtype))
        packed[full] = _pack(module, result, lcfg, cfg.checkpoint_format)
        seconds = time.perf_counter() - t0
        rows.append(_row(full, block_index, lcfg, result.stats,
                         rpt.output_sqnr_db(W, result.Q, H), seconds))
        gptq[m].free()
        del W, H, result
        if m in kept:  # the child's output in every later pass
            qmemo.fill(computable[m], kept.pop(m), module, calib.autocast)
    return packed, rows


@torch.no_grad()
def run_block(block, inps: torch.Tensor, kwargs: list[dict[str, Any]], batches: list[slice], autocast,
              memo: ChildMemo | None = None, done: int = 0) -> None:
    """inps <- block(inps), batch by batch in place: only one activation buffer is ever live."""
    for b, sl in enumerate(batches):
        with _memo(memo, b, done, (), 0), autocast():
            inps[sl] = _block_output(block(inps[sl], **kwargs[b]))


def _memo(memo: ChildMemo | None, b: int, done: int, members: Sequence[str], limit_bytes: int):
    return memo.use(b, done, members, limit_bytes) if memo is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Resume state: <out>.partial/
# ---------------------------------------------------------------------------------------------

class WorkState:
    """Finished blocks' packed tensors, the next block's inputs and the report rows, on disk."""

    def __init__(self, out: Path, key: dict[str, Any]):
        self.dir = out.with_name(out.name + ".partial")
        self.key = json.loads(json.dumps(key))  # as state.json will hold it (tuples become lists)
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

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
        """The saved state to continue from, or None (starting afresh, old state removed)."""
        state_file = self.dir / "state.json"
        if not state_file.exists():
            shutil.rmtree(self.dir, ignore_errors=True)  # died before finishing a block: nothing to keep
            return None
        state = json.loads(state_file.read_text())
        if not resume:
            log.info("discarding the earlier partial run in %s (resume is off)", self.dir)
            shutil.rmtree(self.dir)
            return None
        if state.get("digest") != self.digest:
            old = state.get("key", {})
            diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            raise fmt.FormatError(f"{self.dir} holds a partial run with different settings ({', '.join(diff)} "
                                  "differ): rerun with the same arguments to resume it, or pass --no-resume "
                                  "to discard it and start over")
        return state

    def restore(self, state: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        from safetensors.torch import load_file
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(state["done"]):
            for key, t in load_file(self.dir / f"block-{i:04d}.safetensors").items():
                name, sfx = key.rsplit(".", 1)
                packed.setdefault(name, {})[sfx] = t
        hidden = np.fromfile(self.dir / state["inputs"], dtype=np.float32)
        return packed, torch.from_numpy(hidden.reshape(state["inputs_shape"]))

    def save(self, done: int, block_packed: dict[str, dict[str, torch.Tensor]], inps: torch.Tensor,
             rows: list[dict[str, Any]]) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        flat = {f"{n}.{s}": t.contiguous() for n, ts in block_packed.items() for s, t in ts.items()}
        self._write(f"block-{done - 1:04d}.safetensors", lambda p: save_file(flat, p))
        # Raw fp32 bytes, written straight from the buffer: safetensors would first copy it in memory.
        assert inps.dtype == torch.float32 and inps.is_contiguous()
        inputs = f"inputs-{done:04d}.f32"
        self._write(inputs, lambda p: inps.numpy().tofile(p))
        state = {"version": STATE_VERSION, "digest": self.digest, "key": self.key, "done": done,
                 "inputs": inputs, "inputs_shape": list(inps.shape), "rows": rows}
        self._write("state.json", lambda p: p.write_text(json.dumps(state)))  # json keeps inf
        for old in self.dir.glob("inputs-*"):
            if old.name != inputs:
                old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _run_key(model_dir: Path, cfg: fmt.QuantConfig, calib: Calibration, method: str, batch_size: int,
             ids: torch.Tensor | None) -> dict[str, Any]:
    """Everything the result depends on; a saved state is resumed only if all of it matches."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    return {"model": str(model_dir.absolute()), "weights": [list(w) for w in weights],
            "config": cfg.to_dict(), "method": method, "calibration": dataclasses.asdict(calib),
            "batch_size": batch_size,
            "calibration_tokens": None if ids is None else hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------

def _bars(enabled: bool):
    from tqdm.auto import tqdm
    return lambda **kw: tqdm(disable=not enabled, **kw)


def quantize_model(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: fmt.QuantConfig,
                   calib: Calibration = Calibration(), method: str = "gptq", resume: bool = True,
                   overwrite: bool = False, batch_size: int = DEFAULT_BATCH, threads: int | None = None,
                   progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Quantize the HF causal LM at `model_dir` into checkpoint `out`; returns (path, report)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  lazy imports: ~300 MiB of modules
    t_start, baseline_mb = time.perf_counter(), rpt.current_rss_mb()  # the interpreter, torch, transformers
    model_dir, out = Path(model_dir), Path(out).absolute()
    if method not in METHODS:
        raise fmt.FormatError(f"unknown method {method!r}: choose one of {METHODS}")
    if calib.forward_dtype not in FORWARD_DTYPES:
        raise fmt.FormatError(f"unknown forward dtype {calib.forward_dtype!r}: choose one of {FORWARD_DTYPES}")
    if out.exists() and not overwrite:  # fail before the slow part
        raise fmt.FormatError(f"{out} already exists: choose another output folder or pass --overwrite")
    if threads:
        torch.set_num_threads(threads)
    model, src_dtype = load_causal_lm(model_dir)
    memory = {**_memory(model, cfg, calib, method), "baseline_rss_mb": baseline_mb}  # before weights are dropped
    cfg = dataclasses.replace(cfg, meta={**cfg.meta, "quantizer": "vllm-gptq-plugin", "method": method})
    targets = checkpoint.quantizable_linears(model, cfg)  # refuses shapes the format cannot hold
    bars = _bars(progress)
    if method == "rtn":
        packed, rows = _rtn(targets, cfg, bars)
        calib_info = None
    else:
        from vllm_gptq_plugin.offline_quant.gptq import NonFiniteActivations
        try:
            packed, rows = _gptq(model, model_dir, out, targets, cfg, calib, resume, batch_size, bars)
        except NonFiniteActivations as e:  # a data/model problem, not a crash: one clear message
            raise fmt.FormatError(str(e)) from e
        calib_info = dataclasses.asdict(calib)
    rep = {"method": method, "config": cfg.to_dict(), "calibration": calib_info,
           "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - t_start,
           "peak_rss_mb": rpt.peak_rss_mb(),
           "memory": memory,
           "layers": rows, "sensitivity": rpt.sensitivity(rows)}
    path = checkpoint.write(model, packed, cfg, out, model_dir, overwrite,
                            {rpt.REPORT_FILE: rpt.to_json(rep)}, dtype=src_dtype)
    if method == "gptq":
        WorkState(out, {}).remove()
    return path, rep


def _memory(model, cfg: fmt.QuantConfig, calib: Calibration, method: str) -> dict[str, float]:
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied lm_head counted once
    model_mb = sum(t.numel() * t.element_size() for t in unique.values()) / 2**20
    paths = 2 if cfg.meta.get("fp_targets") else 1  # the quantized model's path (and the fp model's)
    # per path: the block inputs in fp32, and ChildMemo's attention outputs in the forward dtype
    per_token = 4 + (2 if calib.forward_dtype == "bf16" else 4)
    act_mb = 0.0 if method == "rtn" else paths * calib.nsamples * calib.seqlen * model.config.hidden_size * per_token / 2**20
    return {"model_mb": model_mb, "activations_mb": act_mb, "bound_mb": 1.5 * model_mb + act_mb}


def _rtn(targets, cfg: fmt.QuantConfig, bars):
    from vllm_gptq_plugin.offline_quant import rtn
    packed, rows = {}, []
    for name, (module, lcfg) in bars(iterable=targets.items(), desc="rtn", unit="layer"):
        t0 = time.perf_counter()
        W = module.weight.detach().float()
        q, zeros, scales, g_idx = rtn.quantize_weight(W, lcfg)
        packed[name] = fmt.pack_layer(q, zeros, scales, g_idx, lcfg.bits, cfg.checkpoint_format)
        if module.bias is not None:
            packed[name]["bias"] = module.bias.detach().to(torch.float16)
        Q = (q.float() - zeros[g_idx.long()].t().float()) * scales[g_idx.long()].t()
        rows.append(_row(name, -1, lcfg, {}, rpt.output_sqnr_db(W, Q, None), time.perf_counter() - t0))
    return packed, rows


def _gptq(model, model_dir: Path, out: Path, targets, cfg: fmt.QuantConfig, calib: Calibration,
          resume: bool, batch_size: int, bars):
    import transformers
    from vllm_gptq_plugin.offline_quant import data
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = data.calibration_samples(tokenizer, list(calib.sources), calib.nsamples, calib.seqlen, calib.seed)
    prefix, blocks = decoder_blocks(model)
    batches = batch_slices(ids.shape[0], batch_size)
    fp_targets = bool(cfg.meta.get("fp_targets", False))
    weights = BlockWeights(model_dir)
    work = WorkState(out, _run_key(model_dir, cfg, calib, "gptq", batch_size, ids))
    state = work.load(resume)
    if state is None:
        start, packed, rows = 0, {}, []
        # acts [paths, n, L, D]: inputs in the quantized model, and with fp targets in the fp model too
        acts, kwargs = capture_block_inputs(model, blocks, ids, batches, paths=2 if fp_targets else 1)
    else:
        start, rows = state["done"], state["rows"]
        packed, acts = work.restore(state)
        _, kwargs = capture_block_inputs(model, blocks, ids, batches, keep_hidden=False)
        log.info("resuming from %s: %d of %d blocks already quantized", work.dir, start, len(blocks))
    block_bar = bars(total=len(blocks), initial=start, desc="blocks", unit="block")
    groups = None
    for i in range(start, len(blocks)):
        block, bprefix = blocks[i], f"{prefix}.{i}."
        layers = {name[len(bprefix):]: (module, lcfg, name) for name, (module, lcfg) in targets.items()
                  if name.startswith(bprefix)}
        block_kw = [kw[i] for kw in kwargs]
        linears = {full: module for module, _, full in layers.values()}
        weights.load(linears)
        if groups is None or set(layers) != {n for g in groups for n in g}:  # else same as the last block
            with calib.autocast():  # traces of one batch, with the passes' (smaller) temporaries
                groups = sequential_groups(block, list(layers), acts[0][batches[0]], block_kw[0],
                                           cfg.true_sequential)
                passthrough = passthrough_children(block, groups, acts[0][batches[0]], block_kw[0])
        layer_bar = bars(total=len(layers), desc=f"block {i}", unit="layer", leave=False)
        block_packed = {}
        fp_block = copy.deepcopy(block) if fp_targets else None
        memos = (ChildMemo(block, groups, batches, passthrough=passthrough),
                 ChildMemo(fp_block, groups, batches, fp=True) if fp_targets else None)
        for done, members in enumerate(groups):
            def step(name):
                layer_bar.set_postfix_str(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1])
            p, r = quantize_group(block, members, layers, acts, block_kw, batches, cfg, i, step, calib,
                                  fp_block, last=members is groups[-1], memos=memos, done=done)
            layer_bar.update(len(members))
            block_packed.update(p)
            rows.extend(r)
        layer_bar.close()
        run_block(block, acts[0], block_kw, batches, calib.autocast, memos[0], len(groups))
        del fp_block, memos
        weights.drop(linears)
        packed.update(block_packed)
        work.save(i + 1, block_packed, acts, rows)
        block_bar.update(1)
    block_bar.close()
    if "lm_head" in targets:
        packed["lm_head"], row = _lm_head(model, targets["lm_head"], acts[0], batches, cfg)
        rows.append(row)
    return packed, rows


@torch.no_grad()
def _lm_head(model, target, inps: torch.Tensor, batches: list[slice], cfg: fmt.QuantConfig):
    from vllm_gptq_plugin.offline_quant.gptq import GPTQ
    module, lcfg = target
    if module.weight is model.get_input_embeddings().weight:  # tied: quantize a copy, keep the embedding
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    norm = final_norm(model)
    g = GPTQ(module, "lm_head")
    for sl in batches:
        g.add_batch(norm(inps[sl]))
    t0 = time.perf_counter()
    W, H = module.weight.detach().float().clone(), g.H.clone()
    result = g.fasterquant(lcfg)
    module.weight.copy_(result.Q)
    packed = _pack(module, result, lcfg, cfg.checkpoint_format)
    row = _row("lm_head", -1, lcfg, result.stats, rpt.output_sqnr_db(W, result.Q, H), time.perf_counter() - t0)
    g.free()
    return packed, row


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

RULE_KEYS = {"bits": int, "group_size": int, "sym": lambda v: v.lower() in ("1", "true", "yes"),
             "desc_act": lambda v: v.lower() in ("1", "true", "yes")}


def parse_rule(text: str) -> tuple[str, dict[str, Any]]:
    """'REGEX=bits:8,group_size:128' -> ('+:REGEX', {'bits': 8, 'group_size': 128})."""
    regex, eq, spec = text.rpartition("=")
    if not eq or not regex:
        raise fmt.FormatError(f"--rule {text!r}: expected REGEX=key:value[,key:value], e.g. "
                              r"'.*\.down_proj$=bits:8'")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, colon, value = item.partition(":")
        if not colon or key not in RULE_KEYS:
            raise fmt.FormatError(f"--rule {text!r}: {item!r} is not key:value with key in {sorted(RULE_KEYS)}")
        try:
            overrides[key] = RULE_KEYS[key](value)
        except ValueError as e:
            raise fmt.FormatError(f"--rule {text!r}: {key} must be an integer, got {value!r}") from e
    return f"+:{regex}", overrides


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF causal LM folder (fp16/bf16/fp32 safetensors)")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--method", choices=METHODS, default="gptq", help="gptq (calibrated) or rtn (baseline)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 for per-channel")
    # Defaults: the best settings measured on SmolLM2 (README, "GPTQ vs RTN"); vLLM's built-in gptq
    # path reads only --sym --no-act-order checkpoints, this plugin reads all of them.
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--act-order", action=on_off, default=DEFAULTS["act_order"],
                   help="desc_act: quantize columns by descending H diag")
    p.add_argument("--asym", dest="sym", action="store_false", default=DEFAULTS["sym"],
                   help="asymmetric grid, a zero point per group (the default)")
    p.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid")
    p.add_argument("--static-groups", action="store_true", help="group grids fixed before the solve")
    p.add_argument("--damp-percent", type=float, default=0.01, help="damping, a fraction of mean diag(H)")
    p.add_argument("--mse", action=on_off, default=DEFAULTS["mse"], help="MSE-optimal clipping of each group's grid")
    p.add_argument("--fp-targets", action=on_off, default=DEFAULTS["fp_targets"],
                   help="fit each layer to the fp model's outputs, not its own on quantized inputs (GPTAQ)")
    p.add_argument("--fp-target-damp", type=float, default=None,
                   help="damping of the fp-target correction, a fraction of mean diag(H) (default 0.1)")
    p.add_argument("--refine-scales", action=on_off, default=DEFAULTS["refine_scales"],
                   help="re-fit group scales to GPTQ's levels by least squares on H after the solve")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="quantize all of a block's Linears from fp inputs (faster, slightly worse)")
    p.add_argument("--format", dest="checkpoint_format", choices=fmt.FORMATS, default="gptq")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=bits:B,group_size:G",
                   help="per-module override (re.match on the module name), repeatable")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX", help="leave matching modules fp")
    p.add_argument("--calib", nargs="+", default=list(DEFAULT_CALIB),
                   help="calibration sources: mix (default), pydocs, shakespeare, corpus:split, .txt/.jsonl "
                        "files or HF dataset folders")
    p.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES)
    p.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-dtype", choices=FORWARD_DTYPES, default=DEFAULT_FORWARD_DTYPE,
                   help="dtype of the calibration forward passes (bf16: ~2-4x faster on CPU)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="calibration samples per forward")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run of the same command (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="discard an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args) -> fmt.QuantConfig:
    dynamic: dict[str, dict[str, Any]] = {f"-:{regex}": {} for regex in args.skip}
    dynamic.update(parse_rule(r) for r in args.rule)
    return fmt.QuantConfig(bits=args.bits, group_size=args.group_size, desc_act=args.act_order,
                           static_groups=args.static_groups, sym=args.sym,
                           damp_percent=args.damp_percent, true_sequential=args.true_sequential,
                           checkpoint_format=args.checkpoint_format, lm_head=args.lm_head, dynamic=dynamic,
                           meta={**{k: True for k in ("mse", "fp_targets", "refine_scales") if getattr(args, k)},
                                 **({"fp_target_damp": args.fp_target_damp} if args.fp_target_damp is not None else {})})


def run(args) -> int:
    cfg = config_from_args(args)
    calib = Calibration(tuple(args.calib), args.nsamples, args.seqlen, args.seed, args.forward_dtype)
    path, rep = quantize_model(args.model, args.out, cfg, calib, method=args.method, resume=args.resume,
                               overwrite=args.overwrite, batch_size=args.batch_size, threads=args.threads,
                               progress=args.progress)
    print(rpt.table(rep["layers"]))
    print(rpt.summary(rep))
    print(f"checkpoint written to {path} (report: {path / rpt.REPORT_FILE})")
    return 0
