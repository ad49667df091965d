"""How close two fp32 results must be when they are equal in exact arithmetic but summed in
another order: over other batch splits (gradient accumulation, gradient caching's chunks), other
rank counts (DDP, FSDP2 over gloo), or other packings of the same inputs.

Why a tolerance at the tensor's scale: each element of such a result (a weight's gradient, say)
is a sum over tokens, samples and ranks of terms as large as the tensor's largest entries. A sum
in another order rounds differently by up to ~eps32 x (terms) x (largest term), and that error
lands on every element, the small ones too (seen on an AMD EPYC: a v_proj gradient element of
1.3e-3 off by 2.3e-6, a relative 1.7e-3, failing rtol=1e-4/atol=1e-6 on every run; the same test
passed on an Intel Xeon). So an element-wise relative bound fails on some CPUs and not others,
while a bound relative to the tensor's largest entry does not, and still catches a real bug (a
lost rank, a wrong scale, a skipped micro-batch move elements by a share of that maximum).
"""

from __future__ import annotations

import torch

# |got - want| <= SCALE_RTOL * max|want| (+ SCALE_ATOL for an all-zero tensor), element-wise.
# Measured on an AMD EPYC (2026-12-08): the worst max|got - want| / max|want| over every comparison
# in test_distributed, test_grad_accum and test_model is 4.2e-6; 1e-4 leaves a margin of ~24x.
SCALE_RTOL = 1e-4
SCALE_ATOL = 1e-7


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """``got`` equals ``want`` up to fp32 summation order (see the module docstring)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    bound = SCALE_RTOL * float(want.abs().max()) + SCALE_ATOL
    err = float((got.double() - want.double()).abs().max())
    assert err <= bound, f"{msg}: max |got - want| = {err:.3g} > {bound:.3g} ({SCALE_RTOL:g} x max |want| + {SCALE_ATOL:g})"
