"""Datasets of the local lm-eval tasks in this folder, read from the JSONL files beside this file.

lm-eval imports this file by path (`custom_dataset: !function tasks_data.load` in the YAML), so the
tasks work from any working directory and never touch a hub or the datasets cache."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file: str, **_metadata):
    """DatasetDict {"test": the rows of HERE/file}. lm-eval also passes the task's metadata: ignored."""
    import datasets
    path = HERE / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows: rebuild it with `vllm-gptq eval --build-tasks`")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
