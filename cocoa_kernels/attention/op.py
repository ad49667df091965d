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

``deterministic`` (an op argument, so ``torch.compile`` sees it) picks the Triton backward
(``triton_bwd``): two kernels (True) or one with atomic dQ (False). The PyTorch implementation
is deterministic either way and ignores it. The Triton forward is ``triton_fwd_tma`` (tensor
descriptors) on Hopper where it takes the inputs, else the pointer ``triton_fwd``
(:func:`_triton_forward`).

:func:`attention` is the entry point: in eager mode it runs the same forward and backward through
a plain ``torch.autograd.Function``, whose dispatch costs about 0.2 ms less host time per
forward + backward than the custom op's (measured on the CPU; 2-4% of a call at the demo's tiny
shapes); under ``torch.compile`` (and on the meta device) it calls the custom op.
"""

import torch

from .._autocast import autocast_off
from . import autotune, cpu, reference
from .config import block_d_for, check_warp_specialised_pass, current_forward_path, pick_config, tma_ws_config


def _torch_impl(q: torch.Tensor):
    """The PyTorch implementation for q's device: the CPU flash kernel only runs on the CPU."""
    return cpu if q.device.type == "cpu" else reference


def _forward(q, k, v, lo, hi, scale: float, impl: str):
    """(out, lse) of the implementation ``impl``: what both entry points run."""
    with autocast_off(q.device):  # fp32 accumulation even inside an autocast region
        if impl == "triton":
            return _triton_forward(q, k, v, lo, hi, scale)
        return _torch_impl(q).attention_forward(q, k, v, lo, hi, scale)


def _triton_forward(q, k, v, lo, hi, scale: float):
    """The TMA forward where it applies (``triton_fwd_tma.tma_forward_tiles``: a Hopper GPU,
    16-bit inputs with strides a tensor descriptor takes, a grid long enough to run unsplit; in
    two passes, ``triton_fwd_ws``, under ``config.forward_path("tma_ws")``), else
    the pointer forward, with the autotuned tiles when tuning is on (the TMA forward keeps its
    table)."""
    from . import triton_fwd, triton_fwd_tma

    tiles = triton_fwd_tma.tma_forward_tiles(q, k, v, lo)
    if tiles is not None:
        if current_forward_path() == "tma_ws":  # opt-in: full tiles warp-specialised, then the edges
            from .triton_fwd_ws import attention_fwd_tma_ws

            if q.is_cuda:
                check_warp_specialised_pass()

            full_tiles = tma_ws_config(block_d_for(q.shape[-1]), on_gpu=True)
            return attention_fwd_tma_ws(q, k, v, lo, hi, scale, tiles, full_tiles)
        return triton_fwd_tma.attention_fwd_tma(q, k, v, lo, hi, scale, tiles)
    cfg = pick_config(block_d_for(q.shape[-1]), q.element_size(), on_gpu=q.is_cuda)
    cfg = autotune.tuned_forward(cfg, q, k, v, lo, hi, scale)
    return triton_fwd.attention_fwd(q, k, v, lo, hi, scale, cfg.fwd)


def _backward(do, q, k, v, out, lse, lo, hi, scale: float, impl: str, deterministic: bool):
    """(dq, dk, dv), each strided like its input."""
    with autocast_off(q.device):  # a backward run inside an autocast region keeps fp32 accumulation
        if impl == "triton":
            from .triton_bwd import attention_bwd as launch

            cfg = pick_config(block_d_for(q.shape[-1]), q.element_size(), on_gpu=q.is_cuda)
            if deterministic:  # the fused (non-deterministic) backward keeps its table
                cfg = autotune.tuned_backward(cfg, do, q, k, v, out, lse, lo, hi, scale)
            return launch(do, q, k, v, out, lse, lo, hi, scale, cfg, deterministic)
        dq, dk, dv = _torch_impl(q).attention_backward(do, q, k, v, out, lse, lo, hi, scale)
    # Same layouts as the Triton path (and the fake kernel): gradients strided like inputs.
    return _strided_like(dq, q), _strided_like(dk, k), _strided_like(dv, v)


def _strided_like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``x``'s strides (``grad`` itself when it has them already: it is fresh)."""
    if grad.stride() == x.stride():
        return grad
    return torch.empty_like(x).copy_(grad)


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("cocoa::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float, impl: str,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, lo, hi, scale, impl)


@attention_fwd.register_fake
def _(q, k, v, lo, hi, scale, impl, deterministic=True):
    B, Hq, N, D = q.shape
    out = q.new_empty(B, N, Hq, D).transpose(1, 2)
    if impl == "torch":  # token-major, the CPU flash kernel's own layout (reference.py follows it)
        return out, q.new_empty(B, N, Hq, dtype=reference.lse_dtype(q.dtype)).transpose(1, 2)
    return out, q.new_empty(B, Hq, N, dtype=torch.float32)


@torch.library.custom_op("cocoa::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, scale: float, impl: str, deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, lo, hi, scale, impl, deterministic)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, lo, hi, scale, impl, deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, scale, impl, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lo, hi)
    ctx.scale, ctx.impl, ctx.deterministic = scale, impl, deterministic
    ctx.mark_non_differentiable(lse)


def _input_grads(ctx, d_out, backward):
    """The gradients of the 8 inputs from ``backward`` (the custom op or :func:`_backward`) on the
    saved tensors: q, k and v's, None for the rest."""
    q, k, v, out, lse, lo, hi = ctx.saved_tensors
    if d_out is None:
        return None, None, None, None, None, None, None, None
    dq, dk, dv = backward(d_out, q, k, v, out, lse, lo, hi, ctx.scale, ctx.impl, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None


def _custom_op_backward(ctx, d_out, d_lse):
    return _input_grads(ctx, d_out, attention_bwd)


attention_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- eager entry point
class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op dispatch (eager mode only)."""

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, scale, impl, deterministic):
        out, lse = _forward(q, k, v, lo, hi, scale, impl)
        _setup_context(ctx, (q, k, v, lo, hi, scale, impl, deterministic), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return _input_grads(ctx, d_out, _backward)


def attention(q, k, v, lo, hi, scale: float, impl: str, deterministic: bool = True):
    """(out, lse), differentiable in q, k and v: the custom op while ``torch.compile`` traces (or
    on the meta device, where only its fake kernel runs), else the same code eagerly."""
    if torch.compiler.is_compiling() or q.device.type == "meta":
        return attention_fwd(q, k, v, lo, hi, scale, impl, deterministic)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _forward(q, k, v, lo, hi, scale, impl)  # inference: no graph to record
    return _EagerAttention.apply(q, k, v, lo, hi, scale, impl, deterministic)
