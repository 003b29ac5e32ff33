"""The checkpoint format (docs/FORMAT.md): packing, golden vectors, validation errors, atomic writes."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import rtn


def u32(x: int) -> int:
    """Write words as unsigned hex in tests; the file stores the same bits as int32."""
    return x - (1 << 32) if x >= 1 << 31 else x


@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_roundtrip_random_and_edges(bits, dim):
    g = torch.Generator().manual_seed(bits)
    shape = (96, 64) if dim == 0 else (64, 96)
    v = torch.randint(0, 2 ** bits, shape, generator=g)
    v.select(1 - dim, 0).fill_(0)
    v.select(1 - dim, 1).fill_(2 ** bits - 1)
    packed = fmt.pack(v, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == 96 * bits // 32
    assert torch.equal(fmt.unpack(packed, bits, dim), v.to(torch.int32))


# Golden vectors, worked out by hand from the spec: value i occupies bits [i*b, (i+1)*b) of a
# little-endian stream whose bit j is bit j % 32 of word j // 32.
def test_golden_4bit():
    v = torch.tensor([[0], [1], [2], [3], [4], [5], [6], [7]])  # K=8 along dim 0
    assert fmt.pack(v, 4).tolist() == [[0x76543210]]
    assert fmt.pack(torch.full((8, 1), 15), 4).tolist() == [[-1]]


def test_golden_2bit_and_8bit():
    v2 = torch.tensor([1, 2, 3, 0] * 4)[:, None]  # each byte: 1 | 2<<2 | 3<<4 = 0x39
    assert fmt.pack(v2, 2).tolist() == [[0x39393939]]
    v8 = torch.tensor([0x11, 0x22, 0x33, 0x44])[:, None]
    assert fmt.pack(v8, 8).tolist() == [[0x44332211]]


def test_golden_3bit_straddles_words():
    v = torch.zeros(32, 1, dtype=torch.long)
    v[0], v[10], v[21], v[31] = 7, 5, 3, 4
    # v[0]=7 -> bits 0-2 of word 0. v[10]=0b101 -> stream bits 30..32: word0 bit30, word1 bit0.
    # v[21]=0b011 -> stream bits 63..65: word1 bit31, word2 bit0. v[31]=0b100 -> bit 95: word2 bit31.
    assert fmt.pack(v, 3).flatten().tolist() == [0x40000007, u32(0x80000001), u32(0x80000001)]


def test_golden_layer_4bit_sym_v1():
    n, k = 8, 8
    q = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16  # nn.Linear order [N, K]
    zeros = torch.full((1, n), 8)
    scales = torch.ones(1, n)
    t = fmt.pack_layer(q, zeros, scales, fmt.default_g_idx(k, -1), 4, "gptq")
    assert t["qweight"][0, 0].item() == 0x76543210
    assert t["qweight"][0, 1].item() == u32(0x87654321)
    assert t["qzeros"].tolist() == [[0x77777777]]  # v1 stores zero - 1 = 7 in every nibble
    t2 = fmt.pack_layer(q, zeros, scales, fmt.default_g_idx(k, -1), 4, "gptq_v2")
    assert t2["qzeros"].tolist() == [[u32(0x88888888)]]
    W = fmt.dequantize(**t, bits=4)
    assert torch.equal(W, (q - 8).float())


def test_pack_rejects_bad_input():
    with pytest.raises(fmt.FormatError, match="bits=5"):
        fmt.pack(torch.zeros(32, 1), 5)
    with pytest.raises(fmt.FormatError, match="multiple of 32"):
        fmt.pack(torch.zeros(8, 1), 3)
    with pytest.raises(fmt.FormatError, match=r"\[0, 15\]"):
        fmt.pack(torch.full((8, 1), 16), 4)
    with pytest.raises(fmt.FormatError, match="zero point of 0"):
        fmt.pack_layer(torch.zeros(8, 8), torch.zeros(1, 8), torch.ones(1, 8), torch.zeros(8), 4, "gptq")


@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", fmt.SUPPORTED_GROUP_SIZES)
def test_rtn_within_half_step(bits, sym, group_size):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    cfg = fmt.QuantConfig(bits=bits, group_size=group_size, sym=sym)
    q, zeros, scales, g_idx = rtn.quantize_weight(W, cfg)
    t = fmt.pack_layer(q, zeros, scales, g_idx, bits, "gptq")
    Wq = fmt.dequantize(**t, bits=bits)
    step = t["scales"].float()[g_idx.long()].t()
    assert ((Wq - W).abs() <= 0.5 * step * (1 + 1e-5)).all()
    if sym:
        stored = fmt.unpack(t["qzeros"], bits, dim=1)
        assert (stored == 2 ** (bits - 1) - 1).all()


# --- validation of whole checkpoints -----------------------------------------------------------

@pytest.fixture(scope="module")
def rtn_ckpt(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q4"
    return rtn.quantize_model(tiny_llama, out, fmt.QuantConfig(bits=4, group_size=64))


def copy_ckpt(src, dst, edit_tensors=None, edit_config=None):
    from safetensors.torch import save_file
    dst.mkdir()
    tensors = fmt.read_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / fmt.WEIGHTS_FILE)
    for name in ("config.json", fmt.CONFIG_FILE):
        d = json.loads((src / name).read_text())
        if edit_config:
            edit_config(d.get("quantization_config", d))
        (dst / name).write_text(json.dumps(d))
    return dst


def test_valid_checkpoint_summary(rtn_ckpt):
    s = fmt.validate(rtn_ckpt)
    assert len(s["layers"]) == 2 * 7
    assert all(v["bits"] == 4 and v["group_size"] == 64 and not v["desc_act"] for v in s["layers"].values())
    cfg = json.loads((rtn_ckpt / "config.json").read_text())["quantization_config"]
    assert cfg == json.loads((rtn_ckpt / fmt.CONFIG_FILE).read_text())
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (rtn_ckpt / "tokenizer.json").exists()


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{LAYER}.qzeros"), f"{LAYER}.qzeros is missing"),
    (lambda t: [t.pop(f"{LAYER}.{s}") for s in fmt.QUANT_SUFFIXES], f"{LAYER}.qweight is missing"),
    (lambda t: t.__setitem__(f"{LAYER}.scales", t[f"{LAYER}.scales"][:1]),
     rf"{LAYER}.scales: expected shape \[2, 128\].*found \[1, 128\]"),
    (lambda t: t.__setitem__(f"{LAYER}.scales", t[f"{LAYER}.scales"].float()),
     f"{LAYER}.scales: expected dtype torch.float16, found torch.float32"),
    (lambda t: t.__setitem__(f"{LAYER}.g_idx", t[f"{LAYER}.g_idx"] + 5), rf"{LAYER}.g_idx holds values in \[5, 6\], outside the layer's 2 groups \[0, 2\)"),
    (lambda t: t[f"{LAYER}.scales"].__setitem__((1, 7), float("nan")), rf"{LAYER}.scales holds nan at \[1, 7\].*must be finite"),
    (lambda t: t[f"{LAYER}.scales"].__setitem__((0, 0), float("-inf")), rf"{LAYER}.scales holds -inf at \[0, 0\]"),
    (lambda t: t.__setitem__(f"{LAYER}.qzeros", fmt.pack(torch.arange(256).reshape(2, 128) % 16, 4, dim=1)),
     rf"{LAYER}.qzeros: a symmetric 4-bit checkpoint in format 'gptq' must store zero 7, found 0; its zero points vary"),
])
def test_validate_names_the_broken_tensor(rtn_ckpt, tmp_path, edit, message):
    bad = copy_ckpt(rtn_ckpt, tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(fmt.FormatError, match=message) as e:
        fmt.validate(bad)
    assert str(e.value).startswith(f"{bad / fmt.WEIGHTS_FILE}: ") and "\n" not in str(e.value)


def _raw(file):
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(file, header, data):
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _truncate(file, header, data):
    file.write_bytes(file.read_bytes()[:-100])


def _past_the_end(file, header, data):
    header[f"{LAYER}.scales"]["data_offsets"] = [len(data), len(data) + 512]
    _rewrite(file, header, data)


def _size_disagrees_with_shape(file, header, data):
    header[f"{LAYER}.scales"]["shape"] = [3, 128]
    _rewrite(file, header, data)


def _trailing_bytes(file, header, data):
    _rewrite(file, header, data + bytes(64))


@pytest.mark.parametrize("corrupt,message", [
    (_truncate, r"is truncated, 100 bytes short: tensor \S+ needs bytes"),
    (lambda f, h, d: f.write_bytes(f.read_bytes()[:5]), r"it is truncated \(5 bytes, too short for the 8-byte header length\)"),
    (_past_the_end, rf"header places tensor {LAYER}.scales at bytes \[\d+, \d+\), past the end of the \d+-byte data section"),
    (_size_disagrees_with_shape, rf"header gives tensor {LAYER}.scales 512 bytes, but F16 \[3, 128\] needs 768"),
    (_trailing_bytes, "64 bytes follow the last tensor its header describes"),
])
def test_corrupt_safetensors_file_is_named_with_the_tensor(rtn_ckpt, tmp_path, corrupt, message):
    """Header and size checks (no tensor data read) refuse a file safetensors would refuse, saying where."""
    bad = copy_ckpt(rtn_ckpt, tmp_path / "bad")
    file = bad / fmt.WEIGHTS_FILE
    corrupt(file, *_raw(file))
    with pytest.raises(fmt.FormatError, match=message) as e:
        fmt.read_headers(bad)
    assert str(e.value).startswith(f"{file} is not a readable safetensors file: ")
    with pytest.raises(fmt.FormatError, match=message):
        fmt.validate(bad)  # what `vllm-gptq inspect` runs
    from safetensors.torch import load_file
    with pytest.raises(Exception):  # the reference: safetensors itself refuses every one of these files
        load_file(file)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(bits=5), "bits=5 is not supported"),
    (lambda c: c.update(group_size=48), "group_size=48 is not supported"),
    (lambda c: c.update(checkpoint_format="marlin"), "unknown checkpoint_format 'marlin'"),
    (lambda c: c.update(quant_method="awq"), "quant_method 'awq' is not GPTQ"),
    (lambda c: c.update(checkpoint_format="gptq_v2"), "must store zero 8, found 7; the file is format .gptq.: fix checkpoint_format"),
    (lambda c: c.update(bits=8), r"down_proj.qweight: expected shape \[64, 128\] for a 128x256 layer at 8 bits.*found \[32, 128\]"),
])
def test_validate_rejects_config_contradictions(rtn_ckpt, tmp_path, edit, message):
    bad = copy_ckpt(rtn_ckpt, tmp_path / "bad", edit_config=edit)
    with pytest.raises(fmt.FormatError, match=message):
        fmt.validate(bad)


def test_not_a_checkpoint(tiny_llama, tmp_path):
    with pytest.raises(fmt.FormatError, match="not a quantized checkpoint"):
        fmt.validate(tiny_llama)
    with pytest.raises(fmt.FormatError, match="is not a folder"):
        fmt.validate(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / fmt.CONFIG_FILE).write_text('{"bits": 4, "group_size": 64}')
    (tmp_path / "junk" / fmt.WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(fmt.FormatError, match="not a readable safetensors file"):
        fmt.validate(tmp_path / "junk")


def test_group_size_must_divide_in_features():
    with pytest.raises(fmt.FormatError, match="group_size=128 does not divide in_features=576"):
        fmt.expected_shapes(576, 576, fmt.QuantConfig(bits=4, group_size=128))


# --- atomic writes -------------------------------------------------------------------------------

def test_failed_write_leaves_nothing(rtn_ckpt, tmp_path, monkeypatch):
    import safetensors.torch
    tensors = fmt.read_tensors(rtn_ckpt)
    cfg = fmt.read_quant_config(rtn_ckpt)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(fmt.FormatError, match="disk full"):
        fmt.save_checkpoint(tmp_path / "out", tensors, cfg, {})
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(rtn_ckpt, tmp_path):
    tensors, cfg = fmt.read_tensors(rtn_ckpt), fmt.read_quant_config(rtn_ckpt)
    model_config = json.loads((rtn_ckpt / "config.json").read_text())
    out = fmt.save_checkpoint(tmp_path / "out", tensors, cfg, model_config)
    with pytest.raises(fmt.FormatError, match="already exists.*--overwrite"):
        fmt.save_checkpoint(out, tensors, cfg, model_config)
    fmt.save_checkpoint(out, tensors, cfg, model_config, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fmt.validate(out)


def test_killed_write_never_leaves_a_loadable_checkpoint(rtn_ckpt, tmp_path):
    """kill -9 in the middle of writing: the target folder must not exist (only a hidden temp)."""
    script = textwrap.dedent(f"""
        import time, safetensors.torch
        from vllm_gptq_plugin import format as fmt
        real = safetensors.torch.save_file
        def slow(*a, **k):
            real(*a, **k); print("written", flush=True); time.sleep(60)
        safetensors.torch.save_file = slow
        fmt.save_checkpoint({str(tmp_path / 'out')!r}, fmt.read_tensors({str(rtn_ckpt)!r}),
                            fmt.read_quant_config({str(rtn_ckpt)!r}), {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    with pytest.raises(fmt.FormatError):
        fmt.read_quant_config(tmp_path / "out")


@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
def test_pack_agrees_with_the_independent_reference_packer(bits):
    # tests/gptq_reference.py packs bit by bit from the spec; the kernel tests draw layers from it.
    import numpy as np

    import gptq_reference as ref
    v = np.random.default_rng(bits).integers(0, 1 << bits, size=(64, 24))
    assert torch.equal(fmt.pack(torch.from_numpy(v), bits, dim=0), torch.from_numpy(ref.pack_bits(v, bits)))
    assert np.array_equal(fmt.unpack(torch.from_numpy(ref.pack_bits(v, bits)), bits, dim=0).numpy(), v)
