#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite. On a machine without a GPU the Triton kernels
# run through Triton's CPU interpreter (TRITON_INTERPRET=1); with a GPU they run compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q "$@"
