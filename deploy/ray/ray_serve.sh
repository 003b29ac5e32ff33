#!/usr/bin/env bash
# Multi-node vLLM with the gptq-plugin quantization over a Ray cluster. Run on every node, in the
# image of deploy/cpu or deploy/cuda (or any environment with this package + vLLM + ray installed),
# with the checkpoint at the same path on every node:
#   head node:     deploy/ray/ray_serve.sh head                    # ray start --head on port 6379
#   other nodes:   deploy/ray/ray_serve.sh worker HEAD_IP:6379     # ray start --address
#   head node:     MODEL=/models/q4 TP=2 PP=2 deploy/ray/ray_serve.sh serve [extra vllm serve args]
# TP x PP must equal the number of GPUs (CPU: worker processes) the cluster offers to vLLM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
RAY_PORT=${RAY_PORT:-6379}

case "${1:-}" in
  head)
    exec ray start --head --port="$RAY_PORT" --dashboard-host=0.0.0.0 --block ;;
  worker)
    [ -n "${2:-}" ] || { echo "ray_serve.sh: error: worker needs the head's address: worker HEAD_IP:$RAY_PORT" >&2; exit 2; }
    exec ray start --address="$2" --block ;;
  serve)
    shift
    ray status >/dev/null 2>&1 || { echo "ray_serve.sh: error: no Ray cluster here: run 'ray_serve.sh head' on this node first" >&2; exit 2; }
    exec bash "$here/../entrypoint.sh" --distributed-executor-backend ray \
      --tensor-parallel-size "${TP:-1}" --pipeline-parallel-size "${PP:-1}" "$@" ;;
  *)
    echo "usage: ray_serve.sh head | worker HEAD_IP:$RAY_PORT | serve [vllm serve args]" >&2; exit 2 ;;
esac
