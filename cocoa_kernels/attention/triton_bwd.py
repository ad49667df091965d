"""Backward kernels of interval-masked flash attention (dQ; dK and dV), and their launcher.

Two kernels, no atomics, so gradients are bitwise deterministic run to run:

1. ``_attn_bwd_dq_kernel``: one program per query tile and query head. It first writes
   ``delta = rowsum(dO * O)`` for its rows (the dK/dV kernel reads it), then walks the same key
   tiles as the forward (masked edges, unmasked middle) and accumulates dQ.
2. ``_attn_bwd_dkdv_kernel``: one program per key tile and *K/V head*. It loops over the pairs
   (query tile that sees the key tile, query head of its group) (bounds from
   ``mask.key_tile_bounds``), accumulating dK and dV in registers: grouped-query attention never
   materialises repeated K/V, and no two programs write the same dK/dV element. When that grid
   is too small to balance on the GPU (short rows, few K/V heads), the group's query heads are split
   over ``splits`` programs, each writing an fp32 partial that the launcher sums in a fixed order.

Every kernel takes its tiles heaviest first (``triton_common.TileSchedule``): program ``p`` runs
tile ``order[p]``, sorted on the device by the tile's loop iterations.

Probabilities are recomputed from the forward's log-sum-exp (log2 units); rows that saw nothing have
``lse = +inf``, so their probabilities, and every gradient through them, are exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import key_tile_bounds, query_tile_bounds
from .config import AttentionConfig, block_d_for, dkdv_splits
from .triton_common import (
    LOG2E, TileSchedule, dot_precision, load_bounds, load_tile, scheduled_tile, score_tile, tile_schedule,
)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
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
        p = tl.math.exp2(s - lse2[:, None])
        # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        # [BLOCK_M, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_D]
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, Lse, Delta, Lo, Hi, Bounds, Order,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    N, H_Q, GROUP, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Q, O, DO, DQ: (B, H_Q, N, D); K, V: (B, H_Q // GROUP, N, D); any strides.
    Lse (read, log2 units) and Delta (written): (B, H_Q, N) float32. Lo, Hi: (B, N) int32, causal folded.
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
    start, full_start, full_end, end = load_bounds(Bounds, b, pid_m, tl.cdiv(N, BLOCK_M))

    rows64 = offs_m[:, None].to(tl.int64)
    q = load_tile(Q + b * stride_qb + h * stride_qh + rows64 * stride_qn + offs_d[None, :] * stride_qd,
                  offs_m, offs_d, N, D, True, EVEN_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :] * stride_dod,
                   offs_m, offs_d, N, D, True, EVEN_D)
    o = load_tile(O + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od,
                  offs_m, offs_d, N, D, True, EVEN_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row_base = (b * H_Q + h) * N
    tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))

    k_base = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   start, full_start, N, D, scale_log2, BLOCK_N, True, EVEN_D, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   full_start, full_end, N, D, scale_log2, BLOCK_N, False, EVEN_D, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   full_end, end, N, D, scale_log2, BLOCK_N, True, EVEN_D, DOT_PRECISION)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_head0, do_head0, stride_qh, stride_qn, stride_doh, stride_don, lse_head0, delta_head0,
    lo_base, hi_base, cols, offs_m, offs_d, start, end, HEADS, N, D, scale_log2,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One flat loop over (query tile, query head) pairs for this program's HEADS heads. A head
    # loop around the pipelined tile loop made ptxas spill at GROUP > 1 on sm_90; the mask does
    # not depend on the head, so the masked/unmasked split is the same for every pair.
    zero64 = start.to(tl.int64) * 0
    for it in range(0, tl.cdiv(end - start, BLOCK_M) * HEADS):
        g = zero64 + it % HEADS
        start_m = start + (it // HEADS) * BLOCK_M
        row0 = start_m.to(tl.int64)
        rows = start_m + offs_m
        q = load_tile(q_head0 + g * stride_qh + row0 * stride_qn, rows, offs_d, N, D, MASKED, EVEN_D)
        do = load_tile(do_head0 + g * stride_doh + row0 * stride_don, rows, offs_d, N, D, MASKED, EVEN_D)
        lse_ptrs = lse_head0 + g * N + rows
        delta_ptrs = delta_head0 + g * N + rows
        if MASKED:
            row_ok = rows < N
            lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_M] -> [BLOCK_N, BLOCK_M]  (scores, transposed)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            lo = tl.load(lo_base + rows, mask=row_ok, other=0)
            hi = tl.load(hi_base + rows, mask=row_ok, other=0)
            visible = (cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :])
            s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, BLOCK_D] -> [BLOCK_N, BLOCK_D]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_M] -> [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, BLOCK_D] -> [BLOCK_N, BLOCK_D]
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Lo, Hi, Bounds, Order,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N, H_Q, GROUP, SPLITS, D, NUM_KEY_TILES, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """K, V: (B, H_Q // GROUP, N, D); Q, DO: (B, H_Q, N, D); any strides.
    DK, DV: (SPLITS, B, H_Q // GROUP, N, D): with SPLITS = 1 the gradients themselves (split
    stride unused), else fp32 partials; tile (j, (b * H_kv + h) * SPLITS + s) takes query
    heads [s * GROUP / SPLITS, (s + 1) * GROUP / SPLITS) of K/V head h and writes split s.
    Bounds: (B, NUM_KEY_TILES, 4) int32 query-row bounds [begin, full_begin, full_end, end).
    Order: (B * H_kv * SPLITS * NUM_KEY_TILES,) int32, each program's tile ``pid_bhs * NUM_KEY_TILES + j``."""
    pid_n, pid_bhs = scheduled_tile(Order, NUM_KEY_TILES)
    h_kv_count = H_Q // GROUP
    heads = GROUP // SPLITS
    split = (pid_bhs % SPLITS).to(tl.int64)
    pid_bh = pid_bhs // SPLITS
    b = (pid_bh // h_kv_count).to(tl.int64)
    h_kv = (pid_bh % h_kv_count).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols64 = cols[:, None].to(tl.int64)
    k = load_tile(K + b * stride_kb + h_kv * stride_kh + cols64 * stride_kn + offs_d[None, :] * stride_kd,
                  cols, offs_d, N, D, True, EVEN_D)
    v = load_tile(V + b * stride_vb + h_kv * stride_vh + cols64 * stride_vn + offs_d[None, :] * stride_vd,
                  cols, offs_d, N, D, True, EVEN_D)
    q_begin, full_begin, full_end, q_end = load_bounds(Bounds, b, pid_n, NUM_KEY_TILES)
    lo_base = Lo + b * N
    hi_base = Hi + b * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = h_kv * GROUP + split * heads  # first query head of this program's share of the group
    q_head0 = Q + b * stride_qb + h0 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_head0 = DO + b * stride_dob + h0 * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    lse_head0 = Lse + (b * H_Q + h0) * N
    delta_head0 = Delta + (b * H_Q + h0) * N
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, q_begin, full_begin,
                         heads, N, D, scale_log2, BLOCK_M, True, EVEN_D, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, full_begin, full_end,
                         heads, N, D, scale_log2, BLOCK_M, False, EVEN_D, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, full_end, q_end,
                         heads, N, D, scale_log2, BLOCK_M, True, EVEN_D, DOT_PRECISION)

    out_mask = (cols[:, None] < N) & (offs_d[None, :] < D)
    dk_ptrs = (DK + split * stride_dks + b * stride_dkb + h_kv * stride_dkh + cols64 * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + split * stride_dvs + b * stride_dvb + h_kv * stride_dvh + cols64 * stride_dvn
               + offs_d[None, :] * stride_dvd)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


def dq_schedule(lo, hi, heads_q: int, cfg: AttentionConfig) -> TileSchedule:
    """One program per (batch, query head, query tile), walking the tile's key loop."""
    k = cfg.dq
    return tile_schedule(query_tile_bounds(lo, hi, k.block_m, k.block_n), k.block_n, heads_q)


def dkdv_schedule(lo, hi, heads_q: int, heads_kv: int, cfg: AttentionConfig, device, sms=None):
    """One program per (batch, K/V head, split, key tile), each looping over its query tiles
    for ``group / splits`` query heads. Returns the schedule and ``splits``."""
    k = cfg.dkdv
    bounds = key_tile_bounds(lo, hi, k.block_m, k.block_n)
    group = heads_q // heads_kv
    splits = dkdv_splits(cfg, group, bounds.shape[1] * bounds.shape[0] * heads_kv, device, sms=sms)
    return tile_schedule(bounds, k.block_m, heads_kv * splits, group // splits), splits


def attention_bwd(do, q, k, v, out, lse, lo, hi, scale: float, cfg: AttentionConfig):
    """Launch the backward; returns (dq, dk, dv) shaped and strided like (q, k, v)."""
    dq_cfg, dkdv_cfg = cfg.dq, cfg.dkdv
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    common = dict(BLOCK_D=block_d, EVEN_D=(block_d == D), DOT_PRECISION=dot_precision(q.dtype))

    sched = dq_schedule(lo, hi, Hq, cfg)
    _attn_bwd_dq_kernel[(sched.programs,)](
        q, k, v, out, do, dq, lse, delta, lo, hi, sched.bounds, sched.order,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        N, Hq, Hq // Hkv, D, scale, scale * LOG2E,
        BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, **common,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages,
    )

    sched, splits = dkdv_schedule(lo, hi, Hq, Hkv, cfg, q.device)
    group = Hq // Hkv
    if splits == 1:
        dk_out, dv_out = dk.unsqueeze(0), dv.unsqueeze(0)  # split stride never used
    else:
        dk_out = torch.empty(splits, B, Hkv, N, D, dtype=torch.float32, device=q.device)
        dv_out = torch.empty_like(dk_out)
    _attn_bwd_dkdv_kernel[(sched.programs,)](
        q, k, v, do, dk_out, dv_out, lse, delta, lo, hi, sched.bounds, sched.order,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_out.stride(), *dv_out.stride(),
        N, Hq, group, splits, D, sched.num_tiles, scale, scale * LOG2E,
        BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n, **common,
        num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages,
    )
    if splits > 1:  # fixed summation order: still bitwise deterministic
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    return dq, dk, dv
