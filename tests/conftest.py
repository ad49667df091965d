"""Test set-up: Triton's CPU interpreter when there is no GPU, small pinned tiles, poisoned outputs.

TRITON_INTERPRET must be set before any kernel module is imported (Triton decides at decoration
time whether a @triton.jit function is compiled or interpreted), hence this happens at import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import numeric_state  # noqa: E402
from cocoa_kernels.attention import config as attn_config  # noqa: E402
from cocoa_kernels.attention import triton_bwd, triton_fwd  # noqa: E402
from cocoa_kernels.losses import triton_bwd as loss_triton_bwd  # noqa: E402
from cocoa_kernels.losses import triton_fwd as loss_triton_fwd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Interpreter runs pin small, mismatched tiles so that N ~ 100 has masked edges and partial last
# tiles in every kernel; the unmasked middles and trailing masked loops need the long_segments mask
# family (tests/test_attention_loop_coverage.py checks it). Compiled GPU runs test the shipped table.
SMALL_TILES = attn_config.AttentionConfig(
    fwd=attn_config.KernelConfig(32, 16),
    dq=attn_config.KernelConfig(16, 32),
    dkdv=attn_config.KernelConfig(16, 32),
)


@pytest.fixture(autouse=True)
def _pin_attention_tiles():
    if ON_GPU:
        yield
        return
    with attn_config.use_config(SMALL_TILES):
        yield


class _PoisonedTorch:
    """Stands in for ``torch`` inside the launchers: fresh float buffers come back NaN-filled,
    so an element a kernel forgets to write fails the comparison instead of passing as zero."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    poisoned = _PoisonedTorch()
    for module in (triton_fwd, triton_bwd, loss_triton_fwd, loss_triton_bwd):
        monkeypatch.setattr(module, "torch", poisoned)
    yield


@pytest.fixture(autouse=True)
def _numeric_state_is_restored():
    """Fail a test that leaves a process-wide numeric setting changed (matmul precision, threads,
    flush-to-zero, autocast, backend flags): later tests in the same worker would silently compute
    something else."""
    before = numeric_state.snapshot()
    yield
    changed = numeric_state.changes(before, numeric_state.snapshot())
    assert not changed, "the test left global numeric state changed: " + "; ".join(changed)
