"""A busy server keeps answering: SmolLM2 quantized by the CLI (4-bit g64, act-order, asym: the
defaults) behind a real `vllm serve --quantization gptq-plugin`, driven by the async openai client with
64 concurrent streaming chat requests of mixed sizes (prompts 16-1,000 tokens, max_tokens 16-256, a
quarter with stop strings), every 8th closing its stream after 4 chunks. Then every other request
completed with HTTP 200 and a well-formed stream ending in `data: [DONE]`; /health answered 200 all the
while; the log names the aborted requests and the metrics show nothing left running or holding KV
cache; and 8 greedy requests sent one by one give exactly the tokens they gave the fresh server
before the load. Loopback only; bounded in count (64 + 16 requests) and time (LOAD_TIMEOUT_S).

fp32 and no prefix caching: the before/after comparison must not depend on which KV blocks a prompt
happens to reuse, and fp32 runs at full speed on every x86 CPU (bf16 needs AVX512-BF16 or AMX).
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.local_server import serve

CACHE_NAME = "smollm2-gptq-4b-g64-act-load-v1"
MODEL_NAME = "smollm2-gptq"
CLIENTS, CANCEL_EVERY, CANCEL_AFTER = 64, 8, 4
LOAD_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def checkpoint(smollm2) -> Path:
    """SmolLM2 quantized by `vllm-gptq quantize` with its defaults (asym, act-order), small calibration."""
    from conftest import CACHE
    out = CACHE / CACHE_NAME
    if not (out / "config.json").exists():
        cli = Path(sys.executable).with_name("vllm-gptq")
        subprocess.run([str(cli), "quantize", "--model", str(smollm2), "--out", str(out), "--bits", "4",
                        "--group-size", "64", "--nsamples", "16", "--seqlen", "256", "--no-progress",
                        "--overwrite"], check=True, capture_output=True, text=True)
    cfg = fmt.read_quant_config(out)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (4, 64, True, False)
    return out


def prompts(tokenizer, count: int, rng: random.Random) -> list[tuple[str, int, list[str] | None]]:
    """(user message, max_tokens, stop) with log-uniform lengths: most requests short, a few long."""
    from vllm_gptq_plugin.offline_quant import data
    ids = tokenizer(data.corpus_text("pydocs", "eval")[:400_000]).input_ids
    out = []
    for i in range(count):
        n = int(round(16 * (1000 / 16) ** rng.random()))
        start = rng.randrange(0, len(ids) - n)
        max_tokens = int(round(16 * (256 / 16) ** rng.random()))
        stop = ["\n\n", "."] if i % 4 == 1 else None
        out.append((tokenizer.decode(ids[start:start + n]), max_tokens, stop))
    return out


async def stream_chat(client, message: str, max_tokens: int, stop, cancel: bool) -> dict:
    """One streaming chat request read as raw server-sent events (so that the closing [DONE] is seen)."""
    body = dict(model=MODEL_NAME, messages=[{"role": "user", "content": message}], max_tokens=max_tokens,
                temperature=0, stream=True, stop=stop)
    async with client.chat.completions.with_streaming_response.create(**body) as resp:
        events, done = [], False
        async for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            events.append(json.loads(payload))
            if cancel and len(events) == CANCEL_AFTER:
                break  # leaving the block closes the connection: the server must abort the request
        return {"status": resp.status_code, "events": events, "done": done, "cancelled": cancel}


async def greedy_one_by_one(client, messages: list[str]) -> list[str]:
    out = []
    for m in messages:
        r = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": m}],
                                                 max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        out.append(r.choices[0].message.content)
    return out


async def poll_health(url: str, stop: asyncio.Event, seen: list[int]) -> None:
    loop = asyncio.get_running_loop()

    def get():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                return r.status
        except OSError as e:
            return getattr(e, "code", -1)
    while not stop.is_set():
        seen.append(await loop.run_in_executor(None, get))
        await asyncio.sleep(0.5)


def metrics(url: str) -> dict[str, float]:
    """vLLM's Prometheus gauges (first sample of each)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            values.setdefault(name, float(line.rsplit(" ", 1)[1]))
    return values


@pytest.mark.slow
def test_64_concurrent_streams_with_cancellations(checkpoint, tmp_path):
    import openai
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    rng = random.Random(0)
    load = prompts(tokenizer, CLIENTS, rng)
    probes = [p for p, _, _ in prompts(tokenizer, 8, random.Random(1))]
    args = ["--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "1400",
            "--max-num-seqs", str(CLIENTS), "--no-enable-prefix-caching", "--seed", "0",
            "--enable-log-requests"]  # its "Aborted request(s)" lines are what the test reads
    with serve(checkpoint, tmp_path / "server.log", *args, kv_cache_gib=2) as server:
        url = server["url"]
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=LOAD_TIMEOUT_S, max_retries=0)

        async def scenario():
            before = await greedy_one_by_one(client, probes)
            stop, health = asyncio.Event(), []
            poller = asyncio.create_task(poll_health(url, stop, health))
            results = await asyncio.wait_for(asyncio.gather(*[
                stream_chat(client, msg, n, s, cancel=i % CANCEL_EVERY == CANCEL_EVERY - 1)
                for i, (msg, n, s) in enumerate(load)]), LOAD_TIMEOUT_S)
            await asyncio.sleep(2)  # let the server notice the last disconnects
            stop.set()
            await poller
            after = await greedy_one_by_one(client, probes)
            return before, results, health, after

        before, results, health, after = asyncio.run(scenario())
        log = server["log"].read_text()
        gauges = metrics(url)

    cancelled = [r for r in results if r["cancelled"]]
    finished = [r for r in results if not r["cancelled"]]
    assert len(cancelled) == CLIENTS // CANCEL_EVERY and len(finished) == CLIENTS - len(cancelled)
    for r, (_, max_tokens, stop) in zip(results, load):
        assert r["status"] == 200
        if r["cancelled"]:
            assert len(r["events"]) == CANCEL_AFTER
            continue
        assert r["done"], "stream did not end with data: [DONE]"
        reasons = [c["choices"][0]["finish_reason"] for c in r["events"] if c.get("choices")]
        assert reasons[-1] in ("stop", "length") and all(x is None for x in reasons[:-1]), reasons
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in r["events"] if c.get("choices"))
        if stop and reasons[-1] == "stop":
            assert not any(s in text for s in stop), "a stop string reached the client"
    assert health and all(code == 200 for code in health), f"/health answered {sorted(set(health))}"
    aborted = sum(len(line.split("Aborted request(s)")[1].split(",")) for line in log.splitlines()
                  if "Aborted request(s)" in line)
    assert aborted >= len(cancelled), f"the log names {aborted} aborted requests, {len(cancelled)} were cancelled"
    assert gauges.get("vllm:num_requests_running", -1) == 0 and gauges.get("vllm:num_requests_waiting", -1) == 0
    assert gauges.get("vllm:kv_cache_usage_perc", -1) == 0, "KV cache still held after every request ended"
    assert after == before, "the same greedy requests answered differently after the load"
