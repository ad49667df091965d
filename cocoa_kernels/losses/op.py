"""The loss as ``torch.library`` custom ops, with fake kernels and an autograd formula.

``cocoa::linear_cross_entropy_fwd`` returns ``(loss, lse)`` per row of a (T, H) hidden: the
cross-entropy of each row whose target is not ``ignore_index`` (0 on the others) and the
log-sum-exp in the units the same implementation's backward expects (log2 for Triton, natural log
for PyTorch; it never leaves this module). ``cocoa::linear_cross_entropy_bwd`` returns
``(d_hidden, d_weight, d_bias)`` for an upstream gradient per row, computing only those autograd
asks for (a frozen LM head under LoRA costs no d_weight GEMM and no (V, H) buffer); a gradient
not asked for, and ``d_bias`` without a bias, is an empty tensor. Both compact the counted rows
themselves and dispatch on ``impl`` ("triton" or "torch"), so ``torch.compile`` traces through
the loss without graph breaks whichever runs underneath. ``grad_filter_eps`` rides along the
forward (which ignores it) to its backward; only the Triton backward filters, the PyTorch one is
always exact.
"""

from typing import Optional

import torch

from .._autocast import autocast_off
from .._backend import choose_impl
from . import reference
from .config import pick_config


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Labels outside [0, V) that are not ``ignore_index``: a ValueError. Validation, so it may
    (and does) sync with the host once per call; the same sync brings back the number of
    counted rows, which sizes the Triton forward's grid. Returns that number."""
    counted = targets != ignore_index
    bad = ((targets < 0) | (targets >= vocab)) & counted
    n_bad, n_counted = torch.stack([bad.sum(), counted.sum()]).tolist()
    if n_bad:
        found = targets[bad][:5].tolist()
        raise ValueError(
            f"linear_cross_entropy: labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"found {found}"
        )
    return int(n_counted)


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("cocoa::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ignore_index: int, impl: str, grad_filter_eps: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_counted = _check_targets(targets, weight.shape[0], ignore_index)
    with autocast_off(hidden.device):  # fp32 logits even inside an autocast region
        if impl == "triton":
            from .triton_fwd import lce_fwd

            choose_impl("linear_cross_entropy", hidden.device, impl)  # interpreter bf16 fix on CPU
            cfg = pick_config(hidden.is_cuda, hidden.dtype)
            return lce_fwd(hidden, weight, bias, targets, ignore_index, cfg, n_counted)
        return reference.lce_forward(hidden, weight, bias, targets, ignore_index)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, impl, grad_filter_eps=None):
    T = hidden.shape[0]
    dtype = _loss_dtype(hidden)
    return hidden.new_empty(T, dtype=dtype), hidden.new_empty(T, dtype=dtype)


@torch.library.custom_op("cocoa::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    d_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    targets: torch.Tensor, lse: torch.Tensor, ignore_index: int, impl: str,
    hidden_grad: bool = True, weight_grad: bool = True, bias_grad: bool = True,
    grad_filter_eps: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wanted = (hidden_grad, weight_grad, bias_grad and bias is not None)
    with autocast_off(hidden.device):  # the GEMMs keep fp32 accumulation inside an autocast region
        if impl == "triton":
            from .triton_bwd import lce_bwd

            choose_impl("linear_cross_entropy", hidden.device, impl)
            cfg = pick_config(hidden.is_cuda, hidden.dtype)
            return lce_bwd(d_loss, hidden, weight, bias, targets, lse, ignore_index, cfg, wanted, grad_filter_eps)
        return reference.lce_backward(d_loss, hidden, weight, bias, targets, lse, ignore_index, wanted)


@linear_cross_entropy_bwd.register_fake
def _(d_loss, hidden, weight, bias, targets, lse, ignore_index, impl, hidden_grad=True, weight_grad=True,
      bias_grad=True, grad_filter_eps=None):
    T, H = hidden.shape
    V = weight.shape[0]
    return (hidden.new_empty(T, H) if hidden_grad else hidden.new_empty(0),
            weight.new_empty(V, H) if weight_grad else weight.new_empty(0),
            hidden.new_empty(V if bias is not None and bias_grad else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, impl, grad_filter_eps = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.ignore_index, ctx.impl, ctx.grad_filter_eps = ignore_index, impl, grad_filter_eps
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_loss, d_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if d_loss is None or not any(needs):
        return None, None, None, None, None, None, None
    d_hidden, d_weight, d_bias = linear_cross_entropy_bwd(
        d_loss, hidden, weight, bias, targets, lse, ctx.ignore_index, ctx.impl, *needs,
        grad_filter_eps=ctx.grad_filter_eps,
    )
    return (d_hidden if needs[0] else None, d_weight if needs[1] else None,
            d_bias if needs[2] and bias is not None else None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
