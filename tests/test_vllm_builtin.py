"""In the subset vLLM's built-in `gptq` also serves (4-bit, sym, no act-order), `gptq-plugin` decodes the
same greedy tokens as the built-in path on the same checkpoint (float16, the built-in's dtype). Where
the built-in cannot run on this CPU (builtin_gptq_cpu_kernel says why), the plugin still serves the
checkpoint and decodes the pure-torch reference's tokens in float32."""
from __future__ import annotations

import pytest

from test_vllm_generate import (
    PROMPTS, assert_same_tokens, builtin_gptq_cpu_kernel, checkpoint, reference_greedy, tokenize, vllm_greedy)

MAX_TOKENS = 12


@pytest.mark.slow
def test_plugin_equals_builtin_gptq():
    path = checkpoint("sym4")
    prompt_ids = tokenize(path, PROMPTS)
    if builtin_gptq_cpu_kernel():
        ours = vllm_greedy(path, prompt_ids, MAX_TOKENS, quantization="gptq-plugin")
        assert_same_tokens(ours, reference_greedy(path, prompt_ids, MAX_TOKENS), "sym4, no built-in here")
        return
    builtin = vllm_greedy(path, prompt_ids, MAX_TOKENS, quantization="gptq", dtype="float16")
    ours = vllm_greedy(path, prompt_ids, MAX_TOKENS, quantization="gptq-plugin", dtype="float16")
    assert all(len(t) == MAX_TOKENS for t in ours)
    assert ours == builtin
