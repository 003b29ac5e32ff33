"""Shared fixtures: models made without any hub download, cached in $VLLM_GPTQ_CACHE across runs."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton's interpreter runs the Triton kernels where there is no GPU; it must be chosen before anything
# (torch.compile, vLLM) imports triton (kernels/triton_env.py explains why). A GPU run sets 0 or nothing.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CPU dispatch reads a table measured on this machine (kernels/cpu_dispatch.py) from the user's cache:
# tests see none (an empty folder of their own) unless they write one, so a developer's tuned table
# never changes which path a test expects.
import tempfile  # noqa: E402
os.environ["VLLM_GPTQ_CPU_TABLES"] = tempfile.mkdtemp(prefix="vllm-gptq-cpu-tables-")
CACHE = Path(os.environ.get("VLLM_GPTQ_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
MODEL_VERSION = "v1"  # bump when models.py changes how test models are built


def pytest_addoption(parser):
    parser.addoption("--run-opt-in", action="store_true", help="also run tests marked opt_in")


def pytest_collection_modifyitems(config, items):
    import torch
    if not torch.cuda.is_available():  # stated in the summary (-ra), never silent
        no_gpu = pytest.mark.skip(reason="opt-in by hardware: needs a CUDA GPU (scripts/gpu_check.sh runs these)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(no_gpu)
    if config.getoption("--run-opt-in") or os.environ.get("RUN_OPT_IN") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: pass --run-opt-in or RUN_OPT_IN=1")
    for item in items:
        if "opt_in" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from vllm_gptq_plugin.offline_quant import models
    return models.tiny_model("llama", CACHE / f"tiny-llama-{MODEL_VERSION}", cache=CACHE)


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    from vllm_gptq_plugin.offline_quant import models
    return models.tiny_model("qwen2", CACHE / f"tiny-qwen2-{MODEL_VERSION}", cache=CACHE)


@pytest.fixture(scope="session")
def tiny_arch():
    """tiny_arch(name) -> a tiny random model of one of models.TINY_CONFIGS, cached for the session."""
    from vllm_gptq_plugin.offline_quant import models
    return lambda arch: models.tiny_model(arch, CACHE / f"tiny-{arch}-{MODEL_VERSION}", cache=CACHE)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from vllm_gptq_plugin.offline_quant import models
    return models.fetch_smollm2(CACHE / "smollm2")
