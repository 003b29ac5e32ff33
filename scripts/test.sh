#!/usr/bin/env bash
# Runs the whole test suite in .venv. pytest's exit 5 ("no tests collected") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_GPTQ_CACHE=${VLLM_GPTQ_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
