#!/usr/bin/env bash
# Creates a virtual environment (once) with torch, triton and this package installed in editable
# mode, on one of two stacks:
#   STACK=pinned (default): ./.venv, pinned by scripts/constraints.txt to the GPU machine's
#     triton and transformers (the releases the kernels meet there).
#   STACK=newest: ./.venv-newest, the newest triton, transformers, numpy and every other
#     dependency on PyPI at the time it runs (what a user installing today gets); upgraded on
#     every run, so CI meets each new release the day it appears.
# torch goes in first: a bare `torch` requirement on an empty environment pulls a multi-GB CUDA
# build. TORCH_SPEC overrides the pin (the default is the CPU build that lies on this project's
# CI machines, also for the newest stack: the newer torch releases on PyPI are CUDA builds; anywhere
# else any torch >= 2.11 will do).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STACK=${STACK:-pinned}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,transformers,lora}
case "$STACK" in
    pinned) VENV=${VENV:-.venv}; REQS=(-c scripts/constraints.txt) ;;
    # torch named with its pin: an eager upgrade would swap the CPU build for a newer CUDA one
    newest) VENV=${VENV:-.venv-newest}; REQS=(--upgrade --upgrade-strategy eager triton transformers numpy "$TORCH_SPEC") ;;
    *) echo "setup.sh: STACK must be pinned or newest, got '$STACK'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
fi
"$VENV/bin/python" -m pip install -q "${REQS[@]}" -e ".[${EXTRAS}]" 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import importlib.metadata as m; print('setup ($STACK, $VENV):', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'triton', 'transformers', 'numpy', 'accelerate', 'peft')))"
