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

When even that grid is short of the GPU (``config.LOOP_SPLIT_MIN_WAVES`` programs per SM), both
kernels also split each tile's loop into pieces (``triton_common.loop_piece``): dQ over its key
tiles, dK/dV over its query tiles, each piece writing an fp32 partial summed the same way.

Every kernel takes its tiles heaviest first (``triton_common.TileSchedule``): program ``p`` runs
tile ``order[p]``, sorted on the device by the tile's loop iterations.

``deterministic=False`` (opt-in) runs the dK/dV kernel alone, with ``ACCUMULATE_DQ``: besides its
4 products it computes each tile's share of dQ (``dS @ K``, the fifth) and adds it atomically into
an fp32 accumulator, as FlashAttention-2 does: 5 products per tile instead of the two kernels' 7
(both recompute the probabilities and dP), at its own tiles (``config.fused_bwd_config``). The
order of the atomic adds varies between runs, so dQ is not bitwise reproducible (dK and dV
still are); the accumulator costs 4 * B * Hq * N * D bytes. Three launches: ``_delta_kernel``
(delta, and zeroing the accumulator), the dK/dV kernel, the cast of dQ to q's dtype (it must wait
for every add).

Probabilities are recomputed from the forward's log-sum-exp (log2 units); rows that saw nothing have
``lse = +inf``, so their probabilities, and every gradient through them, are exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import key_tile_bounds, query_tile_bounds
from .config import AttentionConfig, KernelConfig, block_d_for, dkdv_splits, fused_bwd_config, loop_splits
from .triton_common import (
    LOG2E, TileSchedule, dot_precision, load_bounds, load_tile, loop_piece, mask_if, scheduled_tile, score_tile,
    tile_schedule,
)


_DELTA_ROWS = 64  # rows per program of the delta kernel: a light, memory-bound pass

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
        qk, k, v = score_tile(q, k_ptrs, v_ptrs, cols, offs_d, lo, hi, N, D, MASKED, EVEN_D, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        p = tl.math.exp2(qk * scale_log2 - lse2[:, None])  # the forward's expression: one FFMA + EX2
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
    stride_dqb, stride_dqh, stride_dqn, stride_dqd, stride_dqs,
    N, H_Q, GROUP, D, LOOP_SPLITS, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Q, O, DO, DQ: (B, H_Q, N, D); K, V: (B, H_Q // GROUP, N, D); any strides.
    Lse (read, log2 units) and Delta (written): (B, H_Q, N) float32. Lo, Hi: (B, N) int32, causal folded.
    Bounds: (B, cdiv(N, BLOCK_M), 4) int32 key loop bounds from ``mask.query_tile_bounds``.
    Order: (B * H_Q * LOOP_SPLITS * cdiv(N, BLOCK_M),) int32, the tile
    ``((b * H_Q + h) * LOOP_SPLITS + s) * tiles + m`` of each program.
    LOOP_SPLITS > 1: program s takes piece s of the key loop (``loop_piece``) and writes its fp32
    partial dQ to ``DQ + s * stride_dqs``; piece 0 writes Delta."""
    pid_m, pid_bhs = scheduled_tile(Order, tl.cdiv(N, BLOCK_M))
    split = pid_bhs % LOOP_SPLITS
    pid_bh = pid_bhs // LOOP_SPLITS
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
    a0, a1, f0, f1, e0, e1 = loop_piece(start, full_start, full_end, end, BLOCK_N, split, LOOP_SPLITS)

    rows64 = offs_m[:, None].to(tl.int64)
    q = load_tile(Q + b * stride_qb + h * stride_qh + rows64 * stride_qn + offs_d[None, :] * stride_qd,
                  offs_m, offs_d, N, D, True, EVEN_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :] * stride_dod,
                   offs_m, offs_d, N, D, True, EVEN_D)
    o = load_tile(O + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od,
                  offs_m, offs_d, N, D, True, EVEN_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row_base = (b * H_Q + h) * N
    tl.store(Delta + row_base + offs_m, delta, mask=mask_if(split == 0, row_ok))
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))

    k_base = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   a0, a1, N, D, scale_log2, BLOCK_N, True, EVEN_D, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   f0, f1, N, D, scale_log2, BLOCK_N, False, EVEN_D, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                   e0, e1, N, D, scale_log2, BLOCK_N, True, EVEN_D, DOT_PRECISION)
    dq_ptrs = (DQ + split.to(tl.int64) * stride_dqs + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn
               + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_head0, do_head0, dq_head0, stride_qh, stride_qn, stride_doh, stride_don, lse_head0, delta_head0,
    lo_base, hi_base, cols, offs_m, offs_d, start, end, HEADS, N, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACCUMULATE_DQ: tl.constexpr,
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
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # raw, as in the forward
        if MASKED:
            lo = tl.load(lo_base + rows, mask=row_ok, other=0)
            hi = tl.load(hi_base + rows, mask=row_ok, other=0)
            visible = (cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :])
            qk_t = tl.where(visible, qk_t, float("-inf"))
        p_t = tl.math.exp2(qk_t * scale_log2 - lse[None, :])
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, BLOCK_D] -> [BLOCK_N, BLOCK_D]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_M] -> [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, BLOCK_D] -> [BLOCK_N, BLOCK_D]
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ACCUMULATE_DQ:
            # [BLOCK_M, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_D]: this key tile's share of dQ,
            # the fifth product, added into the fp32 accumulator (relaxed: the adds need only be
            # atomic, nothing reads dQ before the kernel ends).
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * scale
            dq_ptrs = dq_head0 + (g * N + row0) * D
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
            elif EVEN_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DQ, DK, DV, Lse, Delta, Lo, Hi, Bounds, Order,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N, H_Q, GROUP, SPLITS, LOOP_SPLITS, D, NUM_KEY_TILES, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
):
    """K, V: (B, H_Q // GROUP, N, D); Q, DO: (B, H_Q, N, D); any strides.
    ACCUMULATE_DQ (``deterministic=False``): also add ``scale * dS @ K`` into DQ, a zeroed fp32
    (B, H_Q, N, D) contiguous accumulator, atomically (unused otherwise).
    DK, DV: (SPLITS, B, H_Q // GROUP, N, D): with SPLITS = 1 the gradients themselves (split
    stride unused), else fp32 partials; tile (j, (b * H_kv + h) * SPLITS + s) takes query
    heads [s * GROUP / SPLITS, (s + 1) * GROUP / SPLITS) of K/V head h and writes split s.
    Bounds: (B, NUM_KEY_TILES, 4) int32 query-row bounds [begin, full_begin, full_end, end).
    LOOP_SPLITS > 1: each such program is further split into LOOP_SPLITS pieces of its query loop
    (``loop_piece``); piece p of head split s writes partial ``s * LOOP_SPLITS + p`` (DK, DV then
    have SPLITS * LOOP_SPLITS partials).
    Order: (B * H_kv * SPLITS * LOOP_SPLITS * NUM_KEY_TILES,) int32, each program's tile
    ``((pid_bh * SPLITS + s) * LOOP_SPLITS + p) * NUM_KEY_TILES + j``."""
    pid_n, pid_bhsp = scheduled_tile(Order, NUM_KEY_TILES)
    piece = pid_bhsp % LOOP_SPLITS
    pid_bhs = pid_bhsp // LOOP_SPLITS
    h_kv_count = H_Q // GROUP
    heads = GROUP // SPLITS
    split = (pid_bhs % SPLITS).to(tl.int64)
    out_slot = split * LOOP_SPLITS + piece
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
    a0, a1, f0, f1, e0, e1 = loop_piece(q_begin, full_begin, full_end, q_end, BLOCK_M, piece, LOOP_SPLITS)
    lo_base = Lo + b * N
    hi_base = Hi + b * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = h_kv * GROUP + split * heads  # first query head of this program's share of the group
    q_head0 = Q + b * stride_qb + h0 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_head0 = DO + b * stride_dob + h0 * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    dq_head0 = DQ + (b * H_Q + h0) * N * D + offs_m[:, None] * D + offs_d[None, :]
    lse_head0 = Lse + (b * H_Q + h0) * N
    delta_head0 = Delta + (b * H_Q + h0) * N
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, a0, a1,
                         heads, N, D, scale, scale_log2, BLOCK_M, True, EVEN_D, DOT_PRECISION, ACCUMULATE_DQ)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, f0, f1,
                         heads, N, D, scale, scale_log2, BLOCK_M, False, EVEN_D, DOT_PRECISION, ACCUMULATE_DQ)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_head0, do_head0, dq_head0, stride_qh, stride_qn, stride_doh, stride_don,
                         lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, e0, e1,
                         heads, N, D, scale, scale_log2, BLOCK_M, True, EVEN_D, DOT_PRECISION, ACCUMULATE_DQ)

    out_mask = (cols[:, None] < N) & (offs_d[None, :] < D)
    dk_ptrs = (DK + out_slot * stride_dks + b * stride_dkb + h_kv * stride_dkh + cols64 * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + out_slot * stride_dvs + b * stride_dvb + h_kv * stride_dvh + cols64 * stride_dvn
               + offs_d[None, :] * stride_dvd)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _delta_kernel(
    O, DO, Delta, DQ,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    N, H_Q, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Delta = rowsum(dO * O) in fp32, (B, H_Q, N); and zeroes DQ, the fp32 accumulator
    (B, H_Q, N, D), contiguous. One program per (row tile, batch and head), flat grid."""
    tiles = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % tiles
    pid_bh = (pid // tiles).to(tl.int64)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = rows[:, None].to(tl.int64)
    o = load_tile(O + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od,
                  rows, offs_d, N, D, True, EVEN_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :] * stride_dod,
                   rows, offs_d, N, D, True, EVEN_D)
    row_ok = rows < N
    tl.store(Delta + pid_bh * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=row_ok)
    dq_ptrs = DQ + (pid_bh * N + rows64) * D + offs_d[None, :]
    tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=row_ok[:, None] & (offs_d[None, :] < D))


def dq_schedule(lo, hi, heads_q: int, cfg: AttentionConfig, device=None, sms=None) -> TileSchedule:
    """One program per (batch, query head, query tile, piece of its key loop); the pieces
    (``config.loop_splits``) only when the grid is short of the GPU's SMs (``device`` None: none)."""
    k = cfg.dq
    B, N = lo.shape
    splits = 1
    if device is not None:
        splits = loop_splits(B * heads_q * triton.cdiv(N, k.block_m), triton.cdiv(N, k.block_n), device, sms=sms,
                             cfg=cfg)
    return tile_schedule(query_tile_bounds(lo, hi, k.block_m, k.block_n), k.block_n, heads_q, loop_splits=splits)


def dkdv_schedule(lo, hi, heads_q: int, heads_kv: int, cfg: AttentionConfig, device, sms=None,
                  tiles: KernelConfig | None = None):
    """One program per (batch, K/V head, head split, key tile, piece of its query loop), each
    looping over its query tiles for ``group / splits`` query heads, at ``tiles`` (default
    ``cfg.dkdv``; the ``deterministic=False`` backward runs the kernel at its own tiles). Returns
    the schedule and ``splits`` (head splits; the loop pieces are ``schedule.loop_splits``): head
    splits first, as they add no loop iterations, then pieces if the grid is still short of
    ``LOOP_SPLIT_MIN_WAVES``."""
    k = cfg.dkdv if tiles is None else tiles
    bounds = key_tile_bounds(lo, hi, k.block_m, k.block_n)
    group = heads_q // heads_kv
    programs = bounds.shape[1] * bounds.shape[0] * heads_kv
    splits = dkdv_splits(cfg, group, programs, device, sms=sms)
    pieces = loop_splits(programs * splits, triton.cdiv(lo.shape[1], k.block_m), device, sms=sms, cfg=cfg)
    return tile_schedule(bounds, k.block_m, heads_kv * splits, group // splits, loop_splits=pieces), splits


def attention_bwd(do, q, k, v, out, lse, lo, hi, scale: float, cfg: AttentionConfig, deterministic: bool = True):
    """Launch the backward; returns (dq, dk, dv) shaped and strided like (q, k, v).

    ``deterministic`` True: the dQ kernel, then the dK/dV kernel (7 products per tile, bitwise
    reproducible). False: the delta kernel (which also zeroes an fp32 dQ accumulator), then the
    dK/dV kernel at ``config.fused_bwd_config``'s tiles adding dQ atomically (5 products per
    tile), then dQ cast to q's dtype."""
    B, Hq, N, D = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    common = dict(BLOCK_D=block_d, EVEN_D=(block_d == D), DOT_PRECISION=dot_precision(q.dtype))
    if deterministic:
        _launch_dq(do, q, k, v, out, lse, delta, dq, lo, hi, scale, cfg, common)
        dk, dv = _launch_dkdv(do, q, k, v, lse, delta, None, lo, hi, scale, cfg, cfg.dkdv, common)
        return dq, dk, dv
    dq_acc = torch.empty(B, Hq, N, D, dtype=torch.float32, device=q.device)  # zeroed by _delta_kernel
    _delta_kernel[(triton.cdiv(N, _DELTA_ROWS) * B * Hq,)](
        out, do, delta, dq_acc, *out.stride(), *do.stride(), N, Hq, D,
        BLOCK_M=_DELTA_ROWS, BLOCK_D=block_d, EVEN_D=(block_d == D),
    )
    tiles = fused_bwd_config(cfg, block_d, q.element_size(), on_gpu=q.is_cuda)
    dk, dv = _launch_dkdv(do, q, k, v, lse, delta, dq_acc, lo, hi, scale, cfg, tiles, common)
    dq.copy_(dq_acc)  # after every atomic add has landed: a launch of its own
    return dq, dk, dv


def _launch_dq(do, q, k, v, out, lse, delta, dq, lo, hi, scale, cfg: AttentionConfig, common: dict) -> None:
    """dQ into ``dq`` and delta into ``delta`` (the dK/dV kernel reads it)."""
    B, Hq, N, D = q.shape
    sched = dq_schedule(lo, hi, Hq, cfg, q.device)
    pieces = sched.loop_splits
    # Pieces of a key loop write fp32 partials, summed below in a fixed order (deterministic).
    dq_out = dq.unsqueeze(0) if pieces == 1 else torch.empty(pieces, *q.shape, dtype=torch.float32, device=q.device)
    _attn_bwd_dq_kernel[(sched.programs,)](
        q, k, v, out, do, dq_out, lse, delta, lo, hi, sched.bounds, sched.order,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq_out.stride()[1:],
        dq_out.stride(0) if pieces > 1 else 0,
        N, Hq, Hq // k.shape[1], D, pieces, scale, scale * LOG2E,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **common,
        num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
    )
    if pieces > 1:
        dq.copy_(dq_out.sum(0))


def _launch_dkdv(do, q, k, v, lse, delta, dq_acc, lo, hi, scale, cfg: AttentionConfig, tiles: KernelConfig,
                 common: dict):
    """(dk, dv) from the dK/dV kernel at ``tiles``; with ``dq_acc`` (fp32, zeroed) it also adds dQ."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    sched, splits = dkdv_schedule(lo, hi, Hq, Hkv, cfg, q.device, tiles=tiles)
    partials = splits * sched.loop_splits
    if partials == 1:
        dk_out, dv_out = dk.unsqueeze(0), dv.unsqueeze(0)  # split stride never used
    else:
        dk_out = torch.empty(partials, B, Hkv, N, D, dtype=torch.float32, device=q.device)
        dv_out = torch.empty_like(dk_out)
    _attn_bwd_dkdv_kernel[(sched.programs,)](
        q, k, v, do, dk_out if dq_acc is None else dq_acc, dk_out, dv_out, lse, delta, lo, hi, sched.bounds,
        sched.order, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_out.stride(), *dv_out.stride(),
        N, Hq, Hq // Hkv, splits, sched.loop_splits, D, sched.num_tiles, scale, scale * LOG2E,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, ACCUMULATE_DQ=dq_acc is not None, **common,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if partials > 1:  # fixed summation order: dK and dV stay bitwise deterministic
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    return dk, dv
