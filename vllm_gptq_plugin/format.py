"""The GPTQ checkpoint format: the one module that knows how quantized tensors lie on disk.

docs/FORMAT.md is the prose version of this docstring. For a quantized nn.Linear `<name>` with
in_features K, out_features N, `bits` b in {2, 3, 4, 8} and G groups (G = ceil(K / group_size), or 1
when group_size == -1), the safetensors file holds:

    <name>.qweight  int32 [K * b / 32, N]   integer weights q[k, n], packed along K (dim 0)
    <name>.qzeros   int32 [G, N * b / 32]   integer zero points, packed along N (dim 1)
    <name>.scales   fp16  [G, N]
    <name>.g_idx    int32 [K]               group of input channel k, in [0, G)
    <name>.bias     fp16  [N]               only if the layer has a bias

Packing: the values along the packed dim form one little-endian bit stream, value i in bits
[i*b, (i+1)*b); bit j of the stream is bit j % 32 of word j // 32. For 2/4/8 bits a word holds 32/b whole
values; for 3 bits 32 values fill 3 words and values 10 and 21 straddle word boundaries (AutoGPTQ's
layout). Words are stored as int32 (same bits as uint32).

Dequantization: W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k], where zero is the
stored value + 1 for checkpoint_format "gptq" (v1) and the stored value for "gptq_v2". Symmetric
checkpoints have zero = 2^(b-1) everywhere (v1 stores 2^(b-1) - 1: 0x77777777 for 4 bits).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
FORMATS = ("gptq", "gptq_v2")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CONFIG_FILE = "quantize_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


class FormatError(ValueError):
    """A checkpoint or argument that does not follow docs/FORMAT.md; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Packing primitives
# ---------------------------------------------------------------------------------------------

def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}")


def _stream_slots(bits: int) -> Iterator[tuple[int, int, int, int]]:
    """For each of the 32 values in a block of `bits` words: (value, word, shift, spill bits)."""
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        yield i, word, shift, max(0, shift + bits - 32)


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along `dim` into int32 words (length * bits / 32 of them)."""
    check_bits(bits)
    v = values.movedim(dim, 0).to(torch.int64)
    length = v.shape[0]
    if (length * bits) % 32:
        raise FormatError(f"cannot pack {length} values of {bits} bits into whole 32-bit words: "
                          f"the packed dimension must be a multiple of {32 // math.gcd(32, bits)}")
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise FormatError(f"values to pack must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    nwords = length * bits // 32
    pad = (-length) % 32
    if pad:
        v = torch.cat([v, v.new_zeros((pad,) + v.shape[1:])])
    v = v.reshape(-1, 32, *v.shape[1:])  # blocks of 32 values -> `bits` words each
    words = v.new_zeros((v.shape[0], bits) + v.shape[2:])
    for i, word, shift, spill in _stream_slots(bits):
        words[:, word] |= (v[:, i] << shift) & 0xFFFFFFFF
        if spill:
            words[:, word + 1] |= v[:, i] >> (bits - spill)
    words = words.reshape(-1, *words.shape[2:])[:nwords]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 bits as int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> int32 values in [0, 2^bits) along `dim`."""
    check_bits(bits)
    if words.dtype != torch.int32:
        raise FormatError(f"packed tensors must be int32, found {words.dtype}")
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    nwords = w.shape[0]
    length = nwords * 32 // bits
    pad = (-nwords) % bits
    if pad:
        w = torch.cat([w, w.new_zeros((pad,) + w.shape[1:])])
    w = w.reshape(-1, bits, *w.shape[1:])
    mask = (1 << bits) - 1
    out = w.new_empty((w.shape[0], 32) + w.shape[2:])
    for i, word, shift, spill in _stream_slots(bits):
        val = w[:, word] >> shift
        if spill:
            val = val | (w[:, word + 1] << (bits - spill))
        out[:, i] = val & mask
    out = out.reshape(-1, *out.shape[2:])[:length]
    return out.to(torch.int32).movedim(0, dim).contiguous()


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero to get the real one: v1 stores zero - 1."""
    if checkpoint_format not in FORMATS:
        raise FormatError(f"unknown checkpoint_format {checkpoint_format!r}: expected one of {FORMATS}")
    return 1 if checkpoint_format == "gptq" else 0


def pack_layer(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Integer weights q [N, K] (nn.Linear order), zeros [G, N], scales [G, N], g_idx [K] -> tensors."""
    n, k = q.shape
    assert zeros.shape == scales.shape and scales.shape[1] == n and g_idx.shape == (k,)
    stored = zeros.to(torch.int64) - zero_offset(checkpoint_format)
    if stored.numel() and stored.min() < 0:
        raise FormatError("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1 stores "
                          "zero-1); quantize with zeros >= 1 or write checkpoint_format 'gptq_v2'")
    return {
        "qweight": pack(q.t(), bits, dim=0),
        "qzeros": pack(stored, bits, dim=1),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_layer(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str):
    """Packed tensors -> (q [K, N] int32, zeros [G, N] int32 real zero points, scales, g_idx)."""
    q = unpack(tensors["qweight"], bits, dim=0)
    zeros = unpack(tensors["qzeros"], bits, dim=1) + zero_offset(checkpoint_format)
    return q, zeros, tensors["scales"], tensors["g_idx"].to(torch.long)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor, bits: int, checkpoint_format: str = "gptq",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantizer every kernel is tested against: returns W [N, K] in `dtype`.

    Arithmetic is done in fp32 with scales first rounded to `dtype` (what a kernel running in that
    dtype sees), then the product is rounded to `dtype`.
    """
    q, zeros, scales, g = unpack_layer(
        {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits, checkpoint_format)
    s = scales.to(dtype).float()
    w = (q.float() - zeros[g].float()) * s[g]  # [K, N]
    return w.t().to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# quantize_config.json
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QuantConfig:
    """What quantize_config.json (and config.json `quantization_config`) says.

    `dynamic` follows the GPTQModel/vLLM convention: keys are regexes matched with re.match against
    module names; a "-:" prefix means "leave this module unquantized", "+:" or no prefix means
    "quantize it with these overrides" (bits, group_size, sym, desc_act).
    """
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    dynamic: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    quant_method: str = "gptq"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.quant_method != "gptq":
            raise FormatError(f"quant_method {self.quant_method!r} is not GPTQ: this tool reads 'gptq'")
        zero_offset(self.checkpoint_format)
        for overrides in [{}] + list(self.dynamic.values()):
            bits = overrides.get("bits", self.bits)
            group_size = overrides.get("group_size", self.group_size)
            check_bits(bits)
            if group_size not in SUPPORTED_GROUP_SIZES:
                raise FormatError(f"group_size={group_size} is not supported: use one of "
                                  f"{SUPPORTED_GROUP_SIZES} (-1 = one group per output channel)")
        for key in self.dynamic:
            try:
                re.compile(key.removeprefix("+:").removeprefix("-:"))
            except re.error as e:
                raise FormatError(f"dynamic rule {key!r} is not a valid regex: {e}") from e

    def for_module(self, name: str) -> "QuantConfig | None":
        """The settings that apply to module `name`, or None if it stays unquantized."""
        if name.endswith("lm_head") and not self.lm_head:
            return None
        for key, overrides in self.dynamic.items():
            if key.startswith("-:"):
                if re.match(key[2:], name):
                    return None
            elif re.match(key.removeprefix("+:"), name):
                return dataclasses.replace(self, dynamic={}, **{
                    k: v for k, v in overrides.items() if k in ("bits", "group_size", "sym", "desc_act")})
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["dynamic"]:
            del d["dynamic"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        # Other tools' spellings of the same fields.
        if "is_marlin_format" in d and d.pop("is_marlin_format"):
            raise FormatError("Marlin-packed GPTQ checkpoints are not supported: repack to 'gptq'")
        d.setdefault("checkpoint_format", d.pop("format", "gptq"))
        if "damp_percent" not in d and "dampening_frac" in d:
            d["damp_percent"] = d["dampening_frac"]
        if "quant_method" not in d:
            raise FormatError("the quantization config has no quant_method: not a GPTQ checkpoint")
        return cls(**{k: v for k, v in d.items() if k in known})


def read_quant_config(path: str | os.PathLike) -> QuantConfig:
    """quantize_config.json, or else config.json's `quantization_config`, of checkpoint `path`."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path} is not a folder: expected a checkpoint folder")
    qc = path / CONFIG_FILE
    if qc.exists():
        d = json.loads(qc.read_text())
        d.setdefault("quant_method", "gptq")
        return QuantConfig.from_dict(d)
    cfg = path / "config.json"
    if cfg.exists() and "quantization_config" in (c := json.loads(cfg.read_text())):
        return QuantConfig.from_dict(c["quantization_config"])
    raise FormatError(f"{path} is not a quantized checkpoint: it has neither {CONFIG_FILE} nor a "
                      "config.json with quantization_config (quantize it with `vllm-gptq quantize`)")


# ---------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path} has no *.safetensors weights")
    return files


# Bytes per element of the safetensors dtype names (a header's data_offsets must agree with the shape).
_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), checked against
    the file's size the way the safetensors loader will check them, but with a message naming the
    tensor. Reads the header and stats the file: no tensor data.

    The tensors, in offset order, must tile the data section exactly, each taking numel * dtype-size
    bytes. A file cut short ends inside (or before) the last tensors' bytes.
    """
    unreadable = f"{file} is not a readable safetensors file"
    fix = "copy the file again or re-create the checkpoint"
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise FormatError(f"{unreadable}: it is truncated ({size} bytes, too short for the "
                              f"{'8-byte header length' if n is None else f'{n}-byte header'}); {fix}")
        try:
            header = json.loads(fh.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k) for k, v in tensors.items())
            numels = {k: math.prod(int(d) for d in v["shape"]) for k, v in tensors.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise FormatError(f"{unreadable}: its header is not safetensors JSON ({e!r}); {fix}") from e
    data = size - 8 - n
    ends = [0] + [stop for _, stop, _ in spans]
    gaps = [(name, start, end) for (start, _, name), end in zip(spans, ends) if start != end]
    for start, stop, name in spans:  # each tensor alone: its size, and inside the file
        dtype, shape = tensors[name]["dtype"], tensors[name]["shape"]
        itemsize = _SAFETENSORS_DTYPE_BYTES.get(dtype)  # None: a dtype newer than this table, unchecked
        if itemsize is not None and stop - start != numels[name] * itemsize:
            raise FormatError(f"{unreadable}: its header gives tensor {name} {stop - start} bytes, but "
                              f"{dtype} {shape} needs {numels[name] * itemsize}; {fix}")
        if stop > data and not gaps:  # a consistent header over a short file
            raise FormatError(f"{unreadable}: it is truncated, {spans[-1][1] - data} bytes short: tensor "
                              f"{name} needs bytes [{start}, {stop}) of a data section that has {data}; {fix}")
        if stop > data:
            raise FormatError(f"{unreadable}: its header places tensor {name} at bytes [{start}, {stop}), "
                              f"past the end of the {data}-byte data section; {fix}")
    for name, start, end in gaps[:1]:  # together, in offset order, they must tile the data section
        raise FormatError(f"{unreadable}: its header places tensor {name} at byte {start}, but the "
                          f"previous tensor ends at {end} (tensors must not overlap or leave gaps); {fix}")
    if ends[-1] != data:
        raise FormatError(f"{unreadable}: {data - ends[-1]} bytes follow the last tensor its header "
                          f"describes (the header and the data disagree); {fix}")
    return tensors


def read_headers(path: str | os.PathLike) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{tensor name: (file, header entry)} of every weight file of checkpoint `path`, each checked by
    `read_header`."""
    return {name: (f, info) for f in weight_files(Path(path)) for name, info in read_header(f).items()}


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        read_header(f)  # a short or inconsistent file: a message naming the tensor, not safetensors' code
        try:
            out.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise FormatError(f"{f} is not a readable safetensors file ({e}); re-create the checkpoint") from e
    return out


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def expected_shapes(in_features: int, out_features: int, cfg: QuantConfig) -> dict[str, tuple]:
    if in_features * cfg.bits % 32 or out_features * cfg.bits % 32:
        raise FormatError(f"a {out_features}x{in_features} layer cannot be packed at {cfg.bits} bits: "
                          "in and out features must fill whole 32-bit words")
    if cfg.group_size != -1 and in_features % cfg.group_size:
        raise FormatError(f"group_size={cfg.group_size} does not divide in_features={in_features}: "
                          "choose a group size that divides it, or -1")
    g = num_groups(in_features, cfg.group_size)
    return {"qweight": (in_features * cfg.bits // 32, out_features),
            "qzeros": (g, out_features * cfg.bits // 32),
            "scales": (g, out_features),
            "g_idx": (in_features,)}


EXPECTED_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16,
                   "g_idx": torch.int32}


def linear_shapes(path: Path) -> dict[str, tuple[int, int]] | None:
    """(in, out) of every nn.Linear the model in config.json has, built on the meta device."""
    if not (path / "config.json").exists():
        return None
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def sym_stored_zero(bits: int, checkpoint_format: str) -> int:
    """The zero point a symmetric checkpoint stores: 2^(b-1), minus 1 in v1."""
    return (1 << (bits - 1)) - zero_offset(checkpoint_format)


def check_layer_values(name: str, where: str | os.PathLike, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor, groups: int, bits: int, sym: bool, checkpoint_format: str,
                       g_idx_hint: str = "") -> None:
    """What headers cannot show, one pass over each of the layer's small tensors (never qweight):
    finite scales, g_idx in [0, groups), and, where the config says sym, the symmetric zero point in
    every qzeros word. Raises FormatError naming the file `where`, the tensor and the fix."""
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        g, n = (int(i) for i in bad.nonzero()[0])
        raise FormatError(f"{where}: tensor {name}.scales holds {float(scales[g, n])} at [{g}, {n}]: "
                          f"scales must be finite ({int(bad.sum())} of {bad.numel()} are not); the "
                          "checkpoint is corrupt, re-create it")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FormatError(f"{where}: tensor {name}.g_idx holds values in [{int(g_idx.min())}, "
                          f"{int(g_idx.max())}], outside the layer's {groups} groups [0, {groups})"
                          f"{g_idx_hint or ': the checkpoint is corrupt, re-create it'}")
    if sym:
        # Compare packed words with the one valid word pattern: no unpacking unless it is wrong.
        want = sym_stored_zero(bits, checkpoint_format)
        row = pack(torch.full((1, qzeros.shape[1] * 32 // bits), want), bits, dim=1)
        if not bool((qzeros == row).all()):
            stored = unpack(qzeros, bits, dim=1)
            found = int(stored[stored != want][0])
            other = {f: sym_stored_zero(bits, f) for f in FORMATS if f != checkpoint_format}
            fix = next((f"the file is format {f!r}: fix checkpoint_format (gptq=v1, gptq_v2)"
                        for f, z in other.items() if bool((stored == z).all())),
                       "its zero points vary: set sym: false in the quantization config if they are real")
            raise FormatError(f"{where}: tensor {name}.qzeros: a symmetric {bits}-bit checkpoint in format "
                              f"{checkpoint_format!r} must store zero {want}, found {found}; {fix}")


def validate(path: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Check every quantized tensor against the config; raise FormatError naming the first mismatch.

    Returns a summary: {"config": QuantConfig, "layers": {name: {bits, group_size, in, out}}, ...}.
    """
    path = Path(path)
    cfg = read_quant_config(path)
    if tensors is None:
        tensors = read_tensors(path)
    files = {name: f for name, (f, _) in read_headers(path).items()}
    only_file = next(iter(set(files.values()))) if len(set(files.values())) == 1 else path
    shapes = linear_shapes(path)
    found = quantized_modules(tensors)
    if not found:
        raise FormatError(f"{path} declares GPTQ quantization but has no *.qweight tensors")
    if shapes is not None:
        for name in shapes:
            if cfg.for_module(name) is not None and name not in found and f"{name}.weight" not in tensors \
                    and not name.endswith("lm_head"):
                raise FormatError(f"{only_file}: tensor {name}.qweight is missing (the config quantizes "
                                  f"{name}); the checkpoint is incomplete: re-create it")
    layers = {}
    for name in found:
        where = files.get(f"{name}.qweight", only_file)  # the file to name in a message
        lcfg = cfg.for_module(name)
        if lcfg is None:
            raise FormatError(f"{where}: {name} is quantized in the tensors but excluded by the config's dynamic "
                              "rules; the config and tensors disagree")
        for sfx in QUANT_SUFFIXES:
            if f"{name}.{sfx}" not in tensors:
                raise FormatError(f"{where}: tensor {name}.{sfx} is missing; the checkpoint is incomplete")
        if shapes is not None and name in shapes:
            k, n = shapes[name]
        else:  # no model config: take K from g_idx and N from scales
            k, n = tensors[f"{name}.g_idx"].shape[0], tensors[f"{name}.scales"].shape[-1]
        want = expected_shapes(k, n, lcfg)
        for sfx in QUANT_SUFFIXES:
            t = tensors[f"{name}.{sfx}"]
            if tuple(t.shape) != want[sfx]:
                raise FormatError(f"{where}: tensor {name}.{sfx}: expected shape {list(want[sfx])} for a "
                                  f"{n}x{k} layer at {lcfg.bits} bits, group_size {lcfg.group_size}; "
                                  f"found {list(t.shape)}")
            if t.dtype != EXPECTED_DTYPES[sfx]:
                raise FormatError(f"{where}: tensor {name}.{sfx}: expected dtype {EXPECTED_DTYPES[sfx]}, "
                                  f"found {t.dtype}")
        g_idx = tensors[f"{name}.g_idx"]
        check_layer_values(name, where, tensors[f"{name}.scales"],
                           tensors[f"{name}.qzeros"], g_idx, want["scales"][0], lcfg.bits, lcfg.sym,
                           cfg.checkpoint_format)
        layers[name] = {"bits": lcfg.bits, "group_size": lcfg.group_size, "sym": lcfg.sym,
                        "desc_act": bool((g_idx != default_g_idx(k, lcfg.group_size)).any()),
                        "in": k, "out": n}
    return {"config": cfg, "layers": layers,
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


# ---------------------------------------------------------------------------------------------
# Writing, atomically
# ---------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: QuantConfig,
                    model_config: dict[str, Any], source: str | os.PathLike | None = None,
                    overwrite: bool = False, max_shard_bytes: int = 4 << 30,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint folder atomically: into a temporary sibling, then one rename.

    An interrupted or failed write leaves at most a hidden `.<name>.tmp-*` folder, never `out`.
    `source` is the fp model folder whose tokenizer files are copied.
    """
    from safetensors.torch import save_file
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FormatError(f"{out} already exists: choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        qdict = cfg.to_dict()
        (tmp / CONFIG_FILE).write_text(json.dumps(qdict, indent=2))
        (tmp / "config.json").write_text(json.dumps({**model_config, "quantization_config": qdict}, indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if source is not None:
            for fname in TOKENIZER_FILES:
                if (Path(source) / fname).exists():
                    shutil.copy2(Path(source) / fname, tmp / fname)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        if out.exists():  # overwrite: move the old one aside only once the new one is complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FormatError(f"disk full while writing the checkpoint to {out}: nothing was written; "
                              "free space or choose another output folder") from e
        raise
    return out
