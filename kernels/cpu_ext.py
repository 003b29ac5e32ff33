"""The compiled CPU kernels (kernels/csrc/), built once per machine on first use.

cpu_dequant.cpp: the W^T tile dequantizer (torch ops alone need ~5 passes over a [K, N] buffer; this
does one). cpu_gemm_bf16.cpp: the fused bf16 dequant-GEMM (AVX512-BF16 machines only; has_gemm_bf16()
says whether it was compiled). Built with g++
through torch.utils.cpp_extension into torch's extension cache (-march=native: the cache is per
machine). `load()` returns None when it cannot build (no compiler, or VLLM_GPTQ_CPU_EXT=0) and the
callers fall back to torch ops: slower, same results up to rounding.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
NAME = "vllm_gptq_cpu_dequant"
SOURCES = [Path(__file__).with_name("csrc") / f for f in ("cpu_dequant.cpp", "cpu_gemm_bf16.cpp")]
# torch's builder holds a `lock` file in the build folder while it compiles, and a second process waits
# for it to vanish, for ever: a build killed halfway (Ctrl-C, an OOM kill, a stopped container) leaves
# it behind and every later start hangs. The build takes ~2.5 min on 2 cores; a lock this much older
# than that is from a build that is gone.
STALE_LOCK_S = 20 * 60


def clear_stale_lock(build_dir: Path, now: float | None = None) -> bool:
    """Remove build_dir/lock if it is older than STALE_LOCK_S (logged); True if it did."""
    import time
    lock = Path(build_dir) / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("vllm_gptq_plugin: removing %s, left %.0f min ago by a CPU extension build that did not finish "
                "(torch would wait for it for ever); building again", lock, age / 60)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def load():
    if os.environ.get("VLLM_GPTQ_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build
        clear_stale_lock(Path(_get_build_directory(NAME, verbose=False)))
        return build(name=NAME, sources=[str(p) for p in SOURCES],
                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                     verbose=False)
    except Exception as e:  # no g++/ninja, or headers missing: serve through torch ops instead
        log.warning("vllm_gptq_plugin: CPU dequant extension unavailable (%s); using torch ops", e)
        return None
