"""The CPU dispatch by measurement (kernels/cpu_dispatch.py): given timings, the table picks the fastest
path per M bucket deterministically; the op then runs the picked path and still matches the independent
reference; a corrupt, foreign or outdated table is ignored with a warning; `vllm-gptq tune-cpu` times
the real paths and writes a table the dispatch reads."""
import json
import logging

import pytest
import torch

import gptq_reference as ref
from vllm_gptq_plugin import cli
from vllm_gptq_plugin.kernels import cpu, cpu_dispatch, gptq_gemm, prepare
from gptq_reference import assert_close, random_layer

SHAPES = ((256, 128), (512, 256))  # K x N
MS = (1, 4, 16)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "TABLE_DIR", tmp_path)
    cpu_dispatch.clear_cache()
    yield tmp_path
    cpu_dispatch.clear_cache()


def fake_timer(ms_of):
    """timer(key, fns) -> ms_of(k, n, m, path), never calling fns (the test decides the timings)."""
    return lambda key, fns: ms_of(*key)


# Timings in which each path wins somewhere: int4pack at M = 1, fused at M = 4 (for layers that have
# it), tiles from M = 16; at M = 4 int4pack and tiles tie.
def timings(k, n, m, path):
    return {1: {"fused": 3.0, "int4pack": 1.0, "tiles": 5.0},
            4: {"fused": 1.0, "int4pack": 2.0, "tiles": 2.0},
            16: {"fused": 9.0, "int4pack": 8.0, "tiles": 4.0}}[m][path]


def _layer(n=128, k=256, bits=4):
    t = random_layer(n, k, bits, 64, act_order=True, seed=bits)
    return t, prepare(**t, bits=bits, dtype=torch.bfloat16)


def test_the_table_picks_the_fastest_timed_path_per_bucket_deterministically(tables):
    entries = cpu_dispatch.measure(SHAPES, MS, timer=fake_timer(timings), stream_bytes=0)
    assert entries == cpu_dispatch.measure(SHAPES, MS, timer=fake_timer(timings), stream_bytes=0)
    cpu_dispatch.write(entries)
    _, w = _layer()
    paths = cpu.paths(w.impl)
    assert paths in (("fused", "int4pack", "tiles"), ("int4pack", "tiles"))  # fused: AVX512-BF16 builds only
    want = {1: "int4pack", 2: "fused" if "fused" in paths else "int4pack",  # the tie at M=4: PATHS order
            4: "fused" if "fused" in paths else "int4pack", 5: "tiles", 16: "tiles", 300: "tiles"}
    assert {m: cpu.path(w.impl, m) for m in want} == want
    # the same timings, written again, pick the same
    picks = {m: cpu.path(w.impl, m) for m in range(1, 40)}
    cpu_dispatch.write(json.loads(json.dumps(entries)))
    assert {m: cpu.path(w.impl, m) for m in range(1, 40)} == picks


def test_a_layer_takes_the_nearest_timed_shape_and_only_paths_it_has(tables):
    def by_shape(k, n, m, path):  # the 512x256 entry prefers tiles everywhere, the 256x128 one int4pack
        return {"int4pack": 1.0, "tiles": 2.0, "fused": 3.0}[path] if k == 256 else \
            {"int4pack": 2.0, "tiles": 1.0, "fused": 3.0}[path]
    cpu_dispatch.write(cpu_dispatch.measure(SHAPES, MS, timer=fake_timer(by_shape), stream_bytes=0))
    _, small = _layer(n=128, k=256)
    _, large = _layer(n=320, k=640)  # nearer 512x256 in log K + log N
    assert {cpu.path(small.impl, m) for m in (1, 8, 64)} == {"int4pack"}
    assert {cpu.path(large.impl, m) for m in (1, 8, 64)} == {"tiles"}
    t8 = random_layer(128, 256, 8, 64, seed=8)  # 8-bit: one path whatever the table says
    w8 = prepare(**t8, bits=8, dtype=torch.bfloat16)
    assert cpu.path(w8.impl, 1) == cpu.paths(w8.impl)[0] and len(cpu.paths(w8.impl)) == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_whatever_path_the_table_picks_the_op_matches_the_reference(tables, bits):
    t, w = _layer(bits=bits)
    for path in cpu.paths(w.impl):
        cpu_dispatch.write(cpu_dispatch.measure(SHAPES, MS, stream_bytes=0,
                                                timer=fake_timer(lambda k, n, m, p: 1.0 if p == path else 2.0)))
        for m in (1, 7, 33):
            assert cpu.path(w.impl, m) == path
            x = torch.randn(m, 256).bfloat16()
            assert_close(gptq_gemm(x, w), ref.linear(x, t, bits, "gptq"), torch.bfloat16)


@pytest.mark.parametrize("spoil,why", [
    (lambda d: "{not json", "Expecting property name"),
    (lambda d: {**d, "version": 99}, "version 99"),
    (lambda d: {**d, "machine": {**d["machine"], "cpu": "Some Other CPU"}}, "not this machine"),
    (lambda d: {**d, "entries": {"int4pack/bfloat16/k256/n128": {"1": {"tiles": -1}}}}, "entry"),
    (lambda d: {**d, "entries": {"int4pack/bfloat16/kx/n128": {}}}, "invalid literal"),
])
def test_a_corrupt_foreign_or_outdated_table_is_ignored_with_a_warning(tables, caplog, spoil, why):
    always_tiles = fake_timer(lambda k, n, m, p: 1.0 if p == "tiles" else 2.0)
    path = cpu_dispatch.write(cpu_dispatch.measure(SHAPES, MS, stream_bytes=0, timer=always_tiles))
    _, w = _layer()
    assert cpu.path(w.impl, 1) == "tiles"  # the table is read
    spoiled = spoil(json.loads(path.read_text()))
    path.write_text(spoiled if isinstance(spoiled, str) else json.dumps(spoiled))
    cpu_dispatch.clear_cache()
    with caplog.at_level(logging.WARNING, logger="vllm_gptq_plugin.kernels.cpu_dispatch"):
        assert cpu.path(w.impl, 1) == cpu_dispatch.default(cpu.paths(w.impl), torch.bfloat16, 1) != "tiles"
    assert "ignoring the CPU kernel table" in caplog.text and why in caplog.text, caplog.text


def test_tune_cpu_times_the_real_paths_and_the_dispatch_uses_its_table(tables, monkeypatch, capsys):
    monkeypatch.setattr(cpu_dispatch, "TUNE_SHAPES", SHAPES)
    monkeypatch.setattr(cpu_dispatch, "TUNE_MS", (1, 16))
    monkeypatch.setattr(cpu_dispatch, "l3_bytes", lambda: 1 << 20)  # a few copies of the small layers
    assert cli.main(["tune-cpu", "--show"]) == 0
    assert "no table: the default dispatch" in capsys.readouterr().out
    assert cli.main(["tune-cpu", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    data = json.loads(cpu_dispatch.table_path().read_text())
    assert data["machine"] == cpu_dispatch.machine()
    _, w = _layer()
    entry = data["entries"][cpu_dispatch.layout_key(cpu.paths(w.impl), torch.bfloat16, 256, 128)]
    assert set(entry) == {"1", "16"} and all(set(t) == set(cpu.paths(w.impl)) for t in entry.values())
    for m in ("1", "16"):  # the dispatch takes the measured minimum; --show prints the same pick
        best = min(entry[m], key=lambda p: (entry[m][p], cpu_dispatch.PATHS.index(p)))
        assert cpu.path(w.impl, int(m)) == best
        assert any(f"256x128    M={m:<4}" in line and line.endswith(f"-> {best}") for line in out.splitlines()), out
    assert data["machine"]["cpu"] in out
