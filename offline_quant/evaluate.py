"""`vllm-gptq eval`: lm-evaluation-harness tasks on several checkpoints, one comparison table.

    vllm-gptq eval --models out/fp out/rtn4 out/gptq4 --tasks gptq_lastword,gptq_continuation
    vllm-gptq eval --models out/gptq4 --tasks hellaswag --limit 200      # a standard task (its dataset
                                                                         # must be in your HF cache)

Backends: `vllm` (default) runs lm-eval's vLLM model with `quantization=gptq-plugin` for quantized
checkpoints (none for fp folders); `hf` runs lm-eval's transformers model on the pure-torch reference
(offline_quant.loader: quantized layers dequantized), the numerical reference of the vLLM run.

Local tasks (offline_quant/tasks/, YAML + JSONL, no hub): built from the held-out texts
shakespeare:eval and pydocs:eval by `build_local_tasks` (deterministic; `--build-tasks` rewrites them).
    gptq_lastword      last-word prediction (LAMBADA-style): acc, perplexity of the word
    gptq_continuation  4-way multiple choice of the 12 words that follow a passage: acc, acc_norm
"""
from __future__ import annotations

import gc
import json
import os
import random
import re
import sys
from pathlib import Path

from vllm_gptq_plugin.format import FormatError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_PIN = "lm-eval==0.4.13"  # the version checked with vllm 0.32 and transformers 5.19
LOCAL_TASKS = ("gptq_lastword", "gptq_continuation")
TASK_CORPORA = ("shakespeare", "pydocs")
LASTWORD_PER_CORPUS = 150
CONTINUATION_PER_CORPUS = 100
MAX_CONTEXT_WORDS = 80  # passages stay well under 256 tokens: fits small max_model_len settings
MIN_CONTEXT_WORDS = 16
CHOICE_WORDS = 12
WORD = re.compile(r"[A-Za-z]{3,}")


# ---------------------------------------------------------------------------------------------
# The local tasks' data
# ---------------------------------------------------------------------------------------------

def _paragraphs(text: str, min_words: int) -> list[list[str]]:
    """Blank-line separated paragraphs as word lists (whitespace collapsed), at least min_words long."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        if len(words) >= min_words:
            out.append(words)
    return out


def lastword_rows(text: str, source: str, count: int, rng: random.Random) -> list[dict]:
    """`count` passages, each cut just before its last 3+-letter word within MAX_CONTEXT_WORDS + 1."""
    rows = []
    paras = _paragraphs(text, MIN_CONTEXT_WORDS + 1)
    for words in rng.sample(paras, min(len(paras), 4 * count)):
        words = words[:MAX_CONTEXT_WORDS + 1]
        i = next((j for j in range(len(words) - 1, MIN_CONTEXT_WORDS - 1, -1) if WORD.fullmatch(words[j])), None)
        if i is not None:
            rows.append({"context": " ".join(words[:i]), "target": words[i], "source": source})
        if len(rows) == count:
            return rows
    raise FormatError(f"{source}: only {len(rows)} passages fit the last-word task (wanted {count})")


def continuation_rows(text: str, source: str, count: int, rng: random.Random) -> list[dict]:
    """`count` passages followed by 4 choices: their own next CHOICE_WORDS words and the same span of
    3 other passages of the corpus, shuffled; `label` is the right one's index."""
    paras = _paragraphs(text, MIN_CONTEXT_WORDS + CHOICE_WORDS)
    if len(paras) < 4 * count:
        raise FormatError(f"{source}: {len(paras)} paragraphs, the continuation task needs {4 * count}")
    picked = rng.sample(paras, 4 * count)
    rows = []
    for n in range(count):
        words = picked[n][:MAX_CONTEXT_WORDS + CHOICE_WORDS]
        cut = len(words) - CHOICE_WORDS
        right = " ".join(words[cut:])
        wrong = [" ".join(w[cut:cut + CHOICE_WORDS] if len(w) >= cut + CHOICE_WORDS else w[-CHOICE_WORDS:])
                 for w in picked[count + 3 * n: count + 3 * n + 3]]
        choices = [right] + wrong
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[:cut]), "choices": choices, "label": choices.index(right),
                     "source": source})
    return rows


def build_local_tasks(out_dir: str | os.PathLike = TASKS_DIR, seed: int = 0) -> dict[str, Path]:
    """Write gptq_lastword.jsonl and gptq_continuation.jsonl into out_dir from the eval splits.
    The rows depend only on the texts and the seed."""
    from vllm_gptq_plugin.offline_quant import data
    out_dir = Path(out_dir)
    rows = {"gptq_lastword": [], "gptq_continuation": []}
    for corpus in TASK_CORPORA:
        text = data.corpus_text(corpus, "eval")
        rows["gptq_lastword"] += lastword_rows(text, corpus, LASTWORD_PER_CORPUS, random.Random(seed))
        rows["gptq_continuation"] += continuation_rows(text, corpus, CONTINUATION_PER_CORPUS, random.Random(seed))
    paths = {}
    for task, task_rows in rows.items():
        random.Random(seed).shuffle(task_rows)  # mix the corpora so that --limit takes both
        paths[task] = out_dir / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows),
                               encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------
# Running lm-eval
# ---------------------------------------------------------------------------------------------

def task_manager():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FormatError(f"lm-eval is not installed: pip install {LM_EVAL_PIN}") from None
    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise FormatError(f"unknown lm-eval task(s) {unknown}: the local tasks are {list(LOCAL_TASKS)}; "
                          f"`lm_eval ls tasks` lists the standard ones (their datasets must be "
                          f"available offline)")


def is_quantized(model_dir: str | os.PathLike) -> bool:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json): pass a checkpoint "
                                f"from `vllm-gptq quantize` or an HF model folder")
    config = json.loads((model_dir / "config.json").read_text())
    return "quantization_config" in config or (model_dir / "quantize_config.json").is_file()


def make_lm(model_dir: str, backend: str, dtype: str = "float32", max_model_len: int = 2048,
            batch_size: int = 16, tensor_parallel_size: int = 1):
    """An lm-eval LM object for one model folder."""
    if backend == "hf":
        import torch
        import transformers
        from lm_eval.models.huggingface import HFLM

        from vllm_gptq_plugin.offline_quant.loader import load_model
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else torch.float32
        model = load_model(model_dir, dtype=torch_dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_model_len)
    if backend == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from lm_eval.models.vllm_causallms import VLLM

        from vllm_gptq_plugin import QUANT_NAME
        return VLLM(pretrained=str(model_dir), quantization=QUANT_NAME if is_quantized(model_dir) else None,
                    dtype=dtype, max_model_len=max_model_len, batch_size=batch_size, enforce_eager=True,
                    tensor_parallel_size=tensor_parallel_size, seed=0)
    raise FormatError(f"unknown backend {backend!r}: choose vllm or hf")


def evaluate(model_dir: str, tasks: list[str], backend: str = "vllm", limit: int | None = None,
             manager=None, **lm_kwargs) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's run (metric names without lm-eval's ",none" filter tag)."""
    import lm_eval
    manager = manager or task_manager()
    check_tasks(tasks, manager)
    lm = make_lm(model_dir, backend, **lm_kwargs)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                      bootstrap_iters=0, log_samples=False, random_seed=0)
    finally:
        del lm
        gc.collect()
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per model, one column per task/metric (markdown)."""
    columns = []
    for per_task in results.values():
        for task, metrics in per_task.items():
            columns += [(task, m) for m in metrics if (task, m) not in columns]
    head = ["model"] + [f"{t} {m}" for t, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, per_task in results.items():
        cells = [per_task.get(t, {}).get(m) for t, m in columns]
        lines.append("| " + " | ".join([model] + ["" if c is None else f"{c:.4f}" for c in cells]) + " |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", help="checkpoint or fp model folders (one table row each)")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS),
                   help=f"comma-separated lm-eval task names (default: the local {','.join(LOCAL_TASKS)})")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm",
                   help="vllm: vLLM with --quantization gptq-plugin; hf: the pure-torch reference")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend only")
    p.add_argument("--json", dest="json_out", help="also write {model: {task: {metric: value}}} here")
    p.add_argument("--build-tasks", action="store_true",
                   help="rewrite the local tasks' JSONL from the eval texts, then exit")


def run(args) -> int:
    if args.build_tasks:
        for task, path in build_local_tasks().items():
            print(f"{task}: {path}")
        return 0
    if not args.models:
        print("vllm-gptq eval: error: --models DIR [DIR ...] is required", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = task_manager()
    check_tasks(tasks, manager)  # before any model loads
    for model_dir in args.models:
        is_quantized(model_dir)
    lm_kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, batch_size=args.batch_size)
    if args.backend == "vllm":
        lm_kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    results = {}
    for model_dir in args.models:
        results[model_dir] = evaluate(model_dir, tasks, args.backend, args.limit, manager, **lm_kwargs)
    table = format_table(results)
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0
