"""The compiled CPU dequantizer (kernels/csrc/cpu_dequant.cpp), built once per machine on first use.

torch ops alone need ~5 passes over a [K, N] buffer to dequantize; this does one, vectorized, so the
large-M path (dequantize + one dense GEMM) costs little more than the dense GEMM. Built with g++
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
SOURCE = Path(__file__).with_name("csrc") / "cpu_dequant.cpp"


@functools.cache
def load():
    if os.environ.get("VLLM_GPTQ_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build
        return build(name="vllm_gptq_cpu_dequant", sources=[str(SOURCE)],
                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                     verbose=False)
    except Exception as e:  # no g++/ninja, or headers missing: serve through torch ops instead
        log.warning("vllm_gptq_plugin: CPU dequant extension unavailable (%s); using torch ops", e)
        return None
