"""lm-eval with our plugin: the `lm_eval` CLI's `vllm` backend (quantization=gptq-plugin) on a local task
scores a tiny RTN checkpoint as the pure-torch reference of the same checkpoint does, both through
lm-eval's `hf` backend and by our own log-likelihoods over the task's JSONL; `vllm-gptq eval` prints the comparison table; bad task names fail before any model loads.

Tolerance: both sides run in float32, so log-likelihoods differ only by summation order (~1e-6 per
token): perplexity agrees to 1e-4 relative, and accuracies are equal (a flip needs a near-exact tie
between two choices; one document's worth is allowed)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_vllm_generate import checkpoint
from vllm_gptq_plugin import cli
from vllm_gptq_plugin.offline_quant import evaluate, loader

PPL_RTOL = 1e-4
LIMIT = 24


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return checkpoint("sym4")  # tiny llama, RTN 4-bit g64 sym


@pytest.fixture(scope="module")
def reference(ckpt) -> dict:
    """lm-eval `hf` backend on loader.load_model(ckpt): the pure-torch reference run of both tasks."""
    return evaluate.evaluate(str(ckpt), list(evaluate.LOCAL_TASKS), "hf", limit=LIMIT, max_model_len=512)


def assert_close(got: dict, want: dict, limit: int) -> None:
    for task, metrics in want.items():
        for metric, value in metrics.items():
            if metric == "perplexity":
                assert got[task][metric] == pytest.approx(value, rel=PPL_RTOL), (task, got, want)
            else:
                assert abs(got[task][metric] - value) <= 1 / limit + 1e-9, (task, metric, got, want)


@torch.no_grad()
def own_lastword_metrics(path: Path, limit: int) -> dict:
    """gptq_lastword without lm-eval: log p(" " + target | context) from loader.load_model, split into
    tokens as lm-eval does (the continuation is what encoding context + continuation adds)."""
    import transformers
    model, tok = loader.load_model(path), transformers.AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (evaluate.TASKS_DIR / "gptq_lastword.jsonl").read_text().splitlines()]
    lls, greedy = [], []
    for row in rows[:limit]:
        ctx = tok(row["context"]).input_ids
        whole = tok(row["context"] + " " + row["target"]).input_ids
        logp = model(torch.tensor([whole])).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
        target = torch.tensor(whole[len(ctx):])
        lls.append(logp.gather(1, target[:, None]).sum().item())
        greedy.append(bool((logp.argmax(-1) == target).all()))
    return {"perplexity": math.exp(-sum(lls) / len(lls)), "acc": sum(greedy) / len(greedy)}


def vllm_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")  # see vllm_greedy in test_vllm_generate.py
    return env


def test_lm_eval_cli_vllm_backend_matches_the_reference(ckpt, reference, tmp_path, tiny_llama):
    """The `lm_eval` command deploy/README.md documents, run as a user runs it (a subprocess)."""
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval), "--model", "vllm", "--model_args",
           f"pretrained={ckpt},quantization=gptq-plugin,dtype=float32,enforce_eager=True,max_model_len=512",
           "--tasks", "gptq_lastword", "--include_path", str(evaluate.TASKS_DIR), "--limit", str(LIMIT),
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    [result_file] = list((tmp_path / "out").rglob("results_*.json"))
    got = json.loads(result_file.read_text())["results"]["gptq_lastword"]
    got = {"gptq_lastword": {k.split(",")[0]: v for k, v in got.items() if "," in k and "stderr" not in k}}
    assert_close(got, {"gptq_lastword": reference["gptq_lastword"]}, LIMIT)
    assert_close(got, {"gptq_lastword": own_lastword_metrics(ckpt, LIMIT)}, LIMIT)
    # The check can fail: the fp model the checkpoint came from scores measurably differently.
    fp = evaluate.evaluate(str(tiny_llama), ["gptq_lastword"], "hf", limit=LIMIT, max_model_len=512)
    assert fp["gptq_lastword"]["perplexity"] != pytest.approx(got["gptq_lastword"]["perplexity"], rel=100 * PPL_RTOL)


def test_vllm_gptq_eval_prints_the_table(ckpt, reference, tmp_path, capsys, monkeypatch):
    for k, v in vllm_env().items():
        monkeypatch.setenv(k, v)
    out_json = tmp_path / "eval.json"
    rc = cli.main(["eval", "--models", str(ckpt), "--tasks", "gptq_lastword,gptq_continuation",
                   "--limit", str(LIMIT), "--max-model-len", "512", "--json", str(out_json)])
    assert rc == 0
    got = json.loads(out_json.read_text())[str(ckpt)]
    assert_close(got, reference, LIMIT)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    for column in ("gptq_lastword perplexity", "gptq_lastword acc", "gptq_continuation acc_norm"):
        assert column in header
    assert f"| {ckpt} | " in table


def test_unknown_task_is_refused_before_loading(ckpt, capsys):
    rc = cli.main(["eval", "--models", str(ckpt), "--tasks", "gptq_lastword,no_such_task"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err and "gptq_lastword" in err and "lm_eval ls tasks" in err


def test_missing_model_folder_is_refused(tmp_path, capsys):
    rc = cli.main(["eval", "--models", str(tmp_path / "nope"), "--tasks", "gptq_lastword"])
    assert rc == 2
    assert "not a model folder" in capsys.readouterr().err


def test_shipped_task_files_are_what_the_builder_makes(tmp_path):
    """The JSONL in offline_quant/tasks/ is reproducible from the eval texts (and has both corpora)."""
    paths = evaluate.build_local_tasks(tmp_path)
    for task, path in paths.items():
        shipped = (evaluate.TASKS_DIR / f"{task}.jsonl").read_text(encoding="utf-8")
        assert path.read_text(encoding="utf-8") == shipped, f"{task}: rebuild with `vllm-gptq eval --build-tasks`"
        rows = [json.loads(line) for line in shipped.splitlines()]
        assert {r["source"] for r in rows[:LIMIT]} == set(evaluate.TASK_CORPORA)
    rows = [json.loads(line) for line in paths["gptq_continuation"].read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert {r["label"] for r in rows} == {0, 1, 2, 3}
    lastword = [json.loads(line) for line in paths["gptq_lastword"].read_text().splitlines()]
    assert all(evaluate.WORD.fullmatch(r["target"]) and r["context"] for r in lastword)
