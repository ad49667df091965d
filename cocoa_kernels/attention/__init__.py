"""Mask-aware flash attention: ``attention(q, k, v, mask)`` with a ``KeyRanges`` mask."""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .._autocast import cast_to_autocast
from .._backend import choose_impl
from ..mask import KeyRanges
from . import op

__all__ = ["attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: KeyRanges,
    *,
    scale: float | None = None,
    impl: str | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention in which query i of row b sees keys ``[lo[b,i], hi[b,i])``.

    Shapes:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with ``Hq % Hkv == 0`` (grouped-query attention
        without copying K/V). Any strides, e.g. the ``(B, N, H, D).transpose(1, 2)`` views that
        transformers passes. D up to 128 for Triton (64, 80, 96 and 128 are the tuned ones).
        mask: a :class:`KeyRanges` of shape (B, N) on the same device.
        returns: (B, Hq, N, D) in q's dtype, stored token-major so ``.transpose(1, 2)`` is free.

    Differentiable in q, k and v. fp32, fp16 and bf16 inputs, fp32 accumulation (the PyTorch
    path also takes float64). Under ``torch.autocast`` for the inputs' device type, q, k and v
    are first cast to the region's dtype (as ``F.scaled_dot_product_attention`` does), so mixed
    fp32/bf16 inputs are fine there and the output is in that dtype; outside autocast they must
    share one dtype. A query that sees no key outputs zeros and gets zero gradients.
    ``scale`` defaults to ``1 / sqrt(D)``. ``impl``: None picks Triton for CUDA tensors and
    PyTorch otherwise; "triton" or "torch" forces one (see ``cocoa_kernels._backend``).

    ``deterministic`` (a bool) picks the Triton backward. True (default): a dQ kernel and a
    dK/dV kernel, no atomics, gradients bitwise identical run to run; each kernel recomputes the
    probabilities and dP, 7 matrix products per (query tile, key tile). False: one kernel computes
    dQ, dK and dV together with 5 products (about 5/7 of the backward's matrix work), adding dQ
    atomically into an fp32 (B, Hq, N, D) buffer as FlashAttention-2 does (4 * B * Hq * N * D
    bytes more while the backward runs). The order of those adds varies, so dQ, and every gradient
    upstream of it, differs between identical runs in the last bits; dK and dV stay deterministic.
    The PyTorch implementation is deterministic and ignores the flag.

    Example (two samples packed in one row, bidirectional inside each)::

        seg = torch.tensor([[0, 0, 0, 1, 1, -1]])          # -1: padding
        out = attention(q, k, v, KeyRanges.from_segments(seg))
    """
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    impl = choose_impl("attention", device, impl)
    # Under torch.autocast, q/k/v meet in the region's dtype as F.scaled_dot_product_attention's
    # do (see cocoa_kernels._autocast); gradients flow back through the casts in each input's dtype.
    q, k, v = cast_to_autocast(device, q, k, v)
    scale = _check(q, k, v, mask, scale, impl)
    _check_deterministic(deterministic, impl)
    out, _ = op.attention(q, k, v, mask.lo, mask.effective_hi(), scale, impl, deterministic)
    return out


def _check_deterministic(deterministic, impl) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"attention: deterministic must be True or False, got {deterministic!r}")
    # As PyTorch's own nondeterministic ops do under torch.use_deterministic_algorithms(True):
    # an error (a warning with warn_only=True), never a silent switch to the other backward.
    if not deterministic and impl == "triton" and torch.are_deterministic_algorithms_enabled():
        message = ("attention: deterministic=False (atomic dQ accumulation) was asked for while "
                   "torch.use_deterministic_algorithms(True) is set; pass deterministic=True")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)


def _check(q, k, v, mask, scale, impl) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    allowed = _DTYPES + ((torch.float64,) if impl == "torch" else ())
    if q.dtype not in allowed:
        raise TypeError(f"attention: q must be one of {allowed} with impl={impl!r}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype} (q, k and v share one dtype: "
                "cast them, or call attention under torch.autocast, which casts them to its dtype)"
            )
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    B, Hq, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Nk, Dk = k.shape
    if (Bk, Nk, Dk) != (B, N, D):
        raise ValueError(
            f"attention: k must have shape (B={B}, Hkv, N={N}, D={D}) to match q, got {tuple(k.shape)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if B == 0 or N == 0 or D == 0 or Hq == 0:
        raise ValueError(f"attention: empty input, q has shape {tuple(q.shape)}")
    if impl == "triton" and D > _TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"attention: head dim {D} is above the Triton kernels' {_TRITON_MAX_HEAD_DIM}; use impl='torch'"
        )
    if not isinstance(mask, KeyRanges):
        raise TypeError(f"attention: mask must be a cocoa_kernels.KeyRanges, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"attention: mask has shape {tuple(mask.shape)}, expected (B, N) = {(B, N)}")
    if mask.device != q.device:
        raise ValueError(f"attention: mask is on {mask.device} but q is on {q.device}; use mask.to(q.device)")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention: scale must be a positive finite number or None, got {scale!r}")
    return float(scale)
