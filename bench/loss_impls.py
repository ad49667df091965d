"""One adapter per linear cross-entropy implementation: ``call(weight, x)`` -> mean loss over the
counted rows of ``x.hidden`` (T, H) against ``x.labels`` (T,) (-100 = not counted).

- ``cocoa``: ``cocoa_kernels.linear_cross_entropy`` (compacts the counted rows, no logits), exact
  gradients (``grad_filter_eps=None``, the default).
- ``cocoa_filtered``: the same with ``grad_filter_eps=2**-12`` (CCE's default threshold): vocab
  tiles of the backward whose every softmax - onehot entry is below it are skipped.
- ``torch_compact``: plain PyTorch that keeps only the counted rows first:
  ``hidden[labels != -100] @ W.T`` (bf16 logits of those rows), then ``F.cross_entropy`` on the
  logits upcast to fp32.
- ``torch_full``: plain PyTorch as transformers' causal-LM loss does it: logits of every row
  ``hidden @ W.T`` upcast to fp32, ``F.cross_entropy(..., ignore_index=-100)``.
- ``liger``: Liger Kernel's ``LigerFusedLinearCrossEntropyLoss(ignore_index=-100,
  reduction="mean")(W, hidden, labels)`` (chunked logits of every row; computes the gradients
  during the forward, so its fwd/bwd split is not comparable: compare fwd+bwd).
- ``cut_cross_entropy``: ``cut_cross_entropy.linear_cross_entropy(hidden, W, labels,
  ignore_index=-100, reduction="mean")`` with its defaults (impl "cce", gradient filtering on:
  vocab blocks whose softmax entries all fall below ~2^-12 skip the backward's products, an
  approximation that random weights, with their nearly flat softmax, make especially cheap).
- ``cut_cross_entropy_exact``: the same with ``filter_eps=None``, exact gradients like ours.
- ``torch_lce``: torch's own ``F.linear_cross_entropy(hidden, W, labels, ignore_index=-100,
  options=torch.nn.LinearCrossEntropyOptions())`` (torch >= 2.13): its chunked path, which never
  holds every row's logits (gradients computed during the forward).
- ``torch_lce_dense``: the same without ``options``: torch's reference path (full logits).

Which of our rows each peer is held to (``held_to`` in the row; the table's "vs" column): exact
against exact (``cocoa``: every peer but CCE's default), filtered against filtered
(``cocoa_filtered``: ``cut_cross_entropy`` with its default filtering).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .measure import Prepared, Unavailable
from .workloads import IGNORE_INDEX, LossInputs, LossWorkload


def _scalar(out) -> torch.Tensor:
    """The loss from whatever a peer returns: a tensor, a (loss, ...) tuple or an object with .loss."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError(f"cannot find the loss in a {type(out).__name__}")


def _require(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"not installed: {dist}")


def _require_cuda(device) -> None:
    if device.type != "cuda":
        raise Unavailable("needs CUDA: Triton kernels (smoke run on CPU)")


EXACT, FILTERED = "cocoa", "cocoa_filtered"  # our two rows: what each peer is held to
CCE_DEFAULT_FILTER_EPS = 2.0**-12


class CocoaLoss:
    name = EXACT
    ours = True
    held_to = EXACT
    grad_filter_eps: float | None = None

    def prepare(self, w: LossWorkload, device) -> Prepared:
        try:
            from cocoa_kernels import linear_cross_entropy
        except Exception as e:  # the loss is developed separately; rows say so until it lands
            raise Unavailable(f"not available: cocoa_kernels.linear_cross_entropy ({type(e).__name__}: {e})") from e
        from cocoa_kernels._backend import interpreting

        impl = "triton" if device.type == "cuda" or interpreting() else "torch"

        eps = self.grad_filter_eps

        def call(weight, x: LossInputs):
            return linear_cross_entropy(x.hidden, weight, x.labels, ignore_index=IGNORE_INDEX, impl=impl,
                                        grad_filter_eps=eps)

        return Prepared(call, info={"detail": f"cocoa_kernels.linear_cross_entropy(impl={impl!r}, "
                                              f"grad_filter_eps={eps!r})", "held_to": self.held_to})


class CocoaLossFiltered(CocoaLoss):
    name = FILTERED
    held_to = FILTERED
    grad_filter_eps = CCE_DEFAULT_FILTER_EPS


class TorchCompact:
    name = "torch_compact"
    ours = False
    held_to = EXACT

    def prepare(self, w: LossWorkload, device) -> Prepared:
        def call(weight, x: LossInputs):
            keep = x.labels != IGNORE_INDEX
            logits = x.hidden[keep] @ weight.T
            return F.cross_entropy(logits.float(), x.labels[keep])

        return Prepared(call, info={"detail": "hidden[labels != -100] @ W.T, then F.cross_entropy on fp32 logits "
                                              "(logits of the counted rows only)", "held_to": self.held_to})


class TorchFull:
    name = "torch_full"
    ours = False
    held_to = EXACT

    def prepare(self, w: LossWorkload, device) -> Prepared:
        def call(weight, x: LossInputs):
            logits = x.hidden @ weight.T
            return F.cross_entropy(logits.float(), x.labels, ignore_index=IGNORE_INDEX)

        return Prepared(call, info={"detail": "hidden @ W.T for every row, fp32 upcast, "
                                              "F.cross_entropy(ignore_index=-100) (transformers' default loss)",
                                    "held_to": self.held_to})


class Liger:
    name = "liger"
    ours = False
    held_to = EXACT

    def prepare(self, w: LossWorkload, device) -> Prepared:
        _require("liger_kernel", "liger-kernel")
        _require_cuda(device)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

        def call(weight, x: LossInputs):
            return _scalar(loss_fn(weight, x.hidden, x.labels))

        return Prepared(call, info={"detail": "LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction='mean')"
                                              "(W, hidden, labels); gradients computed in its forward",
                                    "held_to": self.held_to})


class CutCrossEntropy:
    name = "cut_cross_entropy"
    ours = False
    held_to = FILTERED
    options: dict = {}  # extra keywords for cut_cross_entropy.linear_cross_entropy
    detail = "default impl and filter_eps (gradient filtering on)"

    def prepare(self, w: LossWorkload, device) -> Prepared:
        _require("cut_cross_entropy", "cut-cross-entropy")
        _require_cuda(device)
        from cut_cross_entropy import linear_cross_entropy as cce

        options = dict(self.options)

        def call(weight, x: LossInputs):
            return _scalar(cce(x.hidden, weight, x.labels, ignore_index=IGNORE_INDEX, reduction="mean", **options))

        return Prepared(call, info={"detail": "cut_cross_entropy.linear_cross_entropy(hidden, W, labels, "
                                              f"ignore_index=-100, reduction='mean'), {self.detail}",
                                    "held_to": self.held_to})


class CutCrossEntropyExact(CutCrossEntropy):
    name = "cut_cross_entropy_exact"
    held_to = EXACT
    options = {"filter_eps": None}
    detail = "filter_eps=None (exact gradients, no filtering)"


class TorchLCE:
    """torch's own fused loss, ``F.linear_cross_entropy`` (torch >= 2.13); chunked with options."""

    name = "torch_lce"
    ours = False
    held_to = EXACT
    chunked = True

    def prepare(self, w: LossWorkload, device) -> Prepared:
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
        options = torch.nn.LinearCrossEntropyOptions() if self.chunked else None

        def call(weight, x: LossInputs):
            return F.linear_cross_entropy(x.hidden, weight, x.labels, ignore_index=IGNORE_INDEX, options=options)

        how = "options=LinearCrossEntropyOptions() (chunked)" if self.chunked else "options=None (full logits)"
        return Prepared(call, info={"detail": f"F.linear_cross_entropy(hidden, W, labels, ignore_index=-100, {how})",
                                    "held_to": self.held_to})


class TorchLCEDense(TorchLCE):
    name = "torch_lce_dense"
    chunked = False


IMPLS = {impl.name: impl for impl in (CocoaLoss(), CocoaLossFiltered(), TorchCompact(), TorchFull(), Liger(),
                                      CutCrossEntropy(), CutCrossEntropyExact(), TorchLCE(), TorchLCEDense())}
