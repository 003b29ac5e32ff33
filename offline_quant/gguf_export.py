"""GPTQ checkpoint -> GGUF file (llama.cpp's format), and `vllm-gptq export-gguf`.

GGUF keeps a quantized matrix W [N, K] row by row (row n = output channel), each row cut into blocks
of 32 consecutive input channels, each block with its own fp16 scale d (gguf.quants is the reference):

    Q4_0  18 bytes/block: d, 16 bytes of nibbles    x = d * (q - 8)   q in [0, 15]
    Q4_1  20 bytes/block: d, m, 16 bytes of nibbles x = d * q + m     q in [0, 15]
    Q8_0  34 bytes/block: d, 32 int8                x = d * q         q in [-128, 127]
    byte j of the nibbles holds element j in its low 4 bits and element j + 16 in its high 4 bits.

A GPTQ layer (format.py) has W[n, k] = s[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k]. When every
block of 32 input channels lies inside one group, the block's d is s[g, n] and the integers carry over:

    symmetric, bits <= 4  -> Q4_0, q4 = q - z + 8                      bit-exact
    asymmetric, bits <= 4 -> Q4_1, q4 = q + c, m = fp16(-s * (z + c))  exact where -s*(z+c) is an
                             fp16 number (c, chosen per block, finds one when it can), otherwise
                             off by the fp16 rounding of m: at most 2^-11 |m| per block
    8 bits, q - z fits int8 -> Q8_0, q8 = q - z                         bit-exact

2- and 3-bit layers are widened into 4-bit blocks (no error; 4.5 or 5 bits per weight on disk: gguf
cannot write a 2/3-bit type). Act-order without static groups puts input channels of one block in
different groups, and 8-bit asymmetric zeros overflow int8: such layers are lossy. They are written
only with `requantize=True` -- dequantized and re-quantized by gguf.quants (llama.cpp's reference
quantizer) into the type above or `requant_type` -- and the error that adds is measured and
reported per layer. docs/GGUF.md is the user-facing version of this docstring.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vllm_gptq_plugin import format as fmt

BLOCK = 32  # input channels per GGUF block for Q4_0 / Q4_1 / Q8_0
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # 32-blocks gguf.quants can write

# model_type -> (gguf architecture, whether llama.cpp permutes the rows of q/k for its rope layout)
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}


@dataclasses.dataclass
class LayerReport:
    """How one quantized Linear went into the file, and what the file's weights differ by."""
    name: str
    qtype: str
    lossless: bool
    reason: str            # why a layer is lossy ("" when lossless)
    max_abs_err: float
    rel_err: float         # ||W_gguf - W_ckpt||_F / ||W_ckpt||_F
    sqnr_db: float         # 10 log10(||W_ckpt||^2 / ||W_gguf - W_ckpt||^2); inf when exact
    exact_blocks: float    # fraction of 32-weight blocks that dequantize bit-exactly


# ---------------------------------------------------------------------------------------------
# Blocks: integers + per-block parameters -> GGUF bytes (rows [N, K], K a multiple of 32)
# ---------------------------------------------------------------------------------------------

def _nibbles(q4: np.ndarray) -> np.ndarray:
    """q4 uint8 [N, K] in [0, 15] -> [N, K/32, 16] bytes: element j low nibble, j + 16 high."""
    b = q4.reshape(q4.shape[0], -1, 2, BLOCK // 2)
    return b[:, :, 0] | (b[:, :, 1] << np.uint8(4))


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """fp16 [N, B] -> uint8 [N, B, 2] (little-endian, as gguf reads it)."""
    return np.ascontiguousarray(x, dtype="<f2").view(np.uint8).reshape(*x.shape, 2)


def q4_0_blocks(q4: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _nibbles(q4)], axis=-1).reshape(q4.shape[0], -1)


def q4_1_blocks(q4: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(q4)], axis=-1).reshape(q4.shape[0], -1)


def q8_0_blocks(q8: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(q8, dtype=np.int8).view(np.uint8).reshape(q8.shape[0], -1, BLOCK)
    return np.concatenate([_fp16_bytes(d), q], axis=-1).reshape(q8.shape[0], -1)


def q4_1_shift(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per block, the shift c (q + c in [0, 15]) whose min m = -s * (z + c) loses least to fp16.

    d * (q + c) + m equals s * (q - z) for every c; only m is rounded to fp16, so when some c makes
    -s * (z + c) an fp16 number (z + c = 0 or a power of two always does) the block is bit-exact.
    q [N, K], s [N, K/32] fp16, z [N, K/32] -> c [N, K/32] int64.
    """
    qb = q.reshape(q.shape[0], -1, BLOCK)
    lo, hi = -qb.min(-1).astype(np.int64), 15 - qb.max(-1).astype(np.int64)
    s64, z64 = s.astype(np.float64), z.astype(np.int64)
    best, best_err = np.zeros_like(z64), np.full(z64.shape, np.inf)
    for c in sorted(range(-15, 16), key=abs):  # ties keep the smallest shift
        m = -s64 * (z64 + c)
        err = np.where((c >= lo) & (c <= hi), np.abs(m.astype(np.float16).astype(np.float64) - m), np.inf)
        better = err < best_err
        best[better], best_err[better] = c, err[better]
    return best


# ---------------------------------------------------------------------------------------------
# One quantized Linear -> (GGUF type, bytes, report)
# ---------------------------------------------------------------------------------------------

def _row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf `permute`), as a row index: HF's rotary
    halves [x0..x_{d/2}, y0..] become interleaved pairs; transformers' GGUF loader undoes it."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _lossy_reason(q: np.ndarray, zeros_blk: np.ndarray, g_idx: np.ndarray, bits: int) -> str:
    if (g_idx.reshape(-1, BLOCK) != g_idx[::BLOCK, None]).any():
        return ("act-order without static groups: a block of 32 input channels spans several groups "
                "and GGUF has one scale per block")
    if bits == 8:
        v = q.reshape(q.shape[0], -1, BLOCK).astype(np.int64) - zeros_blk[..., None]
        if v.min() < -128 or v.max() > 127:
            return "8-bit asymmetric: q - zero leaves the int8 range of Q8_0"
    return ""


def export_layer(name: str, tensors: dict[str, torch.Tensor], bits: int, sym: bool,
                 checkpoint_format: str, row_perm: np.ndarray | None, requantize: bool,
                 requant_type: str | None = None):
    """A quantized Linear -> (GGMLQuantizationType, uint8 blocks [N, K/32 * bytes], LayerReport).

    A lossy layer is re-quantized (only if `requantize`) into `requant_type` (one of
    REQUANT_TYPES), by default the type its lossless mapping would have used."""
    import gguf
    q, zeros, scales, g_idx = fmt.unpack_layer(tensors, bits, checkpoint_format)
    q, zeros, scales = q.t().numpy(), zeros.t().numpy(), scales.t().numpy()  # [N, K], [N, G], [N, G]
    g_idx = g_idx.numpy()
    n, k = q.shape
    if k % BLOCK:
        raise fmt.FormatError(f"{name}: in_features={k} is not a multiple of {BLOCK}, which every GGUF "
                              "block type needs; this layer cannot be exported")
    if row_perm is not None:
        q, zeros, scales = q[row_perm], zeros[row_perm], scales[row_perm]
    # W as format.dequantize computes it (fp32), in the file's row order
    ref = (q - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx].astype(np.float32)
    blk_g = g_idx[::BLOCK]
    d, z = scales[:, blk_g], zeros[:, blk_g].astype(np.int64)  # per block [N, K/32]
    sym = sym and bool((zeros == 1 << (bits - 1)).all())
    qtype = gguf.GGMLQuantizationType
    kind = qtype.Q8_0 if bits == 8 else (qtype.Q4_0 if sym else qtype.Q4_1)
    reason = _lossy_reason(q, z, g_idx, bits)
    if reason and not requantize:
        raise fmt.FormatError(f"{name}: cannot be written to GGUF without loss ({reason}); pass "
                              "--requantize to re-quantize it with llama.cpp's quantizer (the added "
                              "error is reported per layer)")
    if reason:
        kind = qtype[requant_type] if requant_type else kind
        data = gguf.quants.quantize(ref, kind)
    elif kind == qtype.Q4_0:
        data = q4_0_blocks((q - np.repeat(z, BLOCK, 1) + 8).astype(np.uint8), d)
    elif kind == qtype.Q8_0:
        data = q8_0_blocks(q - np.repeat(z, BLOCK, 1), d)
    else:
        c = q4_1_shift(q, d, z)
        m = -d.astype(np.float64) * (z + c)
        data = q4_1_blocks((q + np.repeat(c, BLOCK, 1)).astype(np.uint8), d, m.astype(np.float16))
    err = gguf.quants.dequantize(data, kind).astype(np.float64) - ref
    err2, ref2 = float((err ** 2).sum()), float((ref.astype(np.float64) ** 2).sum())
    report = LayerReport(name, kind.name, not reason, reason, float(np.abs(err).max()),
                         math.sqrt(err2 / ref2) if ref2 else 0.0,
                         10 * math.log10(ref2 / err2) if err2 else math.inf,
                         float((err.reshape(n, -1, BLOCK) == 0).all(-1).mean()))
    return kind, data, report


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata (tokenizer.ggml.*), as llama.cpp's convert_hf_to_gguf writes it for BPE
# ---------------------------------------------------------------------------------------------

_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"


def _pre_tokenizer(pre: dict | None) -> tuple[str, bool]:
    """(llama.cpp's name for tokenizer.json's text-splitting rule, whether it adds a prefix space).

    llama.cpp's converter recognises a model by hashing a probe text's tokens; we recognise the
    pre_tokenizer shapes byte-level BPE models use (llama-vocab.cpp has the regex of each name).
    """
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    prefix = bool(byte_level.get("add_prefix_space", False))
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2", prefix
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm", prefix  # GPT-2's regex after splitting every digit
    if (kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True)
            and steps[0].get("pattern", {}).get("Regex", "").startswith(_LLAMA3_SPLIT_START)):
        return "llama-bpe", prefix
    raise fmt.FormatError(f"tokenizer.json's pre_tokenizer {json.dumps(pre)[:200]} is not one this "
                          "exporter can name for llama.cpp (GPT-2, SmolLM or Llama-3 byte-level splits)")


def _adds_bos(path: Path, tok: dict) -> bool:
    """Whether encoding prepends BOS: tokenizer_config.json says so, or the post-processor does."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"])
    single = (tok.get("post_processor") or {}).get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def add_tokenizer(writer, path: Path, vocab_size: int) -> None:
    import gguf
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise fmt.FormatError(f"{path} has no tokenizer.json: GGUF embeds the tokenizer; copy the "
                              "model's tokenizer files into the checkpoint folder")
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise fmt.FormatError("only byte-level BPE tokenizers (GPT-2 style tokenizer.json) are "
                              f"exported; this one is {model.get('type')} with a "
                              f"{(tok.get('decoder') or {}).get('type')} decoder")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    if max(vocab.values()) >= vocab_size:
        raise fmt.FormatError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding "
                              f"has only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # ids without a token (embedding padding) are UNUSED, as llama.cpp does
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre, prefix_space = _pre_tokenizer(tok.get("pre_tokenizer"))
    writer.add_tokenizer_pre(pre)
    writer.add_add_space_prefix(prefix_space)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise fmt.FormatError(f"{tok_file} has no BPE merges: the GGUF tokenizer would not work")
    special.add_special_token.setdefault("bos", _adds_bos(path, tok))
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# Architecture metadata and tensor names
# ---------------------------------------------------------------------------------------------

def _architecture(config: dict):
    import gguf
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise fmt.FormatError(f"model_type {model_type!r} cannot be exported to GGUF yet: supported "
                              f"are {sorted(ARCHITECTURES)} (llama-family decoders)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise fmt.FormatError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not mapped to "
                              "GGUF metadata by this exporter; only plain rope is")
    arch_name, permute = ARCHITECTURES[model_type]
    return getattr(gguf.MODEL_ARCH, arch_name), permute, rope.get("rope_theta", config.get("rope_theta", 10000.0))


def add_model_metadata(writer, config: dict, rope_theta: float, name: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_quantized_by("vllm-gptq-plugin export-gguf")
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])


def _float_array(t: torch.Tensor, float_type: str) -> np.ndarray:
    """A non-quantized tensor. 1-D ones (norms, biases) stay F32 as llama.cpp requires; `auto` keeps
    the checkpoint's precision (bf16 has no lossless F16 form, so it becomes F32)."""
    if t.dim() == 1 or float_type == "f32" or (float_type == "auto" and t.dtype != torch.float16):
        return t.float().numpy()
    return t.half().numpy()


# ---------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------

def export(checkpoint: str | os.PathLike, out: str | os.PathLike, requantize: bool = False,
           float_type: str = "auto", overwrite: bool = False,
           requant_type: str | None = None) -> list[LayerReport]:
    """Write checkpoint's model as GGUF `out` (atomically); returns one LayerReport per quantized Linear.

    Refuses (FormatError) unsupported architectures and tokenizers, and lossy layers unless `requantize`.
    """
    import gguf
    path, out = Path(checkpoint), Path(out).absolute()
    if out.exists() and not overwrite:
        raise fmt.FormatError(f"{out} already exists: choose another file or pass --overwrite")
    if not (path / "config.json").exists():
        raise fmt.FormatError(f"{path} has no config.json: expected a checkpoint folder")
    config = json.loads((path / "config.json").read_text())
    arch, permute, rope_theta = _architecture(config)  # refuse before the slow part
    summary = fmt.validate(path)
    cfg: fmt.QuantConfig = summary["config"]
    tensors = fmt.read_tensors(path)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads

    def gguf_name(hf_name: str) -> str:
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise fmt.FormatError(f"tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}: "
                                  "the checkpoint has parts this exporter does not know")
        return mapped

    def row_perm(module: str, rows: int) -> np.ndarray | None:
        if permute and module.endswith("self_attn.q_proj"):
            return _row_permutation(rows, heads)
        if permute and module.endswith("self_attn.k_proj"):
            return _row_permutation(rows, kv_heads)
        return None

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    add_model_metadata(writer, config, rope_theta, config.get("_name_or_path") or path.name)
    reports: list[LayerReport] = []
    types: set[str] = set()
    for module, info in summary["layers"].items():
        lcfg = cfg.for_module(module)
        parts = {s: tensors.pop(f"{module}.{s}") for s in fmt.QUANT_SUFFIXES}
        kind, data, report = export_layer(module, parts, lcfg.bits, lcfg.sym, cfg.checkpoint_format,
                                          row_perm(module, info["out"]), requantize, requant_type)
        writer.add_tensor(gguf_name(f"{module}.weight"), data, raw_dtype=kind)
        reports.append(report)
        types.add(kind.name)
    for hf_name, t in tensors.items():
        module = hf_name.rsplit(".", 1)[0]
        if not t.is_floating_point():
            raise fmt.FormatError(f"tensor {hf_name} ({t.dtype}) is neither quantized nor floating point")
        perm = row_perm(module, t.shape[0])
        arr = _float_array(t, float_type)
        writer.add_tensor(gguf_name(hf_name), arr[perm] if perm is not None else arr)
    add_tokenizer(writer, path, config["vocab_size"])
    most = max(types, key=lambda t: sum(r.qtype == t for r in reports))
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{most}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:  # a half-written GGUF never appears at `out`
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return reports


def format_reports(reports: list[LayerReport]) -> str:
    """A table of the per-layer error the export adds (0 for bit-exact layers)."""
    lines = [f"{'layer':<40} {'type':<5} {'exact':<9} {'max|err|':>10} {'rel err':>10} {'SQNR dB':>8} "
             f"{'exact blocks':>12}"]
    for r in reports:
        exact = "bit-exact" if r.max_abs_err == 0 else ("fp16(m)" if r.lossless else "REQUANT")
        lines.append(f"{r.name:<40} {r.qtype:<5} {exact:<9} {r.max_abs_err:>10.3g} {r.rel_err:>10.3g} "
                     f"{r.sqnr_db:>8.1f} {r.exact_blocks:>12.1%}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a GPTQ checkpoint folder (quantize_config.json + safetensors)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--requantize", action="store_true",
                   help="re-quantize layers GGUF cannot hold exactly (act-order without static groups, "
                        "8-bit asymmetric) with llama.cpp's quantizer, and report the added error")
    p.add_argument("--requantize-type", choices=REQUANT_TYPES, default=None,
                   help="GGUF type for re-quantized layers (default: Q4_0 symmetric, Q4_1 asymmetric, "
                        "Q8_0 8-bit; Q8_0 adds far less error at 8.5 bits per weight)")
    p.add_argument("--float-type", default="auto", choices=["auto", "f32", "f16"],
                   help="type of the non-quantized 2-D tensors (embeddings); auto keeps the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    start = time.perf_counter()
    if args.requantize_type and not args.requantize:
        raise fmt.FormatError("--requantize-type only applies with --requantize")
    reports = export(args.checkpoint, args.out, args.requantize, args.float_type, args.overwrite,
                     args.requantize_type)
    seconds = time.perf_counter() - start
    print(format_reports(reports))
    lossy = [r for r in reports if not r.lossless]
    exact = sum(r.max_abs_err == 0 for r in reports)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB in {seconds:.1f} s; "
          f"{exact}/{len(reports)} layers bit-exact, {len(reports) - exact - len(lossy)} exact up to "
          f"fp16 rounding of the Q4_1 min, {len(lossy)} re-quantized"
          + (f" (worst SQNR {min(r.sqnr_db for r in lossy):.1f} dB)" if lossy else ""))
    return 0
