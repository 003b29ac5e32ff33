"""GGUF export: lossless where the formats coincide (bit-exact dequantization, same logits after
transformers reloads the file), requantization only on request and with its error reported, and
clear refusals for what cannot be mapped."""
import dataclasses
import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch

from vllm_gptq_plugin import cli
from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import gguf_export, loader, rtn

TEXT = ("The GPTQ checkpoint stores integer weights with one scale per group. GGUF stores blocks of "
        "thirty-two weights, each with its own scale; 12345 tokens later the text ends.")

# name -> (QuantConfig, GGUF type every layer must get)
LOSSLESS = {
    "sym4_g32": (fmt.QuantConfig(bits=4, group_size=32, sym=True), "Q4_0"),
    "sym8_g128": (fmt.QuantConfig(bits=8, group_size=128, sym=True), "Q8_0"),
    "asym4_g64": (fmt.QuantConfig(bits=4, group_size=64, sym=False), "Q4_1"),
    "asym4_g128_v2": (fmt.QuantConfig(bits=4, group_size=128, sym=False, checkpoint_format="gptq_v2"), "Q4_1"),
    "asym3_g64": (fmt.QuantConfig(bits=3, group_size=64, sym=False), "Q4_1"),  # widened
    "sym2_perchannel": (fmt.QuantConfig(bits=2, group_size=-1, sym=True), "Q4_0"),  # widened
}


def act_order_checkpoint(fp_dir, out, cfg: fmt.QuantConfig, seed: int = 0):
    """An RTN checkpoint whose groups are a random permutation of the input channels, as GPTQ with
    act-order (desc_act, no static groups) writes: g_idx[k] = rank of k in the order // group_size."""
    import transformers
    from vllm_gptq_plugin.offline_quant import checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    packed = {}
    for name, (module, lcfg) in checkpoint.quantizable_linears(model, cfg).items():
        W = module.weight.detach()
        perm = torch.randperm(W.shape[1], generator=gen)
        q_perm, zeros, scales, g_sorted = rtn.quantize_weight(W[:, perm], lcfg)
        q, g_idx = torch.empty_like(q_perm), torch.empty_like(g_sorted)
        q[:, perm], g_idx[perm] = q_perm, g_sorted
        packed[name] = fmt.pack_layer(q, zeros, scales, g_idx, lcfg.bits, cfg.checkpoint_format)
    cfg = dataclasses.replace(cfg, desc_act=True)
    return checkpoint.write(model, packed, cfg, out, fp_dir)


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-ckpt")
    out = {name: rtn.quantize_model(tiny_llama, root / name, cfg) for name, (cfg, _) in LOSSLESS.items()}
    out["act_order4"] = act_order_checkpoint(tiny_llama, root / "act_order4",
                                             fmt.QuantConfig(bits=4, group_size=32, sym=True))
    out["act_order3"] = act_order_checkpoint(tiny_llama, root / "act_order3",
                                             fmt.QuantConfig(bits=3, group_size=64, sym=False))
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """Every lossless checkpoint exported once: name -> (gguf path, reports)."""
    root = tmp_path_factory.mktemp("gguf-out")
    return {name: (root / f"{name}.gguf", gguf_export.export(checkpoints[name], root / f"{name}.gguf"))
            for name in LOSSLESS}


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' inverse of llama.cpp's q/k row permutation (an independent implementation)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    return LlamaTensorProcessor()._reverse_permute_weights(w, n_head, n_head)


def gguf_weights(path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (type name, weights [N, K] as gguf.quants dequantizes them)."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def checkpoint_weights(path) -> dict[str, torch.Tensor]:
    """Quantized layer name -> format.dequantize of its tensors (fp32, [N, K])."""
    cfg, tensors = fmt.read_quant_config(path), fmt.read_tensors(path)
    return {name: fmt.dequantize(*(tensors[f"{name}.{s}"] for s in fmt.QUANT_SUFFIXES),
                                 bits=cfg.for_module(name).bits, checkpoint_format=cfg.checkpoint_format)
            for name in fmt.quantized_modules(tensors)}


def to_gguf_name(layer: str) -> str:
    i = layer.split(".")[2]
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}[layer.split(".", 3)[3]]
    return f"blk.{i}.{part}.weight"


def unpermuted(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return reverse_permute(w, config["num_attention_heads"])
    if name.endswith("attn_k.weight"):
        return reverse_permute(w, config["num_key_value_heads"])
    return w


@pytest.mark.parametrize("name", ["sym4_g32", "sym8_g128", "asym3_g64", "sym2_perchannel"])
def test_lossless_types_dequantize_bit_exact(name, checkpoints, exported):
    path, reports = exported[name]
    want_type = LOSSLESS[name][1]
    config = json.loads((checkpoints[name] / "config.json").read_text())
    file_weights = gguf_weights(path)
    ref = checkpoint_weights(checkpoints[name])
    assert len(ref) == 14 and all(r.lossless and r.max_abs_err == 0 for r in reports)
    for layer, w_ref in ref.items():
        qtype, w = file_weights[to_gguf_name(layer)]
        assert qtype == want_type
        np.testing.assert_array_equal(unpermuted(to_gguf_name(layer), w, config), w_ref.numpy())


@pytest.mark.parametrize("name", ["asym4_g64", "asym4_g128_v2"])
def test_q4_1_is_exact_up_to_fp16_rounding_of_the_min(name, checkpoints, exported):
    path, reports = exported[name]
    config = json.loads((checkpoints[name] / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    ref = checkpoint_weights(checkpoints[name])
    n_exact_blocks = n_blocks = 0
    for layer, w_ref in ref.items():
        t = next(t for t in reader.tensors if t.name == to_gguf_name(layer))
        assert t.tensor_type.name == "Q4_1"
        blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, 20)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # [N, K/32]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        want = w_ref.numpy().astype(np.float64)
        if layer.endswith(("q_proj", "k_proj")):  # compare in the file's row order
            n_head = config["num_attention_heads" if layer.endswith("q_proj") else "num_key_value_heads"]
            want = want[gguf_export._row_permutation(want.shape[0], n_head)]
        err = np.abs(w - want).reshape(*m.shape, 32).max(-1)
        # m = fp16(-s*(z+c)) is off by at most half an fp16 ulp: 2^-11 |m| (2^-24 for subnormals)
        assert (err <= np.maximum(np.abs(m) * 2.0 ** -11, 2.0 ** -24) * (1 + 1e-6)).all(), layer
        n_exact_blocks += int((err == 0).sum())
        n_blocks += err.size
        assert next(r for r in reports if r.name == layer).exact_blocks == pytest.approx((err == 0).mean())
    worst = max(r.max_abs_err for r in reports)
    assert worst > 0  # RTN 4-bit asymmetric uses all 16 levels: some m cannot be exact
    print(f"{name} -> Q4_1: {n_exact_blocks}/{n_blocks} blocks bit-exact, worst |err| {worst:.3g}")


def reference_and_gguf_logits(ckpt, gguf_path):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(TEXT, return_tensors="pt").input_ids
    ref = loader.load_model(ckpt)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                 dtype=torch.float32)
    with torch.no_grad():
        return ids, ref(ids).logits[0], reloaded(ids).logits[0]


def ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[0, 1:]).item())


@pytest.mark.parametrize("name", ["sym4_g32", "asym4_g64", "asym3_g64"])
def test_transformers_reloads_with_the_checkpoint_logits(name, checkpoints, exported):
    ids, ref, got = reference_and_gguf_logits(checkpoints[name], exported[name][0])
    diff = (ref - got).abs().max().item()
    if all(r.max_abs_err == 0 for r in exported[name][1]):
        assert diff <= 1e-5 * ref.abs().max().item(), diff  # same weights: float rounding only
        assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 1e-6
    else:  # Q4_1's fp16 min moves weights by < 2^-11 relative
        assert diff <= 2e-3 * ref.abs().max().item(), diff
        assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 1e-3


def test_tokenizer_metadata_matches_the_shipped_smollm2_gguf(checkpoints, exported):
    import transformers
    from vllm_gptq_plugin.offline_quant import models
    shipped, ours = gguf.GGUFReader(models.smollm2_gguf()), gguf.GGUFReader(exported["sym4_g32"][0])
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]:
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    path = exported["sym4_g32"][0]
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    want = transformers.AutoTokenizer.from_pretrained(checkpoints["sym4_g32"])
    text = "<|im_start|>user\n" + TEXT + "<|im_end|>"
    assert tok(text).input_ids == want(text).input_ids


@pytest.mark.parametrize("name", ["act_order4", "act_order3"])
def test_act_order_refuses_without_requantize_and_reports_error_with_it(name, checkpoints, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    with pytest.raises(fmt.FormatError, match="act-order.*--requantize"):
        gguf_export.export(checkpoints[name], out)
    assert not out.exists()
    assert cli.main(["export-gguf", str(checkpoints[name]), "--out", str(out)]) != 0
    assert "--requantize" in capsys.readouterr().err
    assert cli.main(["export-gguf", str(checkpoints[name]), "--out", str(out), "--requantize"]) == 0
    printed = capsys.readouterr().out
    assert "REQUANT" in printed and "re-quantized" in printed
    reports = gguf_export.export(checkpoints[name], out, requantize=True, overwrite=True)
    assert all(not r.lossless and "act-order" in r.reason for r in reports)
    # the added error is measured against the checkpoint weights: non-zero, and reported
    assert all(0 < r.rel_err < 0.5 and 5 < r.sqnr_db < 60 for r in reports)
    ids, ref, got = reference_and_gguf_logits(checkpoints[name], out)
    print(f"{name}: worst SQNR {min(r.sqnr_db for r in reports):.1f} dB, ppl checkpoint "
          f"{ppl(ref, ids):.3f} vs requantized GGUF {ppl(got, ids):.3f}")
    assert not torch.equal(ref, got)
    finer = gguf_export.export(checkpoints[name], out, requantize=True, overwrite=True, requant_type="Q8_0")
    # --requantize-type Q8_0 trades 8.5 bits per weight for much less added error
    assert all(f.qtype == "Q8_0" and f.sqnr_db > r.sqnr_db + 20 for r, f in zip(reports, finer))


def test_8bit_asymmetric_is_lossy_because_zeros_leave_int8(tiny_llama, tmp_path):
    ckpt = rtn.quantize_model(tiny_llama, tmp_path / "a8", fmt.QuantConfig(bits=8, group_size=128, sym=False))
    with pytest.raises(fmt.FormatError, match="8-bit asymmetric.*--requantize"):
        gguf_export.export(ckpt, tmp_path / "a8.gguf")
    reports = gguf_export.export(ckpt, tmp_path / "a8.gguf", requantize=True)
    assert all(r.qtype == "Q8_0" and not r.lossless and r.sqnr_db > 30 for r in reports)


def test_unsupported_architecture_is_refused_by_the_cli(checkpoints, tmp_path, capsys):
    ckpt = tmp_path / "phi"
    shutil.copytree(checkpoints["sym4_g32"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    assert cli.main(["export-gguf", str(ckpt), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'phi3' cannot be exported" in err and "llama" in err
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_is_kept_without_overwrite(checkpoints, exported):
    path = exported["sym4_g32"][0]
    before = path.stat().st_mtime_ns
    with pytest.raises(fmt.FormatError, match="--overwrite"):
        gguf_export.export(checkpoints["sym4_g32"], path)
    assert path.stat().st_mtime_ns == before


def test_qwen2_exports_with_biases_and_reloads(tiny_qwen2, tmp_path):
    ckpt = rtn.quantize_model(tiny_qwen2, tmp_path / "q", fmt.QuantConfig(bits=4, group_size=32, sym=True))
    out = tmp_path / "q.gguf"
    gguf_export.export(ckpt, out)
    assert "blk.0.attn_q.bias" in {t.name for t in gguf.GGUFReader(out).tensors}
    ids, ref, got = reference_and_gguf_logits(ckpt, out)
    assert (ref - got).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.opt_in
def test_smollm2_export_measurement(smollm2, tmp_path):
    """The numbers docs/GGUF.md quotes: export time, file size, perplexity of the reloaded GGUF
    against the checkpoint's (pure-torch reference), for SmolLM2-135M."""
    import time

    import transformers
    from vllm_gptq_plugin.offline_quant import data, ppl as ppl_mod
    sym4, asym4 = fmt.QuantConfig(bits=4, group_size=64, sym=True), fmt.QuantConfig(bits=4, group_size=64, sym=False)
    ckpts = {"RTN 4-bit g64 sym": rtn.quantize_model(smollm2, tmp_path / "sym4", sym4),
             "RTN 4-bit g64 asym": rtn.quantize_model(smollm2, tmp_path / "asym4", asym4),
             "act-order 4-bit g64 sym": act_order_checkpoint(smollm2, tmp_path / "act4", sym4)}
    cases = [("RTN 4-bit g64 sym", {}), ("RTN 4-bit g64 sym", {"float_type": "f16"}),
             ("RTN 4-bit g64 asym", {}), ("act-order 4-bit g64 sym", {"requantize": True}),
             ("act-order 4-bit g64 sym", {"requantize": True, "requant_type": "Q8_0"})]
    tok = transformers.AutoTokenizer.from_pretrained(ckpts["RTN 4-bit g64 sym"])
    ids = data.encode(tok, data.resolve_text("shakespeare:eval"), 1024)
    ref_ppl = {name: ppl_mod.perplexity(loader.load_model(c), ids, 512, 512, progress=False)[0]
               for name, c in ckpts.items()}
    print(f"\nSmolLM2-135M-Instruct, shakespeare:eval first {ids.numel()} tokens, ctx 512, fp32 CPU")
    print(f"{'checkpoint':<25} {'options':<46} {'types':<6} {'export s':>8} {'MiB':>6} "
          f"{'ckpt ppl':>10} {'GGUF ppl':>10} {'rel diff':>9} {'min SQNR':>8}")
    for i, (name, kw) in enumerate(cases):
        out = tmp_path / f"{i}.gguf"
        start = time.perf_counter()
        reports = gguf_export.export(ckpts[name], out, **kw)
        seconds = time.perf_counter() - start
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        got = ppl_mod.perplexity(model, ids, 512, 512, progress=False)[0]
        types = "/".join(sorted({r.qtype for r in reports}))
        print(f"{name:<25} {str(kw or '-'):<46} {types:<6} {seconds:>8.1f} {out.stat().st_size / 2**20:>6.1f} "
              f"{ref_ppl[name]:>10.4f} {got:>10.4f} {got / ref_ppl[name] - 1:>+9.1e} "
              f"{min(r.sqnr_db for r in reports):>8.1f}")
        if not kw:  # lossless mapping: same weights up to fp16 rounding of Q4_1 mins
            assert abs(got / ref_ppl[name] - 1) < (1e-5 if types != "Q4_1" else 1e-3)
        out.unlink()
