"""A real `vllm serve CKPT --quantization gptq-plugin` subprocess on a free loopback port: /health,
/v1/completions and /v1/chat/completions (streaming and not) through the openai client and plain HTTP,
16 concurrent requests with exact lengths, then a clean stop. Greedy completions are checked against
the pure-torch reference (decoded text), not just "it produced text"."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import urllib.request

import pytest

from test_vllm_generate import checkpoint, reference_greedy
from vllm_gptq_plugin.local_server import serve

MODEL_NAME = "tiny-gptq"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = checkpoint("sym4")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(path, log, "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "256", "--max-num-seqs", "16", "--seed", "0") as s:
        yield dict(s, path=path)


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(server):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(server["path"])


def expected_text(server, tokenizer, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    [(tokens, _)] = reference_greedy(server["path"], [prompt_ids], max_tokens)
    return tokenizer.decode(tokens)


def test_completions_match_reference_streaming_and_not(server, client, tokenizer):
    prompt = "The capital of France is"
    want = expected_text(server, tokenizer, tokenizer(prompt).input_ids)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == MAX_TOKENS
    chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_chat_completions_match_reference_streaming_and_not(server, client, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    want = expected_text(server, tokenizer, list(prompt_ids))
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == MAX_TOKENS
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_plain_http_completion(server, tokenizer):
    """What the README's curl example sends."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "Hello, my name is", "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{server['url']}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    assert out["choices"][0]["text"] == expected_text(server, tokenizer, tokenizer("Hello, my name is").input_ids)


def test_16_concurrent_requests(server, client):
    prompts = [f"Request number {i} says" for i in range(16)]
    lengths = [4 + i % 8 for i in range(16)]

    def one(i):
        return client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0, extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [r.usage.completion_tokens for r in results] == lengths
    # Batched with 15 others, each greedy answer is still what it is alone.
    alone = one(5)
    assert alone.choices[0].text == results[5].choices[0].text


def test_server_stops_cleanly(server):
    """Runs last in this file (pytest keeps file order): SIGTERM, exit within 60 s, port released."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc in (0, -signal.SIGTERM), server["log"].read_text()[-3000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server['url']}/health", timeout=2)
