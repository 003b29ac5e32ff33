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
SOURCES = [Path(__file__).with_name("csrc") / f for f in ("cpu_dequant.cpp", "cpu_gemm_bf16.cpp")]


@functools.cache
def load():
    if os.environ.get("VLLM_GPTQ_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build
        return build(name="vllm_gptq_cpu_dequant", sources=[str(p) for p in SOURCES],
                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                     verbose=False)
    except Exception as e:  # no g++/ninja, or headers missing: serve through torch ops instead
        log.warning("vllm_gptq_plugin: CPU dequant extension unavailable (%s); using torch ops", e)
        return None
