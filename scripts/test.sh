#!/usr/bin/env bash
# Sets up the environments and runs the test suite on two stacks (scripts/setup.sh):
#   pinned: the whole suite on the GPU machine's triton and transformers;
#   newest: the whole suite again (every test file imports triton or transformers through the
#     package) on the newest releases on PyPI.
# LEGS="pinned" (or "newest") runs one leg; arguments go to pytest in each leg. On a machine
# without a GPU the Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1);
# with a GPU they run compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
LEGS=${LEGS:-pinned newest}
for leg in $LEGS; do
    STACK=$leg bash scripts/setup.sh
    venv=$([ "$leg" = pinned ] && echo .venv || echo .venv-newest)
    if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        export TRITON_INTERPRET=1
    fi
    echo "== leg: $leg"
    "$venv/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" -q "$@"
done
