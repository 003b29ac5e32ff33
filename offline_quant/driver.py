"""GPTQ on a whole model, one decoder block at a time (the GPTQ paper's pipeline, as in its reference
llama.py):

1. Capture what enters the decoder blocks for the calibration set: the hidden states entering block 0
   and each block's keyword arguments (position embeddings, mask, position ids), by replacing every
   block's forward with a recorder, so that only the embeddings run (tracing.capture_block_inputs).
2. For each block: find its Linears' true-sequential groups by tracing one batch (Linears that read
   the same input tensor form a group: q/k/v, then o, then gate/up, then down), and for each group in
   order accumulate H from the block's forward over the calibration set (stopping right before the
   group's last Linear runs), solve, and write the dequantized Q back, so that later groups see the
   quantized outputs of earlier ones (block.quantize_group). Then run the quantized block to produce
   the next block's inputs (block.run_block).
   With fp targets (GPTAQ), the block's fp copy runs beside it on the fp model's inputs, and each
   Linear is fit to reproduce its fp outputs from its quantized inputs (gptq.GPTQ.add_batch).
   The passes after the attention's last group reuse its outputs (memo.ChildMemo): attention runs
   once per batch and path, not once per group.
3. lm_head (opt-in) is quantized last on the final norm's output; embeddings and norms stay fp.

Memory: the model's embeddings and norms, one block's Linear weights at a time (model_io.BlockWeights),
one [nsamples, seqlen, hidden] fp32 activation buffer updated in place and one in the forward dtype
for the block's attention outputs (twice with fp targets: the fp model's path as well), plus one
group's Hessians.

Resume (resume.WorkState): a run killed after a finished block continues from it when rerun. SIGTERM
and SIGINT stop a run at the end of the current block, its state saved (stopping.py).

Before the slow part (preflight.py): the output folder must take files and have room for the checkpoint
and the resume state, the calibration windows must fit the model's positions and its activations the
memory they will live in.

Devices (devices.py): the model stays on the CPU, each block in turn and the activations go to the
compute device. Ranks (distributed.py): each forwards its share of the samples, Hessians are summed,
rank 0 solves and writes.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import (checkpoint, devices, distributed, model_io, preflight, refine,
                                            report as rpt, stopping)
from vllm_gptq_plugin.offline_quant.block import quantize_group, run_block
from vllm_gptq_plugin.offline_quant.calibration import (DEFAULT_BATCH, FORWARD_DTYPES, Calibration,
                                                        resolve_forward_dtype)
from vllm_gptq_plugin.offline_quant.gptq import GPTQ, NonFiniteActivations
from vllm_gptq_plugin.offline_quant.memo import ChildMemo
from vllm_gptq_plugin.offline_quant.resume import WorkState, run_key
from vllm_gptq_plugin.offline_quant.tracing import (batch_slices, capture_block_inputs, passthrough_children,
                                                    sequential_groups)

log = logging.getLogger(__name__)


def quantize_model(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: fmt.QuantConfig,
                   calib: Calibration = Calibration(), resume: bool = True, overwrite: bool = False,
                   batch_size: int = DEFAULT_BATCH, threads: int | None = None, progress: bool = True,
                   offload_activations: bool = False,
                   dist_timeout: float = distributed.DEFAULT_TIMEOUT_S) -> tuple[Path, dict[str, Any] | None]:
    """GPTQ-quantize the HF causal LM at `model_dir` into checkpoint `out`; returns (path, report).

    calib.device: "cpu", "cuda[:N]" or "auto" (the GPU when torch sees one); offload_activations:
    keep the calibration activations in pinned CPU memory instead of on the GPU. Launched by torchrun
    (distributed.py), the ranks share the calibration samples; rank 0 writes the checkpoint and
    returns the report, the other ranks return None for it.
    """
    if calib.forward_dtype not in FORWARD_DTYPES:
        raise fmt.FormatError(f"unknown forward dtype {calib.forward_dtype!r}: choose one of {FORWARD_DTYPES}")
    ranks = distributed.world_size_from_env()
    if ranks > calib.nsamples:
        raise fmt.FormatError(f"{ranks} ranks but {calib.nsamples} calibration samples: each rank needs at "
                              f"least one; pass --nsamples {ranks} or more, or launch fewer ranks")
    preflight.check_seqlen(Path(model_dir), calib.seqlen)
    if cfg.meta.get("refine") and not cfg.meta.get("fp_targets"):
        raise fmt.FormatError("--refine fits each block to the fp model's outputs, which only the fp-target path "
                              "computes: drop --no-fp-targets, or --refine")
    if cfg.meta.get("refine") and ranks > 1:
        raise fmt.FormatError("--refine runs in one process for now: launch without torchrun, or drop --refine")
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if ranks > 1 else None
    device = devices.resolve(calib.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what code that does not name a device (libraries) then uses
    calib = dataclasses.replace(calib, device=str(device),
                                forward_dtype=resolve_forward_dtype(calib.forward_dtype, str(device)))
    world = distributed.join(device.type, dist_timeout)
    try:
        return _quantize_model(model_dir, out, cfg, calib, resume, overwrite, batch_size, threads, progress,
                               devices.Placement(device, offload_activations), world)
    finally:
        world.close()


def _quantize_model(model_dir, out, cfg: fmt.QuantConfig, calib: Calibration, resume: bool, overwrite: bool,
                    batch_size: int, threads: int | None, progress: bool, place: devices.Placement,
                    world: distributed.World) -> tuple[Path, dict[str, Any] | None]:
    devices.reset_peak_memory(place.compute)
    run = model_io.load_for_quantization(model_dir, out, overwrite, threads)
    shard = world.shard(calib.nsamples)  # this rank's calibration samples: its activations
    memory = {**rpt.memory(run.model, cfg, dataclasses.replace(calib, nsamples=shard.stop - shard.start),
                           model_io.decoder_blocks(run.model)[1][0], place.offload),
              "baseline_rss_mb": run.baseline_mb}  # before weights are dropped
    cfg = checkpoint.stamped(cfg, "gptq")
    targets = checkpoint.quantizable_linears(run.model, cfg)  # refuses shapes the format cannot hold
    _preflight(run, targets, cfg, calib, memory, place, world)
    ids = _calibration_ids(run.model_dir, calib)
    work = WorkState(run.out, run_key(run.model_dir, cfg, calib, "gptq", batch_size, ids, world.size), world)
    try:
        with stopping.StopRequests() as stop:
            packed, rows = _gptq(run.model, run.model_dir, targets, cfg, calib, ids[world.shard(len(ids))], work,
                                 resume, batch_size, rpt.progress_bars(progress and world.leader), place, world,
                                 stop)
    except NonFiniteActivations as e:  # a data/model problem, not a crash: one clear message
        raise fmt.FormatError(_non_finite_message(e, run.model, calib)) from e
    peaks = world.gather((rpt.peak_rss_mb(), devices.peak_memory_mb(place.compute)), "reporting peak memory")
    path, rep = run.out, None
    if world.leader:
        rep = rpt.build("gptq", cfg, dataclasses.asdict(calib), rows, time.perf_counter() - run.t_start, memory,
                        peak_gpu_mb=peaks[0][1])
        if world.size > 1:
            rep["ranks"] = {"world_size": world.size, "peak_rss_mb": [p[0] for p in peaks],
                            "peak_gpu_mb": [p[1] for p in peaks]}
        path = checkpoint.write(run.model, packed, cfg, run.out, run.model_dir, overwrite,
                                {rpt.REPORT_FILE: rpt.to_json(rep)}, dtype=run.src_dtype)
    world.roll_call("writing the checkpoint")  # the resume state goes only once the checkpoint is there
    work.remove()
    return path, rep


def _preflight(run: model_io.Loaded, targets, cfg: fmt.QuantConfig, calib: Calibration, memory: dict[str, float],
               place: devices.Placement, world: distributed.World) -> None:
    """Stop every rank before anything large is allocated or computed if this rank's calibration
    activations do not fit where they will live, or the output folder has no room for the checkpoint
    and the resume state (the inputs of all ranks: on one machine they share the folder)."""
    fp_targets = bool(cfg.meta.get("fp_targets", False))
    shard = world.shard(calib.nsamples)  # memory holds this rank's activations
    world.check(preflight.activation_memory_problem(int(memory["activations_mb"] * 2**20), place.store,
                                                    shard.stop - shard.start, calib.seqlen, fp_targets),
                "checking the memory for the calibration activations")
    ckpt, quantized = preflight.checkpoint_bytes(run.model, targets, run.src_dtype, run.model_dir)
    inputs = (2 if fp_targets else 1) * calib.nsamples * calib.seqlen * run.model.config.hidden_size * 4
    world.check(preflight.disk_space_problem(run.out, ckpt, quantized, inputs), "checking the output folder")


def _non_finite_message(e: NonFiniteActivations, model, calib: Calibration) -> str:
    """e's message with the block it happened in and what to do about it."""
    prefix, blocks = model_io.decoder_blocks(model)
    where = "lm_head, after the last block"
    if e.layer and e.layer.startswith(prefix + "."):
        index, name = e.layer[len(prefix) + 1:].split(".", 1)
        where = f"block {index} of {len(blocks)} ({prefix}.{index}), layer {name}"
    if e.kind == "overflow":  # bf16 and fp32 share fp32's range: the forward dtype cannot help
        advice = ("these are the fp model's own activations on this text, as large with --forward-dtype fp32 "
                  "as with bf16: check the model's weights (a norm or scale blown up) and the calibration samples")
    elif calib.bf16:
        advice = ("the blocks ran in bf16 autocast: rerun with --forward-dtype fp32; if the values stay non-finite, "
                  "the fp model itself produces them on this text: check its weights for Inf/NaN and the "
                  "calibration samples")
    else:
        advice = ("the fp model itself produces them on this text in fp32: check its weights for Inf/NaN and the "
                  "calibration samples")
    return f"{where}: {e}; {advice}"


def _calibration_ids(model_dir: Path, calib: Calibration) -> torch.Tensor:
    """All calibration samples [nsamples, seqlen]: every rank draws the same, then takes its share."""
    import transformers
    from vllm_gptq_plugin.offline_quant import data
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return data.calibration_samples(tokenizer, list(calib.sources), calib.nsamples, calib.seqlen, calib.seed)


def _gptq(model, model_dir: Path, targets, cfg: fmt.QuantConfig, calib: Calibration, ids: torch.Tensor,
          work: WorkState, resume: bool, batch_size: int, bars, place: devices.Placement,
          world: distributed.World, stop: stopping.StopRequests):
    """The block loop over this rank's calibration samples `ids`; (packed, rows) on rank 0. After each
    block, a stop request (on any rank) saves the resume state and raises stopping.Interrupted."""
    prefix, blocks = model_io.decoder_blocks(model)
    batches = batch_slices(ids.shape[0], batch_size)
    fp_targets = bool(cfg.meta.get("fp_targets", False))
    weights = model_io.BlockWeights(model_dir)
    refining = bool(cfg.meta.get("refine"))
    state = work.load(resume)
    if state is None:
        start, packed, rows = 0, {}, []
        # acts [paths, n, L, D]: inputs in the quantized model, and with fp targets in the fp model too
        acts, kwargs = capture_block_inputs(model, blocks, ids, batches, paths=2 if fp_targets else 1,
                                            alloc=place.buffer)
    else:
        start, rows = state["done"], state["rows"]
        packed, acts = work.restore(state)
        acts = place.adopt(acts)
        _, kwargs = capture_block_inputs(model, blocks, ids, batches, keep_hidden=False)
        log.info("resuming from %s: %d of %d blocks already quantized", work.dir, start, len(blocks))
    block_bar = bars(total=len(blocks), initial=start, desc="blocks", unit="block")
    groups = None
    for i in range(start, len(blocks)):
        block, bprefix = blocks[i], f"{prefix}.{i}."
        layers = {name[len(bprefix):]: (module, lcfg, name) for name, (module, lcfg) in targets.items()
                  if name.startswith(bprefix)}
        block_kw = [devices.to_device(kw[i], place.compute) for kw in kwargs]
        linears = {full: module for module, _, full in layers.values()}
        weights.load(linears, place.compute)
        block.to(place.compute)  # the rest of it: norms, biases, Linears left fp
        if groups is None or set(layers) != {n for g in groups for n in g}:  # else same as the last block
            x = place.fetch(acts[0][batches[0]])
            with calib.autocast():  # traces of one batch, with the passes' (smaller) temporaries
                groups = sequential_groups(block, list(layers), x, block_kw[0], cfg.true_sequential)
                passthrough = passthrough_children(block, groups, x, block_kw[0])
            del x
        layer_bar = bars(total=len(layers), desc=f"block {i}", unit="layer", leave=False)
        block_packed, keep = {}, ({} if refining else None)
        fp_block = copy.deepcopy(block) if fp_targets else None
        memos = (ChildMemo(block, groups, batches, passthrough=passthrough, place=place),
                 ChildMemo(fp_block, groups, batches, fp=True, place=place) if fp_targets else None)
        for done, members in enumerate(groups):
            def step(name):
                layer_bar.set_postfix_str(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1])
            p, r = quantize_group(block, members, layers, acts, block_kw, batches, cfg, i, step, calib,
                                  fp_block, last=members is groups[-1], memos=memos, done=done, place=place,
                                  world=world, keep=keep)
            layer_bar.update(len(members))
            block_packed.update(p)
            rows.extend(r)
        layer_bar.close()
        if keep:  # acts[1] holds the fp block's outputs now (the last group's pass moved it on)
            if _refine(block, keep, layers, acts, block_kw, batches, cfg, calib, i, place, block_packed, rows):
                memos = (None, memos[1])  # its attention outputs are those of the weights before refinement
        run_block(block, acts[0], block_kw, batches, calib.autocast, memos[0], len(groups), place)
        del fp_block, memos, block_kw
        weights.drop(linears)
        block.to("cpu")
        packed.update(block_packed)
        work.block_done(i + 1, block_packed, acts, rows)
        block_bar.update(1)
        asked = [s for s in world.gather(stop.requested, "checking for a stop request") if s]
        if asked:
            work.flush(i + 1, acts, rows)
            raise stopping.Interrupted(f"stopped by {asked[0]} after {i + 1} of {len(blocks)} blocks, the resume "
                                       f"state saved in {work.dir}: run the same command again to continue",
                                       signal.Signals[asked[0]])
    block_bar.close()
    if "lm_head" in targets:
        lm_head = _lm_head(model, targets["lm_head"], acts[0], batches, cfg, place, world)
        if world.leader:
            packed["lm_head"], row = lm_head
            rows.append(row)
    return packed, rows


def _refine(block, keep, layers, acts, block_kw, batches, cfg: fmt.QuantConfig, calib: Calibration, index: int,
            place: devices.Placement, block_packed: dict, rows: list) -> bool:
    """refine.refine_block on block `index` after GPTQ; the refined layers re-packed into block_packed and
    their report rows annotated. True if the block kept the refined weights."""
    opts = cfg.meta["refine"]
    refined, stats = refine.refine_block(block, keep, acts[0], acts[1], block_kw, batches, calib.autocast,
                                         place.fetch, iters=opts.get("iters", refine.DEFAULT_ITERS),
                                         lr=opts.get("lr"), seed=calib.seed + index)
    by_name = {layers[m][2]: m for m in keep}
    for row in rows:
        m = by_name.get(row["name"])
        if m is not None and row["block"] == index:
            row["refine"] = {**{k: stats[k] for k in ("loss_before", "loss_after", "kept")},
                             **(refined[m].stats if m in refined else {})}
    for m, res in refined.items():
        module, lcfg, full = layers[m]
        solved = keep[m]
        block_packed[full] = checkpoint.pack_linear(module, res.q, solved.zeros, res.scales, solved.g_idx, lcfg,
                                                    cfg.checkpoint_format)
    return bool(refined)


@torch.no_grad()
def _lm_head(model, target, inps: torch.Tensor, batches: list[slice], cfg: fmt.QuantConfig,
             place: devices.Placement, world: distributed.World):
    """lm_head quantized on the final norm's output: (packed, row) on rank 0, None on the others."""
    module, lcfg = target
    if module.weight is model.get_input_embeddings().weight:  # tied: quantize a copy, keep the embedding
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    norm = model_io.final_norm(model)
    norm.to(place.compute)
    module.to(place.compute)
    g = GPTQ(module, "lm_head")
    for sl in batches:
        g.add_batch(norm(place.fetch(inps[sl])))
    world.merge_hessians(g, "summing the Hessian of lm_head")
    norm.to("cpu")
    if not world.leader:
        g.free()
        module.to("cpu")
        return None
    t0 = time.perf_counter()
    diag = g.H.diagonal().clone()  # fasterquant sets dead columns' diagonal to 1 in H; SQNR needs the raw H
    W, result = module.weight.detach().float().clone(), g.fasterquant(lcfg)
    g.H.diagonal().copy_(diag)
    module.weight.copy_(result.Q)
    packed = checkpoint.pack_linear(module, result.q, result.zeros, result.scales, result.g_idx, lcfg,
                                    cfg.checkpoint_format)
    row = rpt.row("lm_head", -1, lcfg, result.stats, rpt.output_sqnr_db(W, result.Q, g.H), time.perf_counter() - t0)
    g.free()
    module.to("cpu")
    return packed, row
