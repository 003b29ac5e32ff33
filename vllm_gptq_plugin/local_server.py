"""A real `vllm serve` subprocess on a free loopback port, started and stopped around a block of code:
what the serving tests and benchmarks/serving.py talk to over HTTP.

    with serve(checkpoint, log_path, "--dtype", "bfloat16") as server:
        ... server["url"] ...        # http://127.0.0.1:PORT, /health answered 200
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serve(path: Path, log: Path, *args: str, kv_cache_gib: int = 1, timeout: float = 300,
          quantization: str | None = "gptq-plugin", omp_bind: str = "0"):
    """`vllm serve PATH --quantization Q ARGS` on 127.0.0.1 (no --quantization when Q is None); yields
    {url, proc, log} once /health answers, and stops it (SIGTERM, then SIGKILL of its whole session) on
    the way out. omp_bind: VLLM_CPU_OMP_THREADS_BIND unless the environment sets it (one core by
    default: OpenMP threads spinning on busy cores make every GEMM erratic, see benchmarks/serving.py)."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's usual engine-core process
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_bind)
    vllm = Path(sys.executable).with_name("vllm")
    quant = ["--quantization", quantization] if quantization else []
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(vllm), "serve", str(path), *quant, "--host", "127.0.0.1", "--port", str(port), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its engine core
                proc.wait()
