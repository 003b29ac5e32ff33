"""Perplexity by the stride method, and `vllm-gptq ppl`.

The token stream is cut into windows of `ctx` tokens whose starts are `stride` apart. Each window
scores only the tokens that no earlier window scored (its last `stride` tokens, all of them for the
first window), each predicted from everything before it inside the window. So with stride < ctx every
token after the first is scored exactly once with at least ctx - stride tokens of context; with
stride == ctx the windows are disjoint and a window's first token is not scored (nothing precedes it
in the window), the convention of the GPTQ paper's evaluation.
"""
from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_gptq_plugin.format import FormatError


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: it reads tokens [begin, end) and scores the targets
    [first_target, end), each from the tokens before it in the window."""
    if not 0 < stride <= ctx:
        raise FormatError(f"need 0 < stride <= ctx (got stride={stride}, ctx={ctx}): a stride above "
                          f"ctx would skip tokens")
    out, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first_target = max(scored_until, begin + 1)
        if first_target < end:
            out.append((begin, end, first_target))
        scored_until = end
        if end == n_tokens:
            break
    return out


def _accepts_logits_to_keep(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, ctx: int = 512, stride: int | None = None,
               max_tokens: int | None = None, progress: bool = True) -> tuple[float, int]:
    """Perplexity of a causal LM on a token stream, and the number of tokens scored.

    input_ids: LongTensor [T] or [1, T]. stride defaults to ctx (disjoint windows). model(input_ids=[1, L]) must return `.logits` [1, L', V]
    for the last L' positions (L' = L unless logits_to_keep is passed). NLL is summed in float64
    from fp32 log-probabilities, whatever the model's dtype.
    """
    ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    assert ids.dim() == 1, f"input_ids must be [T] or [1, T], got {tuple(input_ids.shape)}"
    if max_tokens is not None:
        ids = ids[:max_tokens]
    spans = windows(ids.numel(), ctx, ctx if stride is None else stride)
    if not spans:
        raise FormatError(f"{ids.numel()} tokens: perplexity needs at least 2")
    device = next(model.parameters()).device
    keep = _accepts_logits_to_keep(model)
    nll, n_scored = 0.0, 0
    for begin, end, first_target in tqdm(spans, desc="ppl", unit="window", disable=not progress):
        window = ids[begin:end].to(device)[None]
        n_new = end - first_target
        # Logits at position p predict p + 1: the targets need positions [first_target - 1, end - 1).
        if keep:
            logits = model(input_ids=window, logits_to_keep=n_new + 1).logits[0, :-1]
        else:
            logits = model(input_ids=window).logits[0, first_target - 1 - begin:end - 1 - begin]
        assert logits.shape[0] == n_new, (logits.shape, n_new)
        targets = ids[first_target:end].to(device)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        n_scored += n_new
    return math.exp(nll / n_scored), n_scored


def text_ppl(model_dir, text_spec: str, ctx: int = 512, stride: int | None = None, max_tokens: int | None = None,
             dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Perplexity of the model (fp or quantized checkpoint) in `model_dir` on a text spec (a file or
    "corpus:split"). Returns {"ppl", "tokens", "seconds", "text", "ctx", "stride"}."""
    import transformers

    from vllm_gptq_plugin.offline_quant import data
    from vllm_gptq_plugin.offline_quant.loader import load_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = data.encode(tokenizer, data.resolve_text(text_spec), max_tokens)
    model = load_model(model_dir, dtype)
    start = time.perf_counter()
    ppl, n = perplexity(model, ids, ctx, stride, max_tokens, progress)
    return dict(ppl=ppl, tokens=n, seconds=time.perf_counter() - start, text=str(text_spec),
                ctx=ctx, stride=ctx if stride is None else stride)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF folder: a fp model or a GPTQ checkpoint")
    p.add_argument("--text", required=True,
                   help="a text file (.txt/.rst/.jsonl) or corpus:split, e.g. pydocs:eval (docs/DATA.md)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: ctx)")
    p.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args) -> int:
    r = text_ppl(args.model, args.text, args.ctx, args.stride, args.max_tokens,
                 getattr(torch, args.dtype))
    print(f"ppl {r['ppl']:.4f} over {r['tokens']} tokens of {r['text']} "
          f"(ctx {r['ctx']}, stride {r['stride']}, {args.dtype}) in {r['seconds']:.1f} s")
    return 0
