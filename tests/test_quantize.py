"""The whole-model driver: checkpoints that validate and run, GPTQ beating RTN, mixed precision,
the report, the CLI, and one clear error per bad input."""
import errno
import json
import math

from pathlib import Path

import pytest
import torch

from vllm_gptq_plugin import cli, format as fmt
from vllm_gptq_plugin.offline_quant import api, data, model_io, quantize as qz, report as rpt, tracing
from vllm_gptq_plugin.offline_quant.calibration import DEFAULT_CALIB, Calibration
from vllm_gptq_plugin.offline_quant.memo import ChildMemo

CALIB = dict(nsamples=8, seqlen=64, progress=False, threads=1)


def _calib_loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _kl_to_fp(model, fp, ids) -> float:
    """Mean KL(fp || quantized) of next-token distributions: a random model's LM loss says nothing
    (noise can lower it), but how far the quantized model moved from the fp one does."""
    with torch.no_grad():
        p = torch.log_softmax(fp(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())


def _calib_ids(model_dir, nsamples=8, seqlen=64):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return data.calibration_samples(tok, list(DEFAULT_CALIB), nsamples, seqlen, 0)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_gptq_checkpoint_validates_runs_and_reports(arch, request, tmp_path):
    model_dir = request.getfixturevalue(arch)
    cfg = api.QuantConfig(bits=4, group_size=64, desc_act=True, sym=False)
    path = api.quantize(model_dir, tmp_path / "q", cfg, **CALIB)
    summary = fmt.validate(path)
    assert len(summary["layers"]) == 14 and all(l["bits"] == 4 for l in summary["layers"].values())
    assert not (tmp_path / "q.partial").exists(), "the resume state must be removed on success"
    ids = _calib_ids(model_dir)
    assert math.isfinite(_calib_loss(api.load(path), ids))
    rep = json.loads((path / rpt.REPORT_FILE).read_text())
    assert [r["name"] for r in rep["layers"]] == sorted(summary["layers"], key=lambda n: (
        int(n.split(".")[2]), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"].index(n.rsplit(".", 1)[1])))  # true-sequential order
    for r in rep["layers"]:
        assert r["damp"] > 0 and r["loss"] >= 0 and r["seconds"] >= 0
        assert 5 < r["sqnr_db"] < 60, r  # 4-bit: ~20 dB
    assert rep["peak_rss_mb"] > 0 and rep["calibration"]["nsamples"] == 8
    assert len(rep["sensitivity"]) == rpt.TOP_SENSITIVE
    assert rep["sensitivity"][0]["sqnr_db"] == min(r["sqnr_db"] for r in rep["layers"])


def test_output_sqnr_from_the_hessian_equals_the_direct_one():
    torch.manual_seed(0)
    W, X = torch.randn(16, 32), torch.randn(100, 32) * torch.linspace(0.1, 3, 32)
    Q = W + 0.05 * torch.randn_like(W)
    direct = 10 * math.log10(float((X @ W.t()).pow(2).sum() / (X @ (W - Q).t()).pow(2).sum()))
    assert rpt.output_sqnr_db(W, Q, 2 / 100 * X.t() @ X) == pytest.approx(direct, abs=1e-6)
    assert rpt.output_sqnr_db(W, W, torch.eye(32)) == math.inf
    rows = [{"name": f"l{i}", "bits": 4, "sqnr_db": s} for i, s in enumerate([20.0, 9.0, 30.0])]
    assert [s["name"] for s in rpt.sensitivity(rows, top=2)] == ["l1", "l0"]
    assert rpt.sensitivity(rows)[0]["rule"] == "l1$=bits:8"


def test_true_sequential_groups_follow_the_block(tiny_qwen2):
    model, _ = model_io.load_causal_lm(tiny_qwen2)
    prefix, blocks = model_io.decoder_blocks(model)
    ids = torch.randint(0, 1000, (2, 16))
    acts, kwargs = tracing.capture_block_inputs(model, blocks, ids, tracing.batch_slices(2, 2), paths=2)
    assert prefix == "model.layers" and acts.shape == (2, 2, 16, 128) and torch.equal(acts[0], acts[1])
    hidden = acts[0]
    names = [n for n, m in blocks[1].named_modules() if isinstance(m, torch.nn.Linear)]
    groups = tracing.sequential_groups(blocks[1], names, hidden, kwargs[0][1], true_sequential=True)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert tracing.sequential_groups(blocks[1], names, hidden, kwargs[0][1], False) == [sum(groups, [])]
    # The captured inputs are what the real model feeds block 0: the recorder changed nothing.
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(hidden, out, rtol=0, atol=0)


def _gptq_beats_rtn(model_dir, cfg, tmp_path) -> Path:
    """GPTQ moves the model's next-token distributions far less from the fp model's than RTN does
    (KL on the calibration text); returns the GPTQ checkpoint."""
    gptq = api.quantize(model_dir, tmp_path / "gptq", cfg, **CALIB)
    rtn = api.quantize(model_dir, tmp_path / "rtn", cfg, method="rtn", progress=False)
    ids = _calib_ids(model_dir)
    fp = api.load(model_dir)
    kl_gptq, kl_rtn = _kl_to_fp(api.load(gptq), fp, ids), _kl_to_fp(api.load(rtn), fp, ids)
    assert 0 < kl_gptq < 0.7 * kl_rtn, (kl_gptq, kl_rtn)
    return gptq


def test_gptq_stays_closer_to_fp_than_rtn_on_calibration_text(tiny_llama, tmp_path):
    _gptq_beats_rtn(tiny_llama, api.QuantConfig(bits=3, group_size=64), tmp_path)


def test_fp_targets_stay_closer_to_fp_than_rtn(tiny_llama, tmp_path):
    cfg = api.QuantConfig(bits=3, group_size=64, meta={"fp_targets": True, "refine_scales": True})
    gptq = _gptq_beats_rtn(tiny_llama, cfg, tmp_path)
    assert json.loads((gptq / "quant_report.json").read_text())["memory"]["activations_mb"] > 0


def test_rules_and_skips_give_mixed_precision(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    rc = cli.main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--bits", "4",
                   "--group-size", "64", "--rule", r".*\.down_proj$=bits:8,group_size:128",
                   "--skip", r"model\.layers\.0\.self_attn\.o_proj", "--nsamples", "8", "--seqlen", "64",
                   "--threads", "1", "--no-progress", "--mse"])
    assert rc == 0
    assert json.loads((out / fmt.CONFIG_FILE).read_text())["meta"]["mse"] is True
    summary = fmt.validate(out)
    layers = summary["layers"]
    assert "model.layers.0.self_attn.o_proj" not in layers and "model.layers.1.self_attn.o_proj" in layers
    assert {n: (l["bits"], l["group_size"]) for n, l in layers.items() if "down_proj" in n} == {
        "model.layers.0.mlp.down_proj": (8, 128), "model.layers.1.mlp.down_proj": (8, 128)}
    assert layers["model.layers.1.mlp.up_proj"]["bits"] == 4
    stored = json.loads((out / fmt.CONFIG_FILE).read_text())["dynamic"]
    assert stored == {r"-:model\.layers\.0\.self_attn\.o_proj": {},
                      r"+:.*\.down_proj$": {"bits": 8, "group_size": 128}}
    assert "model.layers.0.self_attn.o_proj.weight" in fmt.read_tensors(out)
    rows = json.loads((out / rpt.REPORT_FILE).read_text())["layers"]
    assert {r["bits"] for r in rows} == {4, 8}
    assert min(r["sqnr_db"] for r in rows if r["bits"] == 8) > max(r["sqnr_db"] for r in rows if r["bits"] == 4)


def test_cli_rtn_prints_table_and_summary(tiny_llama, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert cli.main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--method", "rtn",
                     "--format", "gptq_v2", "--asym", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "rtn: 14 layers quantized" in printed
    assert fmt.validate(out)["config"].checkpoint_format == "gptq_v2"


def test_lm_head_opt_in_unties_and_quantizes(tiny_llama, tmp_path):
    cfg = api.QuantConfig(bits=8, group_size=128, lm_head=True)
    path = api.quantize(tiny_llama, tmp_path / "lm", cfg, **CALIB)
    assert "lm_head" in fmt.validate(path)["layers"]
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    model = api.load(path)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    fp = api.load(tiny_llama)
    torch.testing.assert_close(model.get_input_embeddings().weight, fp.get_input_embeddings().weight)
    assert not torch.equal(model.lm_head.weight, fp.lm_head.weight)


# --- bad input: one clear error each, nothing left that looks like a checkpoint -------------------

def _quantize_error(tmp_path, model_dir, *extra) -> None:
    out = tmp_path / "bad-out"
    rc = cli.main(["quantize", "--model", str(model_dir), "--out", str(out), "--nsamples", "4",
                   "--seqlen", "32", "--no-progress", *extra])
    assert rc == 2
    assert not out.exists() and not (tmp_path / "bad-out.partial").exists()


def test_refuses_a_folder_that_is_not_a_causal_lm(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                                 "architectures": ["BertForMaskedLM"]}))
    _quantize_error(tmp_path, tmp_path / "bert")
    assert "not a causal language model" in capsys.readouterr().err
    _quantize_error(tmp_path, tmp_path)
    assert "no config.json" in capsys.readouterr().err


def test_refuses_calibration_text_shorter_than_one_sample(tiny_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    _quantize_error(tmp_path, tiny_llama, "--calib", str(short))
    assert "fewer than one" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [(["--bits", "5"], "bits=5 is not supported"),
                                           (["--group-size", "48"], "group_size=48 is not supported"),
                                           (["--rule", "down_proj=bits"], "is not key:value")])
def test_refuses_settings_the_format_cannot_hold(tiny_llama, tmp_path, capsys, flags, message):
    _quantize_error(tmp_path, tiny_llama, *flags)
    assert message in capsys.readouterr().err


def test_refuses_an_existing_output_unless_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    argv = ["quantize", "--model", str(tiny_llama), "--out", str(out), "--method", "rtn", "--no-progress"]
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0 and fmt.validate(out)


def test_full_disk_leaves_no_checkpoint(tiny_llama, tmp_path, monkeypatch):
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    out = tmp_path / "full"
    with pytest.raises(fmt.FormatError, match="disk full"):
        api.quantize(tiny_llama, out, api.QuantConfig(), **CALIB)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.tmp")]
    with pytest.raises(fmt.FormatError, match="disk full"):  # the final write, for RTN (no resume state)
        api.quantize(tiny_llama, out, api.QuantConfig(), method="rtn", progress=False)
    assert not out.exists()


def test_non_finite_activations_name_the_layer(tiny_llama, tmp_path, capsys):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")  # what enters lm_head overflows
    model.save_pretrained(tmp_path / "inf-model")
    transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "inf-model")
    out = tmp_path / "out"
    assert cli.main(["quantize", "--model", str(tmp_path / "inf-model"), "--out", str(out), "--lm-head",
                     "--nsamples", "4", "--seqlen", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Inf in the calibration activations entering layer lm_head" in err, err
    assert not out.exists()


def test_cli_defaults_and_their_negations():
    import argparse
    p = argparse.ArgumentParser()
    qz.add_arguments(p)
    base = ["--model", "m", "--out", "o"]
    cfg = qz.config_from_args(p.parse_args(base))
    assert (cfg.desc_act, cfg.sym, cfg.meta.get("mse"), cfg.meta.get("fp_targets")) == (True, False, True, True)
    # what vLLM's built-in gptq reads: symmetric, no act-order
    cfg = qz.config_from_args(p.parse_args(base + ["--sym", "--no-act-order", "--no-mse", "--no-fp-targets"]))
    assert (cfg.desc_act, cfg.sym, cfg.meta.get("mse", False)) == (False, True, False)
    assert qz.config_from_args(p.parse_args(base + ["--fp-target-damp", "0"])).meta["fp_target_damp"] == 0.0


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_other_architectures_quantize_without_per_model_code(arch, tiny_arch, tmp_path):
    """Mistral (sliding window) and Gemma3 (q/k norms, sliding and global layers with their own masks
    and rotary tables) go through the same driver; GPTQ with the CLI defaults beats RTN."""
    model_dir = tiny_arch(arch)
    cfg = qz.config_from_args(_parsed(["--bits", "3", "--group-size", "64"]))
    gptq = _gptq_beats_rtn(model_dir, cfg, tmp_path)
    assert len(fmt.validate(gptq)["layers"]) == 14


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reused_child_outputs_give_the_same_checkpoint(arch, tiny_arch, tmp_path, monkeypatch):
    """ChildMemo (attention outputs kept across a block's passes) changes the cost, not the result:
    the checkpoint is bit-identical to recomputing every pass, with fp targets and several batches."""
    import contextlib
    from safetensors.torch import load_file
    model_dir = tiny_arch(arch)
    cfg = qz.config_from_args(_parsed(["--bits", "4", "--group-size", "32"]))  # the defaults, fp targets on
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1])
    kw = dict(nsamples=8, seqlen=32, progress=False, threads=1, batch_size=4)
    memo = load_file(api.quantize(model_dir, tmp_path / "memo", cfg, **kw) / "model.safetensors")
    n_memo = len(calls)
    monkeypatch.setattr(ChildMemo, "use", lambda *a: contextlib.nullcontext())
    calls.clear()
    plain = load_file(api.quantize(model_dir, tmp_path / "plain", cfg, **kw) / "model.safetensors")
    assert memo.keys() == plain.keys()
    assert all(torch.equal(memo[k], plain[k]) for k in memo)
    assert 0 < n_memo <= 0.4 * len(calls), (n_memo, len(calls))  # attention once per path and batch


@pytest.mark.parametrize("forward_dtype", ["bf16", "fp32"])
def test_hessian_gemms_keep_full_precision_sums_and_restore_the_setting(forward_dtype):
    """H's GEMMs write fp32 (summed in fp64) whatever GEMM mode the bf16 forwards allow (inputs may be
    read as bf16, sums are not), H is fp32, and the global matmul setting is back as it was afterwards."""
    from vllm_gptq_plugin.offline_quant.gptq import GPTQ
    torch.manual_seed(0)
    X = torch.randn(4096, 96) * torch.linspace(0.1, 4, 96) + torch.randn(96)  # correlated, offsets
    before = torch.backends.mkldnn.matmul.fp32_precision
    g = GPTQ(torch.nn.Linear(96, 8), "l")
    with Calibration(forward_dtype=forward_dtype).hessian_gemms():
        for x in X.split(1000):
            g.add_batch(x)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    ref = 2 / 4096 * X.double().t() @ X.double()
    assert g.H.dtype == torch.float32
    assert float((g.H.double() - ref).norm() / ref.norm()) < (2e-3 if forward_dtype == "bf16" else 1e-5)


def _parsed(argv):
    import argparse
    p = argparse.ArgumentParser()
    qz.add_arguments(p)
    return p.parse_args(["--model", "m", "--out", "o", *argv])


def test_peak_rss_is_the_process_own_not_its_parents():
    """ru_maxrss survives exec: a quantizer started by a big benchmark process would report the
    benchmark's size. peak_rss_mb reads the process image's own high-water mark."""
    import subprocess
    import sys
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"1" * len(ballast[::4096])  # touch every page
    code = "from vllm_gptq_plugin.offline_quant import report as r; print(r.peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < rpt.peak_rss_mb() - 500, (child, rpt.peak_rss_mb())
    del ballast


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_forward_dtype_takes_bf16_only_where_it_is_fast(tiny_llama, tmp_path, monkeypatch, fast_bf16):
    """"auto" (the default) resolves before the run, so the report and the resume key name the dtype
    the blocks really ran in: bf16 on GPUs and AVX512-BF16/AMX CPUs, fp32 on other CPUs."""
    from vllm_gptq_plugin.kernels import cpu_dispatch
    from vllm_gptq_plugin.offline_quant.calibration import resolve_forward_dtype
    monkeypatch.setattr(cpu_dispatch, "fast_bf16_gemm", lambda: fast_bf16)
    assert resolve_forward_dtype("auto", "cpu") == ("bf16" if fast_bf16 else "fp32")
    assert resolve_forward_dtype("auto", "cuda:0") == "bf16"
    assert resolve_forward_dtype("fp32", "cuda") == "fp32" and resolve_forward_dtype("bf16", "cpu") == "bf16"
    assert Calibration(device="cpu").bf16 == fast_bf16 and Calibration(device="cuda").bf16  # the contexts follow
    path = api.quantize(tiny_llama, tmp_path / "q", api.QuantConfig(bits=4, group_size=64), device="cpu", **CALIB)
    rep = json.loads((path / rpt.REPORT_FILE).read_text())
    assert rep["calibration"]["forward_dtype"] == ("bf16" if fast_bf16 else "fp32")
