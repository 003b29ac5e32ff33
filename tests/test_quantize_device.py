"""--device: every tensor the quantizer makes lands on the device of its inputs (checked on CPU by making
"meta" the default device: a tensor created without device= would land there and fail), the
activations may live apart from the compute device, one clear error for --device cuda without a
GPU, the GPU settings of the forward and Hessian contexts; and, on a GPU only (opt-in), a CUDA run
agreeing with a CPU run of the same model and calibration."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_gptq_plugin import cli, format as fmt
from vllm_gptq_plugin.offline_quant import api, block as blk, devices, grid, model_io, resume, rtn, tracing
from vllm_gptq_plugin.offline_quant.calibration import Calibration
from vllm_gptq_plugin.offline_quant.gptq import GPTQ
from vllm_gptq_plugin.offline_quant.memo import ChildMemo

RUN = dict(nsamples=8, seqlen=32, threads=1, progress=False, batch_size=3)


def _quantize_block(model, cfg, ids):
    """Block 0 quantized group by group (fp targets when cfg asks), then run: (packed, next inputs)."""
    _, blocks = model_io.decoder_blocks(model)
    batches = tracing.batch_slices(ids.shape[0], 2)
    paths = 2 if cfg.meta.get("fp_targets") else 1
    acts, kwargs = tracing.capture_block_inputs(model, blocks, ids, batches, paths=paths)
    block, kw = copy.deepcopy(blocks[0]), [k[0] for k in kwargs]
    fp_block = copy.deepcopy(block) if paths == 2 else None
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    groups = tracing.sequential_groups(block, names, acts[0][batches[0]], kw[0], True)
    passthrough = tracing.passthrough_children(block, groups, acts[0][batches[0]], kw[0])
    layers = {n: (block.get_submodule(n), cfg, f"model.layers.0.{n}") for n in names}
    memos = (ChildMemo(block, groups, batches, passthrough=passthrough),
             ChildMemo(fp_block, groups, batches, fp=True) if fp_block is not None else None)
    packed = {}
    for done, members in enumerate(groups):
        p, _ = blk.quantize_group(block, members, layers, acts, kw, batches, cfg, 0, lambda n: None, Calibration(),
                                  fp_block, last=members is groups[-1], memos=memos, done=done)
        packed.update(p)
    blk.run_block(block, acts[0], kw, batches, Calibration().autocast, memos[0], len(groups))
    return packed, acts


@pytest.mark.parametrize("meta", [{"mse": True, "fp_targets": True}, {"refine_scales": True}])
def test_block_quantization_creates_every_tensor_on_its_inputs_device(tiny_llama, meta):
    """Under torch.device("meta") every factory call without device= makes a meta tensor, which fails
    as soon as it meets a CPU tensor (fp16_ceil's torch.tensor(inf) and the MSE search's shrink
    factors did): the whole block path (forwards, ChildMemo, Hessians, the solve, packing) runs and
    gives the very same checkpoint tensors and next-block inputs."""
    model, _ = model_io.load_causal_lm(tiny_llama)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = fmt.QuantConfig(bits=3, group_size=32, desc_act=True, sym="refine_scales" in meta, meta=meta)
    ref_packed, ref_acts = _quantize_block(model, cfg, ids)
    with torch.device("meta"):
        packed, acts = _quantize_block(model, cfg, ids)
    assert packed.keys() == ref_packed.keys() and len(packed) == 7
    assert all(torch.equal(packed[n][k], ref_packed[n][k]) for n in packed for k in packed[n])
    assert torch.equal(acts, ref_acts)


def test_solve_corner_cases_create_every_tensor_on_the_inputs_device():
    """The paths a calibrated block rarely takes: RTN fallback, dead columns, static groups, per-channel."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 32, bias=False)
    X = torch.randn(512, 128)
    X[:, 5] = 0  # a dead column
    cases = [(fmt.QuantConfig(bits=4, group_size=32, static_groups=True, desc_act=True), None),
             (fmt.QuantConfig(bits=2, group_size=-1, sym=False, checkpoint_format="gptq_v2"), None),
             (fmt.QuantConfig(bits=4, group_size=64), -torch.eye(128))]  # not PD at any damping: RTN
    for cfg, H in cases:
        results = []
        for default in ("cpu", "meta"):
            with torch.device(default):
                g = GPTQ(layer, "l")
                g.add_batch(X)
                if H is not None:
                    g.H = H.clone()
                results.append(g.fasterquant(cfg, mse=True))
                grid_params = grid.find_params(layer.weight, 3, False, 1, mse=True)
                rtn_q = rtn.quantize_weight(layer.weight, cfg)
        a, b = results
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("q", "zeros", "scales", "g_idx", "Q"))
        assert all(t.device.type == "cpu" for t in (*grid_params, *rtn_q))


def test_activations_kept_apart_from_the_compute_device_give_the_same_checkpoint(tiny_llama, tmp_path,
                                                                                  monkeypatch):
    """As on a GPU (or with --offload-activations) the blocks run on copies of the stored activations:
    every result must be written back to the store, never left in a fetched copy. A CPU run where
    fetch() always copies writes the same bytes, lm_head and the fp-target path included."""
    cfg = api.QuantConfig(bits=4, group_size=32, lm_head=True, meta={"fp_targets": True, "mse": True})
    same = api.quantize(tiny_llama, tmp_path / "same", cfg, **RUN)
    monkeypatch.setattr(devices.Placement, "fetch", lambda self, t: t.clone())
    apart = api.quantize(tiny_llama, tmp_path / "apart", cfg, **RUN, offload_activations=True)
    assert (same / fmt.WEIGHTS_FILE).read_bytes() == (apart / fmt.WEIGHTS_FILE).read_bytes()


def test_cuda_without_a_gpu_is_one_clear_error(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU is present
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--device", "cuda",
                   "--nsamples", "4", "--seqlen", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda: torch sees no CUDA GPU" in err and "pass --device cpu" in err, err
    assert not out.exists() and not (tmp_path / "q.partial").exists()
    with pytest.raises(fmt.FormatError, match="unknown device 'tpu'"):
        api.quantize(tiny_llama, out, device="tpu", **RUN)


def test_auto_without_a_gpu_runs_on_the_cpu_and_reports_no_gpu_peak(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = api.quantize(tiny_llama, tmp_path / "q", api.QuantConfig(bits=4, group_size=64), **RUN)
    rep = json.loads((path / "quant_report.json").read_text())
    assert rep["calibration"]["device"] == "cpu"
    assert "peak_gpu_mb" in rep and rep["peak_gpu_mb"] is None and rep["peak_rss_mb"] > 0
    assert "gpu_bound_mb" not in rep["memory"]


def test_gpu_contexts_autocast_to_cuda_and_take_tf32_hessian_gemms_then_restore():
    cuda, cpu = Calibration(device="cuda:0"), Calibration(device="cpu")
    assert cuda.autocast().device == "cuda" and cpu.autocast().device == "cpu"
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    with cuda.hessian_gemms():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == before[1]
    with Calibration(device="cuda", forward_dtype="fp32").hessian_gemms():  # fp32 forwards: fp32 sums of fp32 products
        assert torch.backends.cuda.matmul.fp32_precision == before[0]
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before


def test_resume_inputs_written_in_pieces_are_the_same_bytes(tmp_path):
    """The GPU path writes the activations through CPU memory in pieces: same file as one write."""
    t = torch.randn(2, 5, 7, 3)
    t.numpy().tofile(tmp_path / "whole")
    with open(tmp_path / "pieces", "wb") as fh:
        resume.write_pieces(t, fh, step=11)  # pieces that straddle rows
    assert (tmp_path / "pieces").read_bytes() == (tmp_path / "whole").read_bytes()
    assert np.array_equal(np.fromfile(tmp_path / "pieces", dtype=np.float32).reshape(t.shape), t.numpy())


# --- on a GPU (opt-in: pytest --run-opt-in where torch sees one) ------------------------------------

@pytest.mark.opt_in
def test_cuda_checkpoint_agrees_with_cpu_and_loads_on_cpu(tiny_llama, tmp_path):
    """Issue 16: the same model and calibration on a GPU and on the CPU: layer losses within 1%, the
    same codes for >= 99% of weights (summation orders differ); the GPU's checkpoint loads on the CPU."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it where torch.cuda.is_available() is True")
    run = dict(RUN, nsamples=16, seqlen=128, batch_size=4)
    cfg = api.QuantConfig(bits=4, group_size=32, meta={"fp_targets": True, "mse": True})
    on = {d: api.quantize(tiny_llama, tmp_path / d, cfg, **run, device=d) for d in ("cpu", "cuda")}
    reports = {d: json.loads((p / "quant_report.json").read_text()) for d, p in on.items()}
    assert reports["cuda"]["peak_gpu_mb"] > 0 and reports["cpu"]["peak_gpu_mb"] is None
    for a, b in zip(reports["cpu"]["layers"], reports["cuda"]["layers"]):
        assert a["name"] == b["name"] and b["loss"] == pytest.approx(a["loss"], rel=0.01), (a, b)
    codes = {d: load_file(p / fmt.WEIGHTS_FILE) for d, p in on.items()}
    qweights = [k for k in codes["cpu"] if k.endswith(".qweight")]
    bits = 4
    same = total = 0
    for k in qweights:
        a, b = (fmt.unpack(codes[d][k], bits) for d in ("cpu", "cuda"))
        same, total = same + int((a == b).sum()), total + a.numel()
    assert same / total >= 0.99, same / total
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {d: api.load(p)(input_ids=ids).logits for d, p in on.items()}
    assert torch.isfinite(logits["cuda"]).all()
    assert (logits["cuda"].argmax(-1) == logits["cpu"].argmax(-1)).float().mean() >= 0.9
