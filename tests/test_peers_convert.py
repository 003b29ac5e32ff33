"""benchmarks/peers/convert.py: peer checkpoints (llm-compressor's compressed-tensors pack-quantized,
GPTQModel's GPTQ v1/v2) become checkpoints our loader reads with exactly the peer's weights.

No peer is installed here: the peer checkpoints are built in this file from known integer codes,
zero points, scales and g_idx, with packers written from the peers' documented layouts (not with
our format.pack), and the weights our loader returns are compared with scale * (code - zero) computed
here directly from those integers.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant.loader import dequantized_state_dict, load_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("peers_convert", REPO / "benchmarks" / "peers" / "convert.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

HIDDEN, INTER, VOCAB = 64, 128, 64
LINEARS = {  # name: (out N, in K) of a one-block Llama
    "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN), "model.layers.0.self_attn.k_proj": (32, HIDDEN),
    "model.layers.0.self_attn.v_proj": (32, HIDDEN), "model.layers.0.self_attn.o_proj": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.gate_proj": (INTER, HIDDEN), "model.layers.0.mlp.up_proj": (INTER, HIDDEN),
    "model.layers.0.mlp.down_proj": (HIDDEN, INTER),
}


def _model_config(folder: Path) -> dict:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=32, max_position_embeddings=128, tie_word_embeddings=True)
    cfg.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _fp_tensors(gen) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
            "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
            "model.layers.0.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
            "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen)}


# ---- independent packers: Python integers as one little-endian bit stream per row ----------------

def _stream_words(values: list[int], bits: int) -> list[int]:
    """Value i at bits [i*bits, (i+1)*bits) of one integer, cut into 32-bit words (as int32)."""
    stream = 0
    for i, v in enumerate(values):
        assert 0 <= v < 1 << bits
        stream |= v << (i * bits)
    nwords = -(-len(values) * bits // 32)
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(nwords)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of a 2-D tensor packed along its columns -> int32 [rows, words]."""
    return torch.tensor([_stream_words(row, bits) for row in values.tolist()], dtype=torch.int32)


# ---- known integers ---------------------------------------------------------------------------

def make_layer(gen, n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool,
               zero_at_zero: bool):
    groups = 1 if group_size == -1 else k // group_size
    u = torch.randint(0, 1 << bits, (n, k), generator=gen)
    if sym:
        z = torch.full((n, groups), 1 << (bits - 1))
    else:
        z = torch.randint(1, 1 << bits, (n, groups), generator=gen)
        if zero_at_zero:  # zero points of 0, v1's hard case: scattered, including word-top fields
            z.view(-1)[:: 7] = 0
    # fp16 values, kept as fp32 (what llm-compressor with scale_dtype=float16 writes) or as fp16 (GPTQ)
    s = (torch.rand(n, groups, generator=gen) * 0.05 + 0.001).half().float()
    if act_order:  # groups formed in an arbitrary column order
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // (k if group_size == -1 else group_size)
    else:
        g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    ref = (s.double()[:, g_idx] * (u.double() - z.double()[:, g_idx])).float()  # W [N, K]
    return {"u": u, "z": z, "s": s, "g_idx": g_idx, "ref": ref}


# ---- peer checkpoints -------------------------------------------------------------------------

def write_compressed_tensors(folder: Path, layers: dict, bits: int, group_size: int, sym: bool,
                             act_order: bool, gen, scale_dtype=torch.float32, version="0.19.0"):
    """llm-compressor's layout: signed code + 2^(b-1) packed along K, zero points packed along N."""
    folder.mkdir(parents=True)
    config = _model_config(folder)
    offset = 1 << (bits - 1)
    tensors = _fp_tensors(gen)
    for name, ly in layers.items():
        n, k = ly["u"].shape
        tensors[f"{name}.weight_packed"] = pack_rows(ly["u"], bits)  # = pack of (u - offset) + offset
        tensors[f"{name}.weight_shape"] = torch.tensor([n, k])
        tensors[f"{name}.weight_scale"] = ly["s"].to(scale_dtype)
        if not sym:
            tensors[f"{name}.weight_zero_point"] = pack_rows(ly["z"].t(), bits).t().contiguous()
            assert (ly["z"] - offset).min() >= -offset  # a signed int8 zero point in range
        if act_order:
            tensors[f"{name}.weight_g_idx"] = ly["g_idx"].to(torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size,
               "actorder": "group" if act_order else None, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": version,
        "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "sparsity_config": {}, "transform_config": {},
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                                      "input_activations": None, "output_activations": None}}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


V1_WORD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def write_gptqmodel(folder: Path, layers: dict, bits: int, group_size: int, sym: bool, act_order: bool,
                    gen, checkpoint_format: str):
    """GPTQModel's layout: codes packed along K (qweight [K*b/32, N]), zero points along N. In v1 it
    subtracts one constant from each packed v2 qzeros word (borrowing where a zero is 0); for 3 bits
    it subtracts 1 from each field mod 8."""
    folder.mkdir(parents=True)
    config = _model_config(folder)
    tensors = _fp_tensors(gen)
    for name, ly in layers.items():
        tensors[f"{name}.qweight"] = pack_rows(ly["u"], bits).t().contiguous()
        zt = ly["z"].t()  # [G, N]
        if checkpoint_format == "gptq_v2":
            qzeros = pack_rows(zt, bits)
        elif bits == 3:
            qzeros = pack_rows((zt - 1) % 8, bits)
        else:
            v2 = pack_rows(zt, bits).to(torch.int64) & 0xFFFFFFFF
            w = (v2 - V1_WORD[bits]) % (1 << 32)
            qzeros = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
        tensors[f"{name}.qzeros"] = qzeros
        tensors[f"{name}.scales"] = ly["s"].t().half().contiguous()
        tensors[f"{name}.g_idx"] = ly["g_idx"].to(torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    qcfg = {"bits": bits, "group_size": group_size, "desc_act": act_order, "lm_head": False, "method": "gptq",
            "quant_method": "gptq", "format": checkpoint_format, "checkpoint_format": checkpoint_format,
            "pack_dtype": "int32", "sym": sym,
            "meta": {"quantizer": ["gptqmodel:7.7.0"], "damp_percent": 0.05, "static_groups": False,
                     "true_sequential": True}}
    (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    config["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _layers(seed, bits, group_size, sym, act_order, zero_at_zero):
    gen = torch.Generator().manual_seed(seed)
    return gen, {name: make_layer(gen, n, k, bits, group_size, sym, act_order, zero_at_zero)
                 for name, (n, k) in LINEARS.items()}


def _check_weights(out: Path, layers: dict, fp: dict[str, torch.Tensor] | None = None):
    state = dequantized_state_dict(out)
    for name, ly in layers.items():
        assert torch.equal(state[f"{name}.weight"], ly["ref"]), name
    model = load_model(out)  # the reference model `vllm-gptq ppl` evaluates
    for name, ly in layers.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), ly["ref"]), name
    if fp is not None:
        assert torch.equal(model.model.embed_tokens.weight.detach(), fp["model.embed_tokens.weight"])
    logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()


CASES = [  # bits, group_size, sym, act_order
    (4, 32, False, False), (4, 32, False, True), (4, 32, True, False), (4, 32, True, True),
    (8, 32, False, False), (8, 32, False, True), (8, 32, True, False), (8, 32, True, True),
    (2, 32, False, True), (3, 32, False, True), (3, 32, True, False), (4, -1, False, False),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_compressed_tensors_pack_quantized(tmp_path, bits, group_size, sym, act_order):
    gen, layers = _layers(bits * 10 + sym, bits, group_size, sym, act_order, zero_at_zero=not sym)
    peer = tmp_path / "peer"
    write_compressed_tensors(peer, layers, bits, group_size, sym, act_order, gen)
    out = convert.to_gptq(peer, tmp_path / "ours")
    cfg = fmt.read_quant_config(out)
    assert (cfg.bits, cfg.group_size, cfg.sym) == (bits, group_size, sym)
    # a zero point of 0 cannot be stored in v1: the converter then writes v2
    assert cfg.checkpoint_format == ("gptq" if sym else "gptq_v2")
    assert cfg.desc_act == act_order
    _check_weights(out, layers)


def test_compressed_tensors_asym_without_zero_zeros_writes_v1(tmp_path):
    gen, layers = _layers(1, 4, 32, False, False, zero_at_zero=False)
    write_compressed_tensors(tmp_path / "peer", layers, 4, 32, False, False, gen)
    out = convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
    assert fmt.read_quant_config(out).checkpoint_format == "gptq"
    _check_weights(out, layers)


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptqmodel_gptq(tmp_path, bits, group_size, sym, act_order, checkpoint_format):
    gen, layers = _layers(bits * 10 + sym + 100, bits, group_size, sym, act_order, zero_at_zero=not sym)
    peer = tmp_path / "peer"
    write_gptqmodel(peer, layers, bits, group_size, sym, act_order, gen, checkpoint_format)
    out = convert.to_gptq(peer, tmp_path / "ours")
    cfg = fmt.read_quant_config(out)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (bits, group_size, sym, act_order)
    assert cfg.checkpoint_format == ("gptq" if sym else "gptq_v2")
    _check_weights(out, layers)


def test_gptqmodel_v1_borrow_is_undone(tmp_path):
    """Where a zero point is 0, GPTQModel's word-wise v1 subtraction borrows from the next field: read
    field by field (zero = stored + 1) the raw file gives other weights; the converter gives the right ones."""
    gen, layers = _layers(7, 4, 32, False, True, zero_at_zero=True)
    write_gptqmodel(tmp_path / "peer", layers, 4, 32, False, True, gen, "gptq")
    raw = dequantized_state_dict(tmp_path / "peer")
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(raw[f"{name}.weight"], layers[name]["ref"])  # the case is exercised
    out = convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
    _check_weights(out, layers)


def test_gptqmodel_v1_without_zero_zeros_is_unchanged(tmp_path):
    gen, layers = _layers(8, 4, 32, False, True, zero_at_zero=False)
    write_gptqmodel(tmp_path / "peer", layers, 4, 32, False, True, gen, "gptq")
    out = convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
    assert fmt.read_quant_config(out).checkpoint_format == "gptq"
    _check_weights(tmp_path / "peer", layers)  # our loader reads such a peer file as it is, too
    _check_weights(out, layers)


def test_fp32_scales_fall_back_to_dense_exactly(tmp_path, capsys):
    """Scales that fp16 cannot hold: a dense fp32 folder with the peer's exact weights, and a note."""
    gen, layers = _layers(9, 4, 32, False, True, zero_at_zero=False)
    for ly in layers.values():
        ly["s"] = ly["s"] * (1 + 1e-4)  # no longer fp16 values
        ly["ref"] = (ly["s"][:, ly["g_idx"]] * (ly["u"] - ly["z"][:, ly["g_idx"]]).float())
    fp = _fp_tensors(torch.Generator().manual_seed(9))
    write_compressed_tensors(tmp_path / "peer", layers, 4, 32, False, True, torch.Generator().manual_seed(9))
    out = convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
    assert "NOTE" in capsys.readouterr().err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = load_model(out)
    for name, ly in layers.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), ly["ref"]), name
    assert torch.equal(model.model.embed_tokens.weight.detach(), fp["model.embed_tokens.weight"])
    # asked to round instead: a GPTQ checkpoint whose scales are the fp16 roundings
    out2 = convert.to_gptq(tmp_path / "peer", tmp_path / "rounded", inexact="round")
    state = dequantized_state_dict(out2)
    for name, ly in layers.items():
        want = ly["s"].half().double()[:, ly["g_idx"]] * (ly["u"] - ly["z"][:, ly["g_idx"]]).double()
        assert torch.equal(state[f"{name}.weight"], want.float()), name


def test_unsupported_group_size_falls_back_to_dense(tmp_path):
    gen, layers = _layers(10, 4, 16, False, False, zero_at_zero=False)
    write_compressed_tensors(tmp_path / "peer", layers, 4, 16, False, False, gen)
    out = convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
    model = load_model(out)
    for name, ly in layers.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), ly["ref"]), name


def test_activation_quantization_is_refused(tmp_path):
    gen, layers = _layers(11, 8, 32, True, False, zero_at_zero=False)
    write_compressed_tensors(tmp_path / "peer", layers, 8, 32, True, False, gen)
    cfg = json.loads((tmp_path / "peer" / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8}
    (tmp_path / "peer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.ConversionError, match="activations"):
        convert.to_gptq(tmp_path / "peer", tmp_path / "ours")
