#!/usr/bin/env bash
# Creates the virtual environment of one peer GPTQ quantizer, used only by the benchmarks in this
# folder (never a dependency of vllm-gptq-plugin):
#   bash benchmarks/peers/setup.sh llmcompressor   -> .cache/peers/llmcompressor-venv
#   bash benchmarks/peers/setup.sh gptqmodel       -> .cache/peers/gptqmodel-venv
# Idempotent: when the venv already imports the pinned peer with a CPU torch (and this script is
# unchanged, see the stamp), it does nothing.
set -euo pipefail
PEER=${1:?usage: setup.sh llmcompressor|gptqmodel}
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${PEER_VENV:-$ROOT/.cache/peers/$PEER-venv}
PY=$VENV/bin/python
STAMP=$VENV/.peer-setup-stamp

# The CPU wheel of torch 2.13.0 (the same torch as our own .venv, scripts/setup.sh). Every install
# below is constrained to it: a peer that asks for another torch must not pull a multi-GB CUDA build.
TORCH_PIN="torch==2.13.0"
case "$PEER" in
  # 0.14 is the release tried on this machine (CPU, fp32, static act-order); it accepts torch 2.13
  # (no torch pin of its own beyond a lower bound) and brings compressed-tensors 0.19 + transformers 5.17.
  llmcompressor) PIN="llmcompressor==0.14.0.1"; MOD=llmcompressor ;;
  # 7.7.0 declares torch>=2.14.1, and the only 2.14.1 wheel reachable here is the CUDA build. Its
  # Python code runs on torch 2.13 (no runtime check outside the CUDA-only kernels), so it is
  # installed with --no-deps and its declared requirements are then installed minus torch/triton
  # (triton is a GPU compiler). It is a pure-Python sdist: its kernels are compiled just in time,
  # nothing is built at install (so no BUILD_CUDA_EXT or --no-build-isolation is needed).
  gptqmodel) PIN="gptqmodel==7.7.0"; MOD=gptqmodel ;;
  *) echo "setup.sh: unknown peer '$PEER' (llmcompressor|gptqmodel)" >&2; exit 2 ;;
esac

want=$(cat "$0" | sha1sum | cut -c1-16)
check() {
  "$PY" - "$MOD" "${PIN#*==}" <<'PYEOF'
import importlib.metadata as md, sys, torch
mod, ver = sys.argv[1], sys.argv[2]
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
assert md.version(mod) == ver, (mod, md.version(mod), ver)
PYEOF
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && check 2>/dev/null; then
  echo "setup.sh: $PEER venv ready ($VENV)"; exit 0
fi

[ -x "$PY" ] || { mkdir -p "$(dirname "$VENV")"; python3 -m venv "$VENV"; }
# The machine's pip config names local indexes that may be absent: drop those warnings, keep errors.
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
CONSTRAINTS=$VENV/peer-constraints.txt
echo "$TORCH_PIN" >"$CONSTRAINTS"
# torch first, pinned: pip takes the local CPU wheel (2.13.0+cpu sorts above a plain 2.13.0).
pip install "$TORCH_PIN"
"$PY" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>/dev/null \
  || { echo "setup.sh: torch in $VENV is a CUDA build; remove the venv and check pip's sources" >&2; exit 1; }

case "$PEER" in
  llmcompressor)
    pip install -c "$CONSTRAINTS" "$PIN"
    ;;
  gptqmodel)
    pip install --no-deps "$PIN"
    # Its own requirements, read back from the installed metadata, without torch and triton.
    mapfile -t reqs < <("$PY" - <<'PYEOF'
import importlib.metadata as md, re
for r in md.requires("gptqmodel") or []:
    if "extra ==" in r:
        continue
    name = re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()
    if name in ("torch", "triton"):
        continue
    print(r)
PYEOF
)
    pip install -c "$CONSTRAINTS" "${reqs[@]}"
    ;;
esac
# PyPI's torchvision/torchaudio (if some dependency pulled one) do not match the CPU torch and break
# transformers imports.
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
check
echo "$want" >"$STAMP"
echo "setup.sh: $PEER venv ready ($VENV): $("$PY" -c "import importlib.metadata as m, torch; print('$MOD', m.version('$MOD'), 'torch', torch.__version__)")"
