"""Resolve MKL VML's kernel dispatch once, on one thread, before anything runs in parallel.

On CPU, PyTorch computes contiguous float32/float64 ``exp``, ``log``, ``sqrt``, ``tanh``, ... with
MKL's vector math library (VML), each intra-op thread calling it on its own chunk. oneMKL 2024.2
(the build in the torch wheels this project runs: 2.10-2.13) picks each VML function's kernel
lazily on its first call, and when that first call comes from several threads at once, one thread
can run a low-accuracy kernel for its whole chunk (errors of ~1,000-4,000 ulp; reported upstream
as pytorch/pytorch#188792). Later calls are exact, so the damage is one silent, unrepeatable
result per function and process: in this project, the first fp32 attention on the PyTorch path of
a busy process (``reference.attention_forward``'s ``torch.exp``) came out 100x less accurate than
PyTorch's own fp32 error, once in ~15 test runs under pytest-xdist.

Calling each function once on a one-element tensor (below ATen's parallel grain size, so on the
calling thread only) settles the dispatch before any concurrent call can race on it. That is what
importing ``cocoa_kernels`` does; it costs a few microseconds and changes no result.
"""

from __future__ import annotations

import torch

# The VML functions ATen calls (the vms*/vmd* symbols linked into libtorch_cpu), by torch op.
VML_OPS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2",
    "sin", "sqrt", "tan", "tanh", "trunc",
)


def warm_up() -> bool:
    """Call every VML-backed op once per VML precision (float32, float64) on one element.
    Returns False (and does nothing) when this torch build has no MKL."""
    if not torch.backends.mkl.is_available():
        return False
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(x)
    return True


WARMED = warm_up()
