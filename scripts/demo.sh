#!/usr/bin/env bash
# The main job: quantize the shipped SmolLM2-135M-Instruct with GPTQ and generate with it through vLLM
# and the gptq-plugin quantization. Every step is skipped when its output already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_GPTQ_CACHE=${VLLM_GPTQ_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
OUT=${OUT:-out}
FP=$OUT/smollm2
Q=$OUT/smollm2-gptq-4bit-g64
BIN=.venv/bin
$BIN/vllm-gptq fetch-model smollm2 --out "$FP"
# 32 calibration windows keep the demo to minutes on a laptop CPU (the default, 128, is better).
# Rerunning resumes an interrupted quantization; a finished one is kept.
[ -d "$Q" ] || $BIN/vllm-gptq quantize --model "$FP" --out "$Q" --bits 4 --group-size 64 --act-order --nsamples 32 --seqlen 512
$BIN/vllm-gptq inspect "$Q"
$BIN/vllm-gptq generate "$Q" --max-tokens 48 --dtype bfloat16 \
  --prompt "What is the capital of France?" --prompt "Write a haiku about the sea." --chat
