"""The attention op as ``torch.library`` custom ops, with fake kernels and an autograd formula.

``cocoa::attention_fwd`` returns ``(out, lse)``; ``cocoa::attention_bwd`` returns
``(dq, dk, dv)`` from the saved tensors. ``lse`` is the forward's per-row log-sum-exp in the units
the same implementation's backward expects (log2 for Triton, natural log for PyTorch; float32,
float64 for float64 inputs on the PyTorch path); it never leaves this module. Both dispatch on
``impl`` ("triton" or "torch") to the launchers or to the PyTorch implementation, so
``torch.compile`` traces a model through the attention without graph breaks whichever
implementation runs underneath. The PyTorch implementation is ``cpu.py`` (PyTorch's fused CPU
flash kernel) for CPU tensors and ``reference.py`` (its readable specification, plain tensor ops)
for tensors on any other device; both follow one contract.
"""

import torch

from .._autocast import autocast_off
from . import cpu, reference
from .config import block_d_for, pick_config


def _torch_impl(q: torch.Tensor):
    """The PyTorch implementation for q's device: the CPU flash kernel only runs on the CPU."""
    return cpu if q.device.type == "cpu" else reference


@torch.library.custom_op("cocoa::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast_off(q.device):  # fp32 accumulation even inside an autocast region
        if impl == "triton":
            from .triton_fwd import attention_fwd as launch

            cfg = pick_config(block_d_for(q.shape[-1]), q.element_size(), on_gpu=q.is_cuda)
            return launch(q, k, v, lo, hi, scale, cfg.fwd)
        return _torch_impl(q).attention_forward(q, k, v, lo, hi, scale)


@attention_fwd.register_fake
def _(q, k, v, lo, hi, scale, impl):
    B, Hq, N, D = q.shape
    out = q.new_empty(B, N, Hq, D).transpose(1, 2)
    lse_dtype = reference.lse_dtype(q.dtype) if impl == "torch" else torch.float32
    return out, q.new_empty(B, Hq, N, dtype=lse_dtype)


@torch.library.custom_op("cocoa::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_off(q.device):  # a backward run inside an autocast region keeps fp32 accumulation
        if impl == "triton":
            from .triton_bwd import attention_bwd as launch

            cfg = pick_config(block_d_for(q.shape[-1]), q.element_size(), on_gpu=q.is_cuda)
            return launch(do, q, k, v, out, lse, lo, hi, scale, cfg)
        dq, dk, dv = _torch_impl(q).attention_backward(do, q, k, v, out, lse, lo, hi, scale)
    # Same layouts as the Triton path (and the fake kernel): gradients strided like inputs.
    return _strided_like(dq, q), _strided_like(dk, k), _strided_like(dv, v)


def _strided_like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``x``'s strides (``grad`` itself when it has them already: it is fresh)."""
    if grad.stride() == x.stride():
        return grad
    return torch.empty_like(x).copy_(grad)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, lo, hi, scale, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lo, hi)
    ctx.scale, ctx.impl = scale, impl
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, lo, hi = ctx.saved_tensors
    if d_out is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = attention_bwd(d_out, q, k, v, out, lse, lo, hi, ctx.scale, ctx.impl)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
