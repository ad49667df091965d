"""How the public ops follow ``torch.autocast``, the way ``F.scaled_dot_product_attention`` and
``F.linear`` do (both are on autocast's lower-precision list for CPU and CUDA).

Inside an autocast region for the tensors' device type, the floating-point inputs of ``attention``
and ``linear_cross_entropy`` are cast to the region's dtype (bf16 or fp16) before the op runs:
fp32 q/k next to a bf16 v, or an fp32 master weight next to bf16 hidden states, then meet in one
compute dtype. float64 tensors and tensors on another device type are left alone, as autocast
leaves them. Outside autocast nothing is cast and mismatched dtypes stay a TypeError.

Why cast in the public functions rather than register an autocast kernel on the custom ops:
``torch.library.register_autocast`` casts to one dtype fixed at registration, so it cannot follow
a bf16 region and an fp16 region alike, and a hand-written Autocast-key kernel would be more code
for the same effect. A ``.to()`` in the public function is an ordinary autograd op, so gradients
reach the caller's fp32 tensors in fp32; ``torch.compile`` traces it (Dynamo reads the autocast
state, guards on it, and recompiles when it changes), so one code path serves eager, compiled,
CPU and CUDA.

The ops' own implementations then run with autocast switched off (``autocast_off``): they choose
their accumulation dtype themselves (fp32), and a matmul inside the PyTorch path or the loss's
backward GEMMs must not be recast to bf16 by an enclosing region.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmul-like ops in on ``device``'s type, or None outside an
    autocast region (or on a device type autocast does not support)."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast_to_autocast(device: torch.device, *tensors):
    """``tensors`` with every autocast-eligible one (a floating tensor of ``device``'s type, not
    float64) cast to the active autocast dtype; unchanged outside autocast. None and non-tensors
    pass through, so the ops' own validation still names them."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _eligible(t, device) else t for t in tensors)


def _eligible(t, device: torch.device) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device.type
    )


def autocast_off(device: torch.device):
    """A context in which no enclosing autocast region recasts the ops' internal arithmetic."""
    # Nothing to switch off outside a region (most calls): skip torch.autocast's enter/exit.
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
