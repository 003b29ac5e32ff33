"""`vllm-gptq generate`: a GPTQ checkpoint through vLLM's offline engine with `--quantization gptq-plugin`.

    vllm-gptq generate CKPT --prompt "The capital of France is" --prompt "Once upon a time" --max-tokens 32
    vllm-gptq generate CKPT --chat --prompt "Name three colours."

Defaults suit a CPU: eager mode, a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE, unless already set),
greedy decoding. Prints one block per prompt.
"""
from __future__ import annotations

import os

from vllm_gptq_plugin import QUANT_NAME


def add_arguments(p) -> None:
    p.add_argument("model", help="checkpoint folder (or a plain model with --quantization none)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--quantization", default=QUANT_NAME,
                   help=f"vLLM quantization method (default {QUANT_NAME}; 'none' for an fp model)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1,
                   help="CPU KV cache size (sets VLLM_CPU_KVCACHE_SPACE if unset)")
    p.add_argument("--no-enforce-eager", action="store_true", help="allow graph capture / torch.compile")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, quantization=None if args.quantization == "none" else args.quantization,
              dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, enforce_eager=not args.no_enforce_eager, seed=args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outs):
        print(f"### prompt: {prompt}\n{out.outputs[0].text}\n", flush=True)
    return 0
