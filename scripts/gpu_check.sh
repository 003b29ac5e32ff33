#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU, torch and Triton but no package
# registry (the dependencies it needs beyond those: safetensors, numpy, pytest, pytest-xdist):
#
#   bash scripts/gpu_check.sh OUT_DIR [STEPS]      STEPS: any of tests,tune,bench,quant (default: all but quant)
#
#   tests  the Triton kernel tests (every bits/group/act-order/dtype, bf16 included, the interpreter
#          off), the op-boundary tests (torch.compile, CUDA graphs) and the quantizer's device tests,
#          in parallel                                                        -> OUT_DIR/tests.log
#   tune   kernels/triton_tune.py for $TUNE_S seconds (default 240), merged into a copy of the shipped
#          table                                          -> OUT_DIR/triton_tiles.json, OUT_DIR/tune.log
#   bench  benchmarks/kernels.py --gpu with that table                       -> OUT_DIR/kernels_gpu.txt
#   quant  benchmarks/quant_gpu.py (the quantizer on an 8B-shaped model)     -> OUT_DIR/quant_gpu.txt
#
# Each step's log names the device. Commit what comes back: OUT_DIR/triton_tiles.json over
# kernels/triton_tiles.json, the logs under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [tests,tune,bench,quant]}
STEPS=${2:-tests,tune,bench}
mkdir -p "$OUT"
export TRITON_INTERPRET=${TRITON_INTERPRET:-0} PYTHONUNBUFFERED=1
PY=${PY:-python3}
has() { [[ ",$STEPS," == *",$1,"* ]]; }

# Install without dependencies; where pip cannot build, put the package on PYTHONPATH the way the
# installed layout has it (kernels/ and offline_quant/ inside vllm_gptq_plugin/).
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  site=$(mktemp -d)
  mkdir -p "$site/vllm_gptq_plugin"
  cp -r vllm_gptq_plugin/. "$site/vllm_gptq_plugin/"
  cp -r kernels "$site/vllm_gptq_plugin/kernels"
  cp -r offline_quant "$site/vllm_gptq_plugin/offline_quant"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed (see install.log): using a PYTHONPATH copy in $site" | tee -a "$OUT/install.log"
fi
TABLE_DIR=$($PY -c "import vllm_gptq_plugin.kernels.triton_tiles as t; print(t.TABLE.parent)")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
rc=0

if has tests; then
  par=(); [ "${JOBS:-8}" -gt 1 ] && par=(-n "${JOBS:-8}")  # pytest-xdist workers
  $PY -m pytest -q -ra "${par[@]}" -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_compile.py \
    tests/test_kernels_checks.py tests/test_format.py -m "not slow" 2>&1 | tee "$OUT/tests.log" || rc=1
  if ls tests/test_quantize_device*.py >/dev/null 2>&1; then
    $PY -m pytest -q -ra -p no:cacheprovider tests/test_quantize_device*.py 2>&1 | tee -a "$OUT/tests.log" || rc=1
  fi
fi
if has tune; then
  cp "$TABLE_DIR/triton_tiles.json" "$OUT/triton_tiles.json"
  $PY -m vllm_gptq_plugin.kernels.triton_tune --out "$OUT/triton_tiles.json" --budget-s "${TUNE_S:-240}" \
    2>&1 | tee "$OUT/tune.log" || rc=1
  cp "$OUT/triton_tiles.json" "$TABLE_DIR/triton_tiles.json"  # the benchmark below uses the new table
fi
if has bench; then
  $PY benchmarks/kernels.py --gpu 2>&1 | tee "$OUT/kernels_gpu.txt" || rc=1
fi
if has quant; then
  $PY benchmarks/quant_gpu.py 2>&1 | tee "$OUT/quant_gpu.txt" || rc=1
fi
exit $rc
