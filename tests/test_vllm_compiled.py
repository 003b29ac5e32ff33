"""vLLM's default mode with gptq-plugin: no enforce_eager, so vLLM compiles the whole model with
torch.compile (Dynamo traces LinearMethod.apply; the GEMM is the opaque op vllm_gptq_plugin::gemm).
The engine starts and decodes exactly the greedy tokens of eager mode, which match the pure-torch
reference (fp32 on both sides). The compile cache is off, so the model is really compiled here, and
the engines run in their own process: compiling in this one after other tests' engines were torn
down in it failed in vLLM's warm-up ("pipeline model parallel group is not initialized").
"""
import pytest

from test_vllm_generate import (
    MAX_TOKENS, PROMPTS, assert_same_tokens, checkpoint, reference_greedy, tokenize, vllm_greedy)


@pytest.mark.slow
def test_compiled_mode_generates_the_eager_tokens(monkeypatch):
    from vllm.config import CompilationMode
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    path = checkpoint("mixed")  # 3-, 4- and 8-bit layers and an unquantized one in one model
    prompt_ids = tokenize(path, PROMPTS)
    modes = []

    def spy(llm):
        modes.append(llm.llm_engine.vllm_config.compilation_config.mode)
    compiled = vllm_greedy(path, prompt_ids, MAX_TOKENS, enforce_eager=False, _inspect=spy)
    assert modes and modes[0] != CompilationMode.NONE, f"vLLM did not compile the model: mode {modes}"
    eager = vllm_greedy(path, prompt_ids, MAX_TOKENS)
    assert compiled == eager, f"compiled {compiled} != eager {eager}"
    assert_same_tokens(compiled, reference_greedy(path, prompt_ids, MAX_TOKENS), "compiled mode, mixed")
