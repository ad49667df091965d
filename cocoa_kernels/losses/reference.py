"""Fused linear cross-entropy in plain PyTorch: the CPU path and the readable specification.

Same contract as the Triton kernels: hidden (T, H), weight (V, H), bias (V,) or None, targets (T,)
with ``ignore_index`` on the rows that do not count. The counted rows are gathered first
(``nonzero``: a host sync, free on the CPU this path is meant for) and processed in chunks of rows,
so at most ``_CHUNK_ELEMENTS`` logits exist at once, never the whole (T, V). Arithmetic in
float32 (float64 for float64 inputs). The backward recomputes each chunk's logits from the saved
log-sum-exp, as the kernels do.
"""

from __future__ import annotations

import torch

# Logits held at once: chunk_rows * V elements (~8 MiB in float32). The backward turns them into
# their gradient in place and accumulates d_weight in place, so this one buffer (plus the outputs)
# is the path's working memory: at issue 25's shape its peak is 0.94x torch's chunked
# F.linear_cross_entropy's (bench/results/2026-12-08-cpu-loss.json); 2^22 was 0.995x and 1.01x in
# two earlier runs, within the noise.
_CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(targets: torch.Tensor, ignore_index: int, V: int):
    """The counted rows (int64 indices) in chunks of at most ``_CHUNK_ELEMENTS // V`` rows."""
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows.split(max(1, _CHUNK_ELEMENTS // max(1, V)))


def _logits(hidden, w, b, rows, dtype):
    z = hidden.index_select(0, rows).to(dtype) @ w.T
    return z + b if b is not None else z


def lce_forward(hidden, weight, bias, targets, ignore_index: int):
    """Returns ``loss`` (T,) and ``lse`` (T,) (natural log), 0 on rows that do not count; float32,
    or float64 for float64 inputs."""
    T = hidden.shape[0]
    V = weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    loss = torch.zeros(T, dtype=dtype, device=hidden.device)
    lse = torch.zeros(T, dtype=dtype, device=hidden.device)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    for rows in _row_chunks(targets, ignore_index, V):
        z = _logits(hidden, w, b, rows, dtype)
        chunk_lse = torch.logsumexp(z, dim=-1)
        target_logit = z.gather(1, targets[rows].long()[:, None]).squeeze(1)
        loss[rows] = chunk_lse - target_logit
        lse[rows] = chunk_lse
    return loss, lse


def lce_backward(d_loss, hidden, weight, bias, targets, lse, ignore_index: int, wanted=(True, True, True)):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum(d_loss * loss)``, each computed only if
    ``wanted`` says so (else an empty tensor, as is d_bias without a bias). Outputs contiguous, in
    the inputs' dtypes."""
    T, H = hidden.shape
    V = weight.shape[0]
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and bias is not None
    dtype = _compute_dtype(hidden.dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    d_hidden = torch.zeros(T if want_h else 0, H, dtype=dtype, device=hidden.device)
    d_weight = torch.zeros(V if want_w else 0, H, dtype=dtype, device=hidden.device)
    d_bias = torch.zeros(V if want_b else 0, dtype=dtype, device=hidden.device)
    for rows in _row_chunks(targets, ignore_index, V):
        dz = _logits(hidden, w, b, rows, dtype)  # the logits, turned into their gradient in place
        dz.sub_(lse[rows].to(dtype)[:, None]).exp_()
        dz[torch.arange(rows.numel(), device=dz.device), targets[rows].long()] -= 1
        dz.mul_(d_loss[rows].to(dtype)[:, None])
        if want_h:
            d_hidden[rows] = dz @ w
        if want_w:
            d_weight.addmm_(dz.T, hidden.index_select(0, rows).to(dtype))
        if want_b:
            d_bias += dz.sum(0)
    d_hidden = d_hidden.to(hidden.dtype) if want_h else hidden.new_empty(0)
    d_weight = d_weight.to(weight.dtype) if want_w else weight.new_empty(0)
    return d_hidden, d_weight, d_bias.to(hidden.dtype)
