"""Every 16-bit kernel configuration we ship, compiled for Hopper (sm_90a) here, without a GPU:
no register spills, shared memory within the SM's, tensor-core (wgmma) dots and asynchronous
copies. The fp32 configs are the checking path and do spill; ``python tests/sm90_compile.py``
prints them too. Each case compiles in a child process without ``TRITON_INTERPRET``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm90_compile import PTXAS, SHARED_LIMIT, all_cases

CASES = [c.name for c in all_cases("bf16")]
SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.mark.skipif(not PTXAS.exists(), reason="the triton wheel has no ptxas for this platform")
@pytest.mark.parametrize("name", CASES, ids=[n.split(" (")[0].replace(" ", "-") for n in CASES])
def test_compiles_for_sm90_without_spills(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", name], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    row = f"{name}: {report}"
    assert report["spill_bytes"] == 0, row
    assert report["shared_bytes"] <= SHARED_LIMIT, row
    assert report["wgmma"] > 0, f"no tensor-core dot: {row}"
    assert report["cp_async"] > 0, f"no asynchronous copies: {row}"
