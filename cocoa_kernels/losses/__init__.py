"""Fused masked-reconstruction loss: ``linear_cross_entropy(hidden, weight, labels)``."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._autocast import cast_to_autocast
from .._backend import choose_impl
from . import op

__all__ = ["linear_cross_entropy"]

_NAME = "linear_cross_entropy"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LABEL_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: int = 0,
    reduction: str = "mean",
    impl: str | None = None,
    grad_filter_eps: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Shapes:
        hidden: (T, H) or (B, N, H), fp32, fp16 or bf16 (the PyTorch path also takes float64).
        weight: (V, H), hidden's dtype; e.g. the LM head, or the tied input embedding.
        labels: hidden's leading shape, (T,) or (B, N), int64 or int32; each in [0, V) or
            ``ignore_index``.
        bias: (V,) in hidden's dtype, or None.
        Under ``torch.autocast`` for hidden's device type, hidden, weight and bias are first cast
        to the region's dtype (as ``F.linear`` does), so an fp32 master weight next to bf16
        hidden states is fine there and gets an fp32 gradient; outside autocast they must share
        one dtype.
        returns: a float32 scalar for "mean" and "sum", per-position float32 losses shaped like
            ``labels`` for "none" (float64 for float64 inputs).

    Contract:
        - Only the positions that count are computed: rows whose label is ``ignore_index`` are
          dropped (compacted on the device) before any matrix work, and the (tokens x V) logits
          never exist in memory: the forward keeps an online log-sum-exp over vocab tiles, the
          backward holds one bounded chunk of the logits' gradient at a time for its two GEMMs,
          its whole workspace within 64 MB on a GPU where the counted rows' fp32 d_hidden leaves
          room (``losses.workspace.backward_workspace_bytes``). Accumulation is fp32.
        - ``shift=k`` (needs (B, N, H)) scores the hidden state at position i of a row against the
          label at position i + k of the same row (``shift=1``: masked next-token prediction);
          the last k positions of every row score nothing. ``shift=0`` scores i against i.
        - "mean" divides by the number of labels that count (0.0 with zero gradients when none
          does, never NaN); "sum" adds them; "none" puts each label's loss at the label's own
          position (position i + k for the hidden state at i) and 0 where nothing is scored.
        - Differentiable in hidden, weight and bias; only the gradients autograd asks for are
          computed (a frozen LM head, as under LoRA, costs no d_weight). Gradients are bitwise
          deterministic.
        - ``grad_filter_eps``: None (the default) computes exact gradients. A float eps in [0, 1]
          lets the Triton backward skip every [rows x vocab] tile of the logits' gradient in which
          all entries of ``softmax - onehot(label)`` are below eps in magnitude (CCE's gradient
          filtering; the loss itself stays exact). Each dropped entry is below ``eps * g_i``
          (g_i: row i's upstream gradient, 1/count for "mean"), so with W, h the weight and the
          counted hidden rows: |change in d_hidden[i, k]| <= eps * g_i * sum_v |W[v, k]|,
          |change in d_weight[v, k]| <= eps * sum_i g_i |h[i, k]|, |change in d_bias[v]| <=
          eps * sum_i g_i (plus rounding). The PyTorch path ignores it (always exact).
        - ``impl``: None picks Triton for CUDA tensors and PyTorch otherwise; "triton" or "torch"
          forces one (see ``cocoa_kernels._backend``). Labels outside [0, V) that are not
          ``ignore_index`` raise a ValueError (this check syncs with the host once per call; the
          Triton backward syncs once more, for the number of counted rows that sizes its GEMMs).

    Example (LLM2Vec-style masked next-token prediction, 40% of the tokens masked)::

        labels = torch.where(is_masked, input_ids, -100)             # (B, N)
        loss = linear_cross_entropy(hidden, lm_head.weight, labels, shift=1)
    """
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    impl = choose_impl(_NAME, device, impl)
    # A matmul-like op: under torch.autocast, hidden/weight/bias meet in the region's dtype as
    # F.linear's do (fp32 accumulation all the same; see cocoa_kernels._autocast). An fp32
    # master weight then gets its gradient back in fp32 through the cast.
    hidden, weight, bias = cast_to_autocast(device, hidden, weight, bias)
    _check(hidden, weight, labels, bias, ignore_index, shift, reduction, impl)
    eps = _check_filter_eps(grad_filter_eps)
    shift = int(shift)
    targets = _shifted_targets(labels, shift, ignore_index)
    loss, _ = op.linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), int(ignore_index), impl, eps
    )
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        counted = (targets != ignore_index).sum()
        return loss.sum() / counted.clamp(min=1)
    return _at_label_positions(loss.view(labels.shape), shift)


def _shifted_targets(labels: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """The label each hidden position is scored against: labels[b, i + shift], or ignore_index
    past the end of the row. Tiny (labels-sized); computed on the device."""
    if shift == 0:
        return labels
    k = min(shift, labels.shape[1])
    return F.pad(labels[:, k:], (0, k), value=ignore_index)


def _at_label_positions(loss: torch.Tensor, shift: int) -> torch.Tensor:
    """Per-hidden-position losses (B, N) moved to the positions of the labels they score."""
    if shift == 0:
        return loss
    k = min(shift, loss.shape[1])
    return F.pad(loss[:, : loss.shape[1] - k], (k, 0))


def _check_filter_eps(eps) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{_NAME}: grad_filter_eps must be None or a float in [0, 1], got {eps!r}")
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(f"{_NAME}: grad_filter_eps must be in [0, 1] (a probability), got {eps}")
    return eps


def _check(hidden, weight, labels, bias, ignore_index, shift, reduction, impl) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_NAME}: bias must be a torch.Tensor or None, got {type(bias).__name__}")

    allowed = _DTYPES + ((torch.float64,) if impl == "torch" else ())
    if hidden.dtype not in allowed:
        raise TypeError(f"{_NAME}: hidden must be one of {allowed} with impl={impl!r}, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{_NAME}: {name} must have hidden's dtype {hidden.dtype}, got {t.dtype} (as for F.linear, "
                "hidden, weight and bias share one dtype: cast them, or call the loss under torch.autocast, "
                "which casts them to its dtype)"
            )
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{_NAME}: labels must be an integer tensor (int64 or int32), got {labels.dtype}")

    if hidden.dim() not in (2, 3):
        raise ValueError(f"{_NAME}: hidden must have shape (T, H) or (B, N, H), got {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if H == 0:
        raise ValueError(f"{_NAME}: hidden has an empty hidden dim, shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"{_NAME}: weight must have shape (V, H={H}) to match hidden, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"{_NAME}: weight has an empty vocab, shape {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{_NAME}: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{_NAME}: bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but hidden is on {hidden.device}")

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{_NAME}: ignore_index must be an int, got {ignore_index!r}")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Integral):
        raise TypeError(f"{_NAME}: shift must be a non-negative int, got {shift!r}")
    if shift < 0:
        raise ValueError(f"{_NAME}: shift must be >= 0, got {shift}")
    if shift and hidden.dim() != 3:
        raise ValueError(
            f"{_NAME}: shift={shift} needs hidden of shape (B, N, H) so that rows are known; "
            f"got (T, H) = {tuple(hidden.shape)} (shift the labels yourself, or pass shift=0)"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
