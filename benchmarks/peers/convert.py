"""Turn a peer quantizer's checkpoint into one our loader reads (docs/FORMAT.md).

    to_gptq(peer_dir, out_dir) -> Path

Runs in OUR venv and imports only torch, safetensors, json and our package. Two sources:

- GPTQModel (quant_method "gptq"): already GPTQ tensors (qweight/qzeros/scales/g_idx). The codes,
  scales and g_idx are taken as they are; what needs care is the zero point of checkpoint_format
  "gptq" (v1, GPTQModel's default). GPTQModel writes v1 from its internal v2 by subtracting one
  packed constant from every qzeros WORD (0x11111111 for 4 bits, 0x01010101 for 8, 0x55555555 for 2);
  where a zero point is 0 that borrows from the neighbouring field. The exact inverse is the same
  word-wise addition (mod 2^32), which is what GPTQModel's own loader does, so that is how zeros are
  read here. (For 3 bits GPTQModel shifts each field mod 8 instead; read the same way.) Reading
  field by field (zero = stored + 1, what our loader does for v1) agrees whenever no zero is 0.
- llm-compressor (quant_method "compressed-tensors", format "pack-quantized"): weight_packed
  int32 [N, ceil(K*b/32)] holds the signed codes q in [-2^(b-1), 2^(b-1)) plus 2^(b-1), packed
  along K as one little-endian bit stream (value i in bits [i*b, (i+1)*b); compressed-tensors 0.19's
  pack_to_int32, the same stream as ours); weight_scale [N, G]; for asymmetric group/channel
  schemes weight_zero_point packed the same way along N ([ceil(N*b/32), G], signed zero + 2^(b-1)),
  for symmetric ones no zero point (signed zero 0); weight_g_idx [K] only for the removed "group"
  act-order (negative or absent: groups k // g). Dequantization is scale * (q - zp), so with
  unsigned code u = q + 2^(b-1) and zero z = zp + 2^(b-1) it is exactly our scale * (u - z).

The result stores real zero points in checkpoint_format "gptq" (v1) unless some zero point is 0,
which v1 cannot hold: then the whole checkpoint is written as "gptq_v2" (our loader reads both).
Our format keeps fp16 scales. A peer's scale that is not exactly an fp16 value (llm-compressor
without scale_dtype=float16) cannot be converted exactly: by default the layer set is then written as
a dense fp32 model (dequantized with the peer's own fp32 scales; `vllm-gptq ppl` reads that too) and a
note says so; inexact="round" writes GPTQ with the scales rounded to fp16 instead. The same dense
fallback covers group sizes and shapes our format cannot hold (e.g. group_size 256, K*b not a
multiple of 32).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from vllm_gptq_plugin import format as fmt

V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


class ConversionError(fmt.FormatError):
    """A peer checkpoint this converter cannot map exactly; the message says why."""


# ---------------------------------------------------------------------------------------------
# Reading a peer checkpoint
# ---------------------------------------------------------------------------------------------

def _model_config(peer_dir: Path) -> dict:
    path = peer_dir / "config.json"
    if not path.exists():
        raise ConversionError(f"{peer_dir} has no config.json: not a HF model folder")
    return json.loads(path.read_text())


def _quant_config(peer_dir: Path) -> dict:
    qc = peer_dir / fmt.CONFIG_FILE
    if qc.exists():
        return json.loads(qc.read_text())
    d = _model_config(peer_dir).get("quantization_config")
    if d is None:
        raise ConversionError(f"{peer_dir} is not quantized (no {fmt.CONFIG_FILE}, no quantization_config)")
    return d


def peer_kind(peer_dir: str | os.PathLike) -> str:
    """'gptq' (GPTQModel and other GPTQ writers) or 'compressed-tensors' (llm-compressor)."""
    peer_dir = Path(peer_dir)
    cfg = _model_config(peer_dir).get("quantization_config") or {}
    if cfg.get("quant_method") == "compressed-tensors":
        return "compressed-tensors"
    d = _quant_config(peer_dir)
    method = d.get("quant_method", "gptq")
    if method != "gptq":
        raise ConversionError(f"{peer_dir}: quant_method {method!r} is neither GPTQ nor compressed-tensors")
    return "gptq"


def _read_all(peer_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in fmt.weight_files(peer_dir):
        out.update(load_file(f))
    return out


# A layer in neutral form: codes u [N, K] in [0, 2^b), zeros z [N, G] in [0, 2^b) (real zero points),
# scales [N, G] (peer dtype), g_idx [K] long, bits, group_size, sym.
Layer = dict


def _gptq_layers(peer_dir: Path) -> tuple[dict[str, Layer], dict[str, torch.Tensor], dict]:
    d = _quant_config(peer_dir)
    d.setdefault("quant_method", "gptq")
    ckpt_format = d.get("checkpoint_format") or d.get("format") or "gptq"
    if ckpt_format not in fmt.FORMATS:
        raise ConversionError(f"{peer_dir}: checkpoint_format {ckpt_format!r} is not GPTQ v1/v2 "
                              f"({fmt.FORMATS}); re-save it in format 'gptq'")
    if str(d.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ConversionError(f"{peer_dir}: pack_dtype {d['pack_dtype']!r}: only int32 words are read")
    meta = d.get("meta") or {}
    setting = lambda key, default: d.get(key, meta.get(key, default))  # noqa: E731
    quantizer = meta.get("quantizer")
    quantizer = quantizer[0] if isinstance(quantizer, list) and quantizer else quantizer
    tensors = _read_all(peer_dir)
    layers = {}
    for name in fmt.quantized_modules(tensors):
        lset = _gptq_module_settings(d, name)
        if lset is None:
            raise ConversionError(f"{peer_dir}: {name} is quantized but its config excludes it")
        b = lset["bits"]
        if b not in fmt.SUPPORTED_BITS:
            raise ConversionError(f"{peer_dir}: {name} has {b}-bit GPTQ tensors; only {fmt.SUPPORTED_BITS} "
                                  "are read (GPTQModel writes 5-7 bits in its own planar layout)")
        qweight, qzeros, scales, g_idx = (tensors.pop(f"{name}.{s}") for s in fmt.QUANT_SUFFIXES)
        u = fmt.unpack(qweight, b, dim=0).t()  # [N, K]
        if ckpt_format == "gptq_v2":
            z = fmt.unpack(qzeros, b, dim=1)
        elif b in V1_WORD_OFFSET:  # undo GPTQModel's word-wise "minus one" exactly (see docstring)
            words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + V1_WORD_OFFSET[b]) & 0xFFFFFFFF
            words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
            z = fmt.unpack(words, b, dim=1)
        else:  # 3 bits: GPTQModel shifts each field mod 8
            z = (fmt.unpack(qzeros, b, dim=1) + 1) % (1 << b)
        n, k = u.shape
        layers[name] = {"u": u, "z": z.t(), "scales": scales.t(), "g_idx": g_idx.to(torch.long),
                        "bits": b, "group_size": lset["group_size"], "sym": lset["sym"]}
    info = {"source": "gptq", "checkpoint_format": ckpt_format, "quantizer": quantizer,
            "desc_act": bool(setting("desc_act", False)), "static_groups": bool(setting("static_groups", False)),
            "damp_percent": setting("damp_percent", None),
            "true_sequential": bool(setting("true_sequential", True))}
    return layers, tensors, info


def _gptq_module_settings(d: dict, name: str) -> dict | None:
    """bits/group_size/sym of module `name` under a GPTQ config dict and its `dynamic` rules
    (GPTQModel/vLLM convention, as fmt.QuantConfig.for_module; no validation, so that settings our
    format lacks reach the dense fallback instead of an error)."""
    base = {"bits": int(d.get("bits", 4)), "group_size": int(d.get("group_size", 128)),
            "sym": bool(d.get("sym", True))}
    if name.endswith("lm_head") and not d.get("lm_head", False):
        return None
    for key, overrides in (d.get("dynamic") or {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return None
        elif re.match(key.removeprefix("+:"), name):
            return {**base, **{k: overrides[k] for k in ("bits", "group_size", "sym") if k in overrides}}
    return base


def _ct_target_matches(target: str, name: str, module_class: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == module_class or target == name or name.endswith("." + target)


def _ct_layers(peer_dir: Path) -> tuple[dict[str, Layer], dict[str, torch.Tensor], dict]:
    qc = _model_config(peer_dir)["quantization_config"]
    fmt_name = qc.get("format")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise ConversionError(f"{peer_dir}: compressed-tensors {key} is set; only plain weight "
                                  "quantization converts")
    if qc.get("kv_cache_scheme"):
        raise ConversionError(f"{peer_dir}: a kv_cache_scheme has no GPTQ equivalent")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ConversionError(f"{peer_dir}: compressed-tensors config has no config_groups")
    for gname, scheme in groups.items():
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise ConversionError(f"{peer_dir}: scheme {gname} quantizes activations; GPTQ is weight-only")
        w = scheme.get("weights") or {}
        if (scheme.get("format") or fmt_name) != "pack-quantized" or w.get("type") != "int":
            raise ConversionError(f"{peer_dir}: scheme {gname} is format {scheme.get('format') or fmt_name!r}, "
                                  f"type {w.get('type')!r}: only int pack-quantized converts")
        if w.get("strategy") not in ("group", "channel") or w.get("dynamic"):
            raise ConversionError(f"{peer_dir}: scheme {gname} strategy {w.get('strategy')!r}: only "
                                  "static group/channel weight scales convert")
    version = str(qc.get("version", "0"))
    tensors = _read_all(peer_dir)
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    layers = {}
    for name in names:
        matching = [s for s in groups.values()
                    if any(_ct_target_matches(t, name, "Linear") for t in s.get("targets", []))]
        if len(matching) != 1:
            raise ConversionError(f"{peer_dir}: {name} matches {len(matching)} config groups; expected one")
        w = matching[0]["weights"]
        b = int(w["num_bits"])
        if b == 3 and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (0, 19):
            raise ConversionError(f"{peer_dir}: 3-bit pack-quantized from compressed-tensors {version}: "
                                  "only the dense packing of 0.19 (checked here) is known to this reader")
        packed = tensors.pop(f"{name}.weight_packed")
        n, k = (int(x) for x in tensors.pop(f"{name}.weight_shape").tolist())
        scale = tensors.pop(f"{name}.weight_scale")
        if scale.dim() == 1:
            scale = scale[:, None]
        g_count = scale.shape[1]
        offset = 1 << (b - 1)
        u = _unpack_stream(packed, b, k, dim=1)  # [N, K], = signed code + offset
        zp = tensors.pop(f"{name}.weight_zero_point", None)
        if w.get("symmetric", True) or zp is None:
            z = torch.full((n, g_count), offset, dtype=torch.int32)
        elif zp.dtype == torch.int32 and zp.shape[0] != n:  # packed along N
            z = _unpack_stream(zp, b, n, dim=0)
        else:  # unpacked signed zero points [N, G] (older writers)
            z = zp.to(torch.int32).reshape(n, g_count) + offset
        g_idx = tensors.pop(f"{name}.weight_g_idx", None)
        group_size = -1 if w["strategy"] == "channel" else int(w["group_size"])
        if g_idx is None or bool((g_idx < 0).any()):
            g_idx = fmt.default_g_idx(k, group_size).to(torch.long)
        layers[name] = {"u": u, "z": z, "scales": scale, "g_idx": g_idx.to(torch.long), "bits": b,
                        "group_size": group_size, "sym": bool(w.get("symmetric", True))}
    # Non-weight tensors a compressed model may carry for a quantized module (e.g. an unused
    # weight_g_idx of a group, an observer's leftovers) are not model parameters.
    for key in [k for k in tensors if k.rsplit(".", 1)[-1].startswith(("weight_", "input_", "output_"))
                and k.rsplit(".", 1)[0] in layers]:
        del tensors[key]
    actorders = {s["weights"].get("actorder") for s in groups.values()}
    damp = None
    recipe = peer_dir / "recipe.yaml"
    if recipe.exists() and (m := re.search(r"dampening_frac:\s*([0-9.eE+-]+)", recipe.read_text())):
        damp = float(m.group(1))
    info = {"source": "compressed-tensors", "version": version, "actorder": sorted(map(str, actorders)),
            "ignore": qc.get("ignore", []), "quantizer": f"compressed-tensors:{version}",
            # "static"/"weight" act-order: columns solved in act-order, groups fixed first (k // g)
            "desc_act": any(a is not None for a in actorders),
            "static_groups": bool(actorders & {"static", "weight"}), "damp_percent": damp}
    return layers, tensors, info


def _unpack_stream(words: torch.Tensor, bits: int, length: int, dim: int) -> torch.Tensor:
    """Values of a little-endian bit stream packed along `dim` (any bits 1..8), first `length` of them."""
    if words.dtype != torch.int32:
        raise ConversionError(f"packed tensors must be int32, found {words.dtype}")
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    idx = torch.arange(length, dtype=torch.int64) * bits
    word, shift = idx // 32, idx % 32
    lo = w[..., word] >> shift
    hi = torch.where(shift + bits > 32, w[..., torch.clamp(word + 1, max=w.shape[-1] - 1)] << (32 - shift),
                     torch.zeros_like(lo))
    vals = (lo | hi) & ((1 << bits) - 1)
    return vals.to(torch.int32).movedim(-1, dim).contiguous()


# ---------------------------------------------------------------------------------------------
# Writing ours
# ---------------------------------------------------------------------------------------------

def dequantize_layer(layer: Layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] = scale[n, g] * (u[n, k] - z[n, g]), g = g_idx[k], in fp32 (the peer's scales as they are)."""
    g = layer["g_idx"]
    s = layer["scales"].float()[:, g]
    return ((layer["u"].float() - layer["z"].float()[:, g]) * s).to(dtype)


def _why_not_gptq(name: str, layer: Layer, inexact: str) -> str | None:
    n, k = layer["u"].shape
    b, gs = layer["bits"], layer["group_size"]
    if b not in fmt.SUPPORTED_BITS:
        return f"{name}: {b} bits is not one of ours {fmt.SUPPORTED_BITS}"
    if gs not in fmt.SUPPORTED_GROUP_SIZES:
        return f"{name}: group_size {gs} is not one of ours {fmt.SUPPORTED_GROUP_SIZES}"
    if (k * b) % 32 or (n * b) % 32 or (b == 3 and (k % 32 or n % 32)):
        return f"{name}: a {n}x{k} layer does not pack into whole 32-bit words at {b} bits"
    if gs != -1 and k % gs:
        return f"{name}: group_size {gs} does not divide in_features {k}"
    if layer["scales"].dtype != torch.float16 and inexact != "round":
        s = layer["scales"].float()
        if not bool((s.half().float() == s).all()):
            bad = (s.half().float() - s).abs() / s.abs().clamp_min(1e-30)
            return (f"{name}: scales are {layer['scales'].dtype} values that fp16 cannot hold exactly "
                    f"(max relative rounding {float(bad.max()):.2e})")
    return None


def _copy_side_files(peer_dir: Path, out: Path) -> None:
    for fname in fmt.TOKENIZER_FILES:
        if (peer_dir / fname).exists():
            shutil.copy2(peer_dir / fname, out / fname)


def to_gptq(peer_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
            inexact: str = "dense", source: str | os.PathLike | None = None) -> Path:
    """Convert the peer checkpoint in `peer_dir` into `out_dir` (created atomically); returns out_dir.

    The output is a GPTQ checkpoint of our format with exactly the peer's dequantized weights, or, where
    that is impossible (see the module docstring) and inexact == "dense", a dense fp32 model folder;
    a line on stderr says which and why. `source` (optional): a folder to take tokenizer files from
    when the peer folder lacks them.
    """
    if inexact not in ("dense", "round"):
        raise ValueError("inexact must be 'dense' or 'round'")
    peer_dir, out = Path(peer_dir), Path(out_dir).absolute()
    kind = peer_kind(peer_dir)
    layers, rest, info = (_ct_layers if kind == "compressed-tensors" else _gptq_layers)(peer_dir)
    if not layers:
        raise ConversionError(f"{peer_dir}: no quantized layers found")
    model_config = {k: v for k, v in _model_config(peer_dir).items() if k != "quantization_config"}
    problems = [p for p in (_why_not_gptq(nm, ly, inexact) for nm, ly in layers.items()) if p]
    if problems:
        return _write_dense(peer_dir, out, layers, rest, model_config, info, problems, overwrite, source)

    settings = {(ly["bits"], ly["group_size"], ly["sym"]) for ly in layers.values()}
    counts = {s: sum((ly["bits"], ly["group_size"], ly["sym"]) == s for ly in layers.values()) for s in settings}
    bits, group_size, sym = max(counts, key=counts.get)  # the most common settings are the defaults
    dynamic = {}
    for name, ly in layers.items():
        if (ly["bits"], ly["group_size"], ly["sym"]) != (bits, group_size, sym):
            dynamic[f"+:{re.escape(name)}$"] = {"bits": ly["bits"], "group_size": ly["group_size"],
                                                 "sym": ly["sym"]}
    desc_act = any(bool((ly["g_idx"] != fmt.default_g_idx(ly["u"].shape[1], ly["group_size"])).any())
                   for ly in layers.values())
    ckpt_format = "gptq" if all(bool((ly["z"] >= 1).all()) for ly in layers.values()) else "gptq_v2"
    # Modules left in fp by the peer (besides lm_head): nothing to declare, their .weight is kept.
    lm_head_quantized = any(n.endswith("lm_head") for n in layers)
    meta = {"quantizer": info.get("quantizer"), "method": "gptq", "converted_by": "benchmarks/peers/convert.py",
            "peer": {k: v for k, v in info.items() if k != "quantizer"}}
    peer_run = peer_dir / "peer_run.json"
    if peer_run.exists():
        meta["peer_run"] = json.loads(peer_run.read_text())
        versions = meta["peer_run"].get("versions") or {}
        peer = meta["peer_run"].get("peer")
        if peer in versions:
            meta["quantizer"] = f"{peer}:{versions[peer]}"
    cfg = fmt.QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act or bool(info.get("desc_act")),
                          static_groups=bool(info.get("static_groups")),
                          damp_percent=float(info["damp_percent"] if info.get("damp_percent") is not None
                                             else fmt.QuantConfig.damp_percent),
                          true_sequential=bool(info.get("true_sequential", True)),
                          checkpoint_format=ckpt_format, lm_head=lm_head_quantized, dynamic=dynamic, meta=meta)
    tensors: dict[str, torch.Tensor] = {}
    for name, ly in layers.items():
        packed = fmt.pack_layer(ly["u"], ly["z"].t(), ly["scales"].t().to(torch.float16), ly["g_idx"],
                                ly["bits"], ckpt_format)
        tensors.update({f"{name}.{s}": t for s, t in packed.items()})
    tensors.update(rest)
    out = fmt.save_checkpoint(out, tensors, cfg, model_config, source=peer_dir, overwrite=overwrite)
    if source is not None:
        for fname in fmt.TOKENIZER_FILES:
            if not (out / fname).exists() and (Path(source) / fname).exists():
                shutil.copy2(Path(source) / fname, out / fname)
    fmt.validate(out)
    print(f"convert: {peer_dir} ({kind}, {len(layers)} layers, {bits}-bit g{group_size} "
          f"{'sym' if sym else 'asym'}{', act-order g_idx' if desc_act else ''}"
          f"{', static act-order' if cfg.static_groups and cfg.desc_act else ''}) -> {out} "
          f"(GPTQ, checkpoint_format {ckpt_format}, exact)", file=sys.stderr)
    return out


def _write_dense(peer_dir: Path, out: Path, layers: dict[str, Layer], rest: dict[str, torch.Tensor],
                 model_config: dict, info: dict, problems: list[str], overwrite: bool, source) -> Path:
    from safetensors.torch import save_file
    import tempfile
    print(f"convert: NOTE {peer_dir} cannot be written exactly in our GPTQ format "
          f"({problems[0]}{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}): writing "
          f"the peer's dequantized weights as a dense fp32 model to {out} instead", file=sys.stderr)
    if out.exists() and not overwrite:
        raise fmt.FormatError(f"{out} already exists: choose another output folder or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {f"{name}.weight": dequantize_layer(ly) for name, ly in layers.items()}
        state.update({k: v.float() if v.is_floating_point() else v for k, v in rest.items()})
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / fmt.WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**model_config, "dtype": "float32"}, indent=2))
        (tmp / "peer_conversion.json").write_text(json.dumps(
            {"dense_fallback": True, "why": problems, "peer": info}, indent=2, default=str))
        _copy_side_files(peer_dir, tmp)
        if source is not None:
            for fname in fmt.TOKENIZER_FILES:
                if not (tmp / fname).exists() and (Path(source) / fname).exists():
                    shutil.copy2(Path(source) / fname, tmp / fname)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Running a peer on our calibration windows
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
PEERS = ("llmcompressor", "gptqmodel")


def peer_python(peer: str) -> Path:
    """The peer venv's python ($PEERS_VENV_ROOT or .cache/peers), made by setup.sh when missing."""
    import subprocess
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}: one of {PEERS}")
    root = Path(os.environ.get("PEERS_VENV_ROOT", REPO / ".cache" / "peers"))
    venv = root / f"{peer}-venv"
    py = venv / "bin" / "python"
    if not (venv / ".peer-setup-stamp").exists():
        subprocess.run(["bash", str(REPO / "benchmarks" / "peers" / "setup.sh"), peer], check=True,
                       env={**os.environ, "PEER_VENV": str(venv)})
    return py


def quantize_with_peer(peer: str, model_dir: str | os.PathLike, ids: torch.Tensor, bits: int, group_size: int,
                       act_order: bool, sym: bool, out_dir: str | os.PathLike, threads: int = 1,
                       damp: float | None = None, extra_args: tuple[str, ...] = ()) -> Path:
    """Quantize `model_dir` with `peer` on exactly the calibration windows `ids` [nsamples, seqlen]
    (int64 token ids), convert the result with to_gptq, and return the converted folder `out_dir`.

    Next to out_dir: `<out_dir>.ids.safetensors` (the windows handed over), `<out_dir>.native/` (the
    peer's own checkpoint, with peer_run.json) and `<out_dir>.log` (the peer's output). Work whose
    output exists for the same inputs (peer_key.json: peer, model, sha1 of the ids, settings) is
    skipped; an out_dir made from other inputs is an error (remove it).
    """
    import hashlib
    import subprocess
    from safetensors.torch import save_file
    model_dir, out = Path(model_dir).absolute(), Path(out_dir).absolute()
    ids = ids.to(torch.int64).contiguous()
    if ids.dim() != 2:
        raise ValueError(f"ids must be [nsamples, seqlen], found {list(ids.shape)}")
    key = {"peer": peer, "model": str(model_dir), "ids_sha1": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
           "ids_shape": list(ids.shape), "bits": bits, "group_size": group_size, "act_order": act_order,
           "sym": sym, "damp": damp, "extra_args": list(extra_args)}
    native, ids_file, log = (out.with_name(out.name + sfx) for sfx in (".native", ".ids.safetensors", ".log"))

    def matches(folder: Path) -> bool:
        f = folder / "peer_key.json"
        if not f.exists():
            return False
        if json.loads(f.read_text()) != key:
            raise fmt.FormatError(f"{folder} was made from other inputs than these ({f}); remove it or "
                                  "choose another out_dir")
        return True

    if out.exists() and matches(out):
        print(f"peers: {out} is up to date", file=sys.stderr)
        return out
    if not (native.exists() and matches(native)):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, ids_file)
        tmp = native.with_name(native.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        runner = REPO / "benchmarks" / "peers" / f"run_{peer}.py"
        cmd = [str(peer_python(peer)), str(runner), "--model", str(model_dir), "--ids", str(ids_file),
               "--bits", str(bits), "--group-size", str(group_size),
               "--act-order" if act_order else "--no-act-order", "--sym" if sym else "--asym",
               "--threads", str(threads), "--out", str(tmp), *extra_args]
        if damp is not None:
            cmd += ["--damp", str(damp)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "GPTQMODEL_CPU_WORKERS": str(max(2, threads)), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        print(f"peers: running {peer} ({' '.join(cmd[1:])}), output in {log}", file=sys.stderr)
        with open(log, "w") as fh:
            # cwd: GPTQModel writes a logs/ folder into the working directory
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        if proc.returncode != 0 or not (tmp / "config.json").exists():
            tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
            raise RuntimeError(f"{peer} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
        (tmp / "peer_key.json").write_text(json.dumps(key, indent=2))
        shutil.rmtree(native, ignore_errors=True)
        os.rename(tmp, native)
    to_gptq(native, out, overwrite=True, source=model_dir)
    (out / "peer_key.json").write_text(json.dumps(key, indent=2))
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="convert a peer (GPTQModel / llm-compressor) checkpoint to ours")
    p.add_argument("peer_dir")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--inexact", choices=("dense", "round"), default="dense",
                   help="scales fp16 cannot hold: write a dense model (exact) or round them to fp16")
    args = p.parse_args(argv)
    print(to_gptq(args.peer_dir, args.out_dir, overwrite=args.overwrite, inexact=args.inexact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
