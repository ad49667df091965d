#!/usr/bin/env bash
# Creates ./.venv (once) with torch, triton and this package installed in editable mode.
# torch goes in first: a bare `torch` requirement on an empty environment pulls a multi-GB CUDA
# build. TORCH_SPEC overrides the pin (the default is the CPU build that lies on this project's
# CI machines; anywhere else any torch >= 2.4 will do).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,transformers,lora}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[${EXTRAS}]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, triton; print('setup: torch', torch.__version__, '| triton', triton.__version__)"
