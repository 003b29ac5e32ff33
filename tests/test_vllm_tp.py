"""Tensor parallel 2 on CPU: the classic GPTQ trap is the row-parallel layer with act-order (each rank
gets a K-slice of qweight and g_idx whose groups lie anywhere, so it needs all the scales). TP 2 must
decode the same greedy tokens as TP 1 and as the pure-torch reference, for an act-order checkpoint
and (opt-in, --run-opt-in: another ~80 s) for a 3-bit one without act-order (groups sharded with K,
3-bit words split across ranks). Measured on the 2-core dev box: both pass; ~110 s and ~80 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_vllm_generate import PROMPTS, assert_same_tokens, checkpoint, reference_greedy, tokenize, vllm_greedy

MAX_TOKENS = 10

TP2_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":  # vLLM spawns the TP workers: guard the entry point
        path, prompt_ids, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(path, quantization="gptq-plugin", tensor_parallel_size=2, dtype="float32",
                  enforce_eager=True, max_model_len=256, seed=0, distributed_executor_backend="mp")
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
""")


def tp2_greedy(path, prompt_ids, max_tokens) -> list[list[int]]:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", TP2_SCRIPT, str(path), json.dumps(prompt_ids), str(max_tokens)],
                          env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, f"TP=2 run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("TOKENS "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["actorder", pytest.param("bits3", marks=pytest.mark.opt_in)])
def test_tp2_equals_tp1_and_reference(name):
    path = checkpoint(name)
    prompt_ids = tokenize(path, PROMPTS)
    tp2 = tp2_greedy(path, prompt_ids, MAX_TOKENS)
    tp1 = vllm_greedy(path, prompt_ids, MAX_TOKENS)
    assert tp2 == tp1
    assert_same_tokens(tp2, reference_greedy(path, prompt_ids, MAX_TOKENS), f"TP=2 {name}")
