"""Inputs and the float64 truth shared by the linear cross-entropy tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def make_inputs(lead, H, V, dtype, device, seed=0, ignore_frac=0.5, bias=True, label_dtype=torch.int64):
    """hidden (*lead, H), weight (V, H), bias (V,) or None, labels (*lead) with ~ignore_frac of
    them IGNORE, and an upstream gradient shaped like labels (for reduction="none").
    Logits have std ~2 so the softmax is neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (2 / math.sqrt(H))
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    labels = torch.randint(0, V, tuple(lead), generator=gen)
    labels[torch.rand(tuple(lead), generator=gen) < ignore_frac] = IGNORE
    upstream = torch.rand(tuple(lead), generator=gen) + 0.5
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device=device, dtype=label_dtype), upstream.to(device)


def torch_loss(hidden, weight, labels, bias=None, shift=0, reduction="mean", ignore_index=IGNORE):
    """F.cross_entropy on the full logits, in the inputs' dtype; with float64 inputs, the truth."""
    if shift:
        N = hidden.shape[1]
        k = min(shift, N)
        hidden, y = hidden[:, : N - k], labels[:, k:]
    else:
        y = labels
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), y.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction)
    if reduction == "none":
        loss = loss.view(y.shape)
        if shift:
            loss = F.pad(loss, (min(shift, labels.shape[1]), 0))
    return loss


def run_with_grads(fn, hidden, weight, bias, upstream):
    """fn(hidden, weight, bias) -> loss; returns (loss, d_hidden, d_weight, d_bias) detached.
    Scalar losses get an upstream gradient of 0.7, per-position ones ``upstream``."""
    hidden, weight = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(hidden, weight, bias)
    grad_out = upstream.to(loss.dtype) if loss.dim() else torch.full_like(loss, 0.7)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, inputs, grad_out)
    return (loss.detach(), *grads) + ((None,) if bias is None else ())


def truth_and_baseline(hidden, weight, labels, bias, upstream, shift, reduction):
    """The float64 truth, and PyTorch's own result in the inputs' dtype (on the CPU)."""
    h, w, y = hidden.detach().cpu(), weight.detach().cpu(), labels.cpu()
    b = None if bias is None else bias.detach().cpu()
    up = upstream.cpu()

    def fn(a, c, d):
        return torch_loss(a, c, y, d, shift=shift, reduction=reduction)

    truth = run_with_grads(fn, h.double(), w.double(), None if b is None else b.double(), up.double())
    base = run_with_grads(fn, h, w, b, up)
    return truth, base


EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float64: 1e-10}


def assert_close(name, actual, truth, baseline, dtype, mult=2.0):
    """Error against the truth at most ``mult`` times PyTorch's same-dtype error plus ``eps``
    relative to the truth's largest entry (gradients here span many orders of magnitude)."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    scale = max(truth.abs().max().item(), 1e-30) if truth.numel() else 1.0
    err = (actual.detach().cpu().double() - truth).abs().max().item() if truth.numel() else 0.0
    base = (baseline.detach().cpu().double() - truth).abs().max().item() if truth.numel() else 0.0
    eps = EPS[dtype] * scale
    assert err <= mult * base + eps, f"{name}: error {err:.3e} > {mult} x PyTorch's {base:.3e} + {eps:.1e}"
