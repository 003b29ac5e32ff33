#!/usr/bin/env bash
# Container entrypoint (CPU and CUDA images): serve one GPTQ checkpoint with vLLM and the gptq-plugin
# quantization on an OpenAI-compatible port.
#
#   MODEL=/models/smollm2-gptq-4b [PORT=8000] [HOST=0.0.0.0] entrypoint.sh [extra vllm serve args...]
#   entrypoint.sh /models/smollm2-gptq-4b [extra vllm serve args...]      # MODEL as the first argument
#
# MODEL must be a folder inside the container (mount the checkpoint there). Everything after it is
# passed to `vllm serve` unchanged (e.g. --served-model-name, --max-model-len, --tensor-parallel-size).
# QUANTIZATION overrides gptq-plugin (e.g. QUANTIZATION=none for an fp model); VLLM_BIN the vllm command.
set -euo pipefail

die() { echo "entrypoint: error: $*" >&2; exit 2; }

MODEL=${MODEL:-}
if [ -z "$MODEL" ] && [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  MODEL=$1
  shift
fi
[ -n "$MODEL" ] || die "no model given: set MODEL=/path/in/container (a checkpoint folder written by \
\`vllm-gptq quantize\`, mounted into the container, e.g. docker run -v \$PWD/out/q4:/models/q4:ro \
-e MODEL=/models/q4 ...) or pass the folder as the first argument"
[ -d "$MODEL" ] || die "MODEL=$MODEL is not a folder inside the container: mount the checkpoint \
there (docker -v HOST_DIR:$MODEL, the compose volume, or the Kubernetes volumeMount)"
[ -f "$MODEL/config.json" ] || die "MODEL=$MODEL has no config.json: point MODEL at the checkpoint \
folder itself (the one holding config.json and model.safetensors), not its parent"

QUANTIZATION=${QUANTIZATION:-gptq-plugin}
quant_args=(--quantization "$QUANTIZATION")
[ "$QUANTIZATION" != none ] || quant_args=()

# exec: vllm replaces this shell (PID 1 in a container), so docker stop's / Kubernetes' SIGTERM reaches it.
exec "${VLLM_BIN:-vllm}" serve "$MODEL" "${quant_args[@]}" --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
