"""Forward kernel of interval-masked flash attention, and its launcher.

Each program owns one query tile of one (batch, query head). ``mask.query_tile_bounds`` gives it
the key hull of its rows' intervals ``[min lo, max hi)`` and the key tiles every active row sees
whole ``[max lo, min hi)``. It walks the hull in three loops: masked edge tiles, unmasked full tiles,
masked edge tiles (the split of Triton's fused-attention tutorial, driven by data instead of
the causal diagonal). Key tiles outside the hull are never touched.

Programs take their tiles heaviest first (``triton_common.TileSchedule``): program ``p`` runs the
tile ``order[p]``, sorted on the device by its key-loop length, so the longest tiles start in the
first wave instead of (causal) the last.

Rows with an empty interval ("inactive") still flow through the unmasked loop but are written
as zeros with ``lse = +inf``, so the backward's recomputed probabilities are exactly 0 for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import query_tile_bounds
from .config import KernelConfig, block_d_for
from .triton_common import (
    LOG2E, TileSchedule, dot_precision, load_bounds, load_tile, scheduled_tile, score_tile, tile_schedule,
)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
    start, end, N, D, scale_log2,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Pointers advance by one tile per step; the int64 product is taken once, outside the loop.
    k_ptrs = k_base + start.to(tl.int64) * stride_kn
    v_ptrs = v_base + start.to(tl.int64) * stride_vn
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        s, k, v = score_tile(q, k_ptrs, v_ptrs, cols, offs_d, lo, hi, N, D, scale_log2, MASKED, EVEN_D, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # [BLOCK_M, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Lo, Hi, Bounds, Order,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    N, H_Q, GROUP, D, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Q, Out: (B, H_Q, N, D); K, V: (B, H_Q // GROUP, N, D), any strides.
    Lse: (B, H_Q, N) float32, base-2 log-sum-exp of the scaled scores, +inf for rows that see nothing.
    Lo, Hi: (B, N) int32 contiguous, causal limit already folded into Hi.
    Bounds: (B, cdiv(N, BLOCK_M), 4) int32 key loop bounds from ``mask.query_tile_bounds``.
    Order: (B * H_Q * cdiv(N, BLOCK_M),) int32, the tile ``(b * H_Q + h) * tiles + m`` of each program."""
    pid_m, pid_bh = scheduled_tile(Order, tl.cdiv(N, BLOCK_M))
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    h_kv = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    lo = tl.load(Lo + b * N + offs_m, mask=row_ok, other=0)
    hi = tl.load(Hi + b * N + offs_m, mask=row_ok, other=0)
    active = row_ok & (lo < hi)
    start, full_start, full_end, end = load_bounds(Bounds, b, pid_m, tl.cdiv(N, BLOCK_M))

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd
    q = load_tile(q_ptrs, offs_m, offs_d, N, D, True, EVEN_D)
    k_base = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    # Finite start for the running max: a fully masked tile then gives p = exp2(-inf) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               start, full_start, N, D, scale_log2,
                               BLOCK_N, True, EVEN_D, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               full_start, full_end, N, D, scale_log2,
                               BLOCK_N, False, EVEN_D, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               full_end, end, N, D, scale_log2,
                               BLOCK_N, True, EVEN_D, DOT_PRECISION)

    l_safe = tl.where(active, l_i, 1.0)
    out = tl.where(active[:, None], acc / l_safe[:, None], 0.0)
    # Saved in log2 units, exactly as the backward recomputes its exponents: a round trip through
    # natural log would cost |score| * 1e-7 of exponent, visible at large scores.
    lse = tl.where(active, m_i + tl.math.log2(l_safe), float("inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(Lse + (b * H_Q + h) * N + offs_m, lse, mask=row_ok)


def fwd_schedule(lo, hi, heads_q: int, cfg: KernelConfig) -> TileSchedule:
    """One program per (batch, query head, query tile), walking the tile's key loop."""
    return tile_schedule(query_tile_bounds(lo, hi, cfg.block_m, cfg.block_n), cfg.block_n, heads_q)


def attention_fwd(q, k, v, lo, hi, scale: float, cfg: KernelConfig):
    """Launch the forward. q (B, Hq, N, D), k/v (B, Hkv, N, D); lo/hi int32 (B, N) contiguous.

    Returns ``out`` (B, Hq, N, D) laid out as (B, N, Hq, D) in memory, so the usual
    ``transpose(1, 2)`` back to token-major costs nothing, and ``lse`` (B, Hq, N) float32 in
    log2 units (what ``triton_bwd`` expects).
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    sched = fwd_schedule(lo, hi, Hq, cfg)
    _attn_fwd_kernel[(sched.programs,)](
        q, k, v, out, lse, lo, hi, sched.bounds, sched.order,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        N, Hq, Hq // Hkv, D, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        EVEN_D=(block_d == D), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse

