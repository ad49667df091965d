"""Interval-masked attention in plain PyTorch: the CPU path and the readable specification.

Same contract as the Triton kernels: ``lo``/``hi`` int32 (B, N) with any causal limit already
folded into ``hi`` (see ``KeyRanges.effective_hi``); query i sees key j iff ``lo <= j < hi``.
Grouped-query attention broadcasts each K/V head over its group of query heads without copying.

Memory: work proceeds in query chunks, and each chunk only looks at the keys inside the hull of
its rows' intervals, so no (B, H, N, N) score tensor ever exists for a whole row. Backward
recomputes the probabilities from the saved log-sum-exp, as the kernels do.
"""

from __future__ import annotations

import math

import torch

# Scores held at once: B * Hq * chunk_rows * hull_keys elements (~256 MiB in float64).
_CHUNK_ELEMENTS = 1 << 25
# Short chunks keep each chunk's key hull tight on packed rows (a chunk inside one sample only
# multiplies that sample's keys); the per-chunk Python overhead is negligible next to that.
_MAX_CHUNK_ROWS = 128


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs keep a float64 log-sum-exp, so that the backward stays exact to float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(lo: torch.Tensor, hi: torch.Tensor, B: int, Hq: int):
    """Yield (row slice, key slice) pairs covering every visible (query, key) pair."""
    N = lo.shape[1]
    active = lo < hi
    row = 0
    while row < N:
        rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, B * Hq * N)))
        end = min(N, row + rows)
        act = active[:, row:end]
        if bool(act.any()):
            k0 = int(torch.where(act, lo[:, row:end], N).min())
            k1 = int(torch.where(act, hi[:, row:end], 0).max())
            yield slice(row, end), slice(k0, k1)
        row = end


def _scores(q, k, lo, hi, rows: slice, keys: slice, scale: float, dtype):
    """Masked scaled scores (B, Hkv, G, R, K) for a chunk, -inf where not visible."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qc = q[:, :, rows].to(dtype).reshape(B, Hkv, Hq // Hkv, -1, D)
    kc = k[:, :, keys].to(dtype)
    s = torch.einsum("bhgrd,bhkd->bhgrk", qc, kc) * scale
    j = torch.arange(keys.start, keys.stop, device=q.device)
    vis = (j >= lo[:, rows, None]) & (j < hi[:, rows, None])  # (B, R, K)
    return s.masked_fill(~vis[:, None, None], float("-inf")), vis


def attention_forward(q, k, v, lo, hi, scale: float):
    """Returns ``out`` (B, Hq, N, D) in q's dtype and ``lse`` (B, Hq, N), natural log, float32
    (float64 for float64 inputs, see ``lse_dtype``), both token-major in memory.

    Rows that see no key get ``out = 0`` and ``lse = +inf``.
    """
    B, Hq, N, D = q.shape
    dtype = _compute_dtype(q.dtype)
    out = torch.zeros(B, N, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    # Token-major like out (and like cpu.py's, which takes it as the CPU kernel returns it).
    lse = torch.full((B, N, Hq), math.inf, dtype=lse_dtype(q.dtype), device=q.device).transpose(1, 2)
    for rows, keys in _chunks(lo, hi, B, Hq):
        s, vis = _scores(q, k, lo, hi, rows, keys, scale, dtype)
        active = vis.any(-1)[:, None, None, :, None]  # (B, 1, 1, R, 1)
        m = torch.where(active, s.amax(-1, keepdim=True), torch.zeros((), dtype=dtype, device=q.device))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        l_safe = torch.where(active, l, torch.ones_like(l))
        o = torch.einsum("bhgrk,bhkd->bhgrd", p, v[:, :, keys].to(dtype)) / l_safe
        o = torch.where(active, o, torch.zeros_like(o))
        out[:, :, rows] = o.reshape(B, Hq, -1, D).to(q.dtype)
        chunk_lse = torch.where(active, m + torch.log(l_safe), torch.full_like(m, math.inf))
        lse[:, :, rows] = chunk_lse.reshape(B, Hq, -1).to(lse.dtype)
    return out, lse


def attention_backward(do, q, k, v, out, lse, lo, hi, scale: float):
    """Gradients (dq, dk, dv) of ``attention_forward``, recomputing probabilities from ``lse``."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dtype = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    delta = (do.to(dtype) * out.to(dtype)).sum(-1)  # (B, Hq, N)
    for rows, keys in _chunks(lo, hi, B, Hq):
        s, _ = _scores(q, k, lo, hi, rows, keys, scale, dtype)
        lse_c = lse[:, :, rows].to(dtype).reshape(B, Hkv, G, -1, 1)
        p = torch.exp(s - lse_c)  # lse = +inf on rows that see nothing -> p = 0
        do_c = do[:, :, rows].to(dtype).reshape(B, Hkv, G, -1, D)
        q_c = q[:, :, rows].to(dtype).reshape(B, Hkv, G, -1, D)
        dv[:, :, keys] += torch.einsum("bhgrk,bhgrd->bhkd", p, do_c)
        dp = torch.einsum("bhgrd,bhkd->bhgrk", do_c, v[:, :, keys].to(dtype))
        ds = p * (dp - delta[:, :, rows].reshape(B, Hkv, G, -1, 1))
        dq[:, :, rows] = torch.einsum("bhgrk,bhkd->bhgrd", ds, k[:, :, keys].to(dtype)).reshape(B, Hq, -1, D) * scale
        dk[:, :, keys] += torch.einsum("bhgrk,bhgrd->bhkd", ds, q_c) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
