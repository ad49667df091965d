"""Forward kernel of interval-masked flash attention, and its launcher.

Each program owns one query tile of one (batch, query head). ``mask.query_tile_bounds`` gives it
the key hull of its rows' intervals ``[min lo, max hi)`` and the key tiles every active row sees
whole ``[max lo, min hi)``. It walks the hull in three loops: masked edge tiles, unmasked full tiles,
masked edge tiles (the split of Triton's fused-attention tutorial, driven by data instead of
the causal diagonal). Key tiles outside the hull are never touched.

Programs take their tiles heaviest first (``triton_common.TileSchedule``): program ``p`` runs the
tile ``order[p]``, sorted on the device by its key-loop length, so the longest tiles start in the
first wave instead of (causal) the last.

Short rows (fewer programs than ``config.LOOP_SPLIT_MIN_WAVES`` per SM) split each tile's key
loop over several programs, as flash-decoding does: each runs one piece of the three loops
(``triton_common.loop_piece``) and writes an fp32 partial (output normalised by its own sum,
log-sum-exp), and ``_fwd_merge_kernel`` combines them in a fixed order.

Rows with an empty interval ("inactive") still flow through the unmasked loop but are written
as zeros with ``lse = +inf``, so the backward's recomputed probabilities are exactly 0 for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import query_tile_bounds
from .config import KernelConfig, block_d_for, loop_splits
from .triton_common import (
    LOG2E, TileSchedule, dot_precision, load_bounds, load_tile, loop_piece, online_softmax_step, scheduled_tile,
    score_tile, tile_schedule,
)

MERGE_BLOCK_M = 32  # rows per merge program: [32, 128] fp32 tiles stay in registers at 4 warps


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
        qk, k, v = score_tile(q, k_ptrs, v_ptrs, cols, offs_d, lo, hi, N, D, MASKED, EVEN_D, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, scale_log2, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Lo, Hi, Bounds, Order,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_os, stride_ls,
    N, H_Q, GROUP, D, LOOP_SPLITS, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Q, Out: (B, H_Q, N, D); K, V: (B, H_Q // GROUP, N, D), any strides.
    Lse: (B, H_Q, N) float32, base-2 log-sum-exp of the scaled scores, +inf for rows that see nothing.
    Lo, Hi: (B, N) int32 contiguous, causal limit already folded into Hi.
    Bounds: (B, cdiv(N, BLOCK_M), 4) int32 key loop bounds from ``mask.query_tile_bounds``.
    Order: (B * H_Q * LOOP_SPLITS * cdiv(N, BLOCK_M),) int32, the tile
    ``((b * H_Q + h) * LOOP_SPLITS + s) * tiles + m`` of each program.
    LOOP_SPLITS > 1: program s takes piece s of the key loop (``loop_piece``) and writes a partial
    to ``Out + s * stride_os`` (fp32, normalised by its own sum) and ``Lse + s * stride_ls`` (-inf
    where it saw no key), which ``_fwd_merge_kernel`` combines."""
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
    active = row_ok & (lo < hi)
    start, full_start, full_end, end = load_bounds(Bounds, b, pid_m, tl.cdiv(N, BLOCK_M))
    a0, a1, f0, f1, e0, e1 = loop_piece(start, full_start, full_end, end, BLOCK_N, split, LOOP_SPLITS)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd
    q = load_tile(q_ptrs, offs_m, offs_d, N, D, True, EVEN_D)
    k_base = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    # Finite start for the running max: a fully masked tile then gives p = exp2(-inf) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               a0, a1, N, D, scale_log2,
                               BLOCK_N, True, EVEN_D, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               f0, f1, N, D, scale_log2,
                               BLOCK_N, False, EVEN_D, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, lo, hi,
                               e0, e1, N, D, scale_log2,
                               BLOCK_N, True, EVEN_D, DOT_PRECISION)

    # An active row sees at least its own maximum over the whole loop (l >= 1); a piece of a split
    # loop may see none of its keys (l = 0). Nothing seen: zeros, and lse = +inf (final: the
    # backward's probabilities are exactly 0) or -inf (a partial: it adds nothing to the merge).
    seen = active & (l_i > 0.0)
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    # Saved in log2 units, exactly as the backward recomputes its exponents: a round trip through
    # natural log would cost |score| * 1e-7 of exponent, visible at large scores.
    nothing = tl.where(LOOP_SPLITS == 1, float("inf"), float("-inf"))
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), nothing)
    split64 = split.to(tl.int64)
    o_ptrs = (Out + split64 * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_on
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(Lse + split64 * stride_ls + (b * H_Q + h) * N + offs_m, lse, mask=row_ok)


@triton.jit
def _fwd_merge_kernel(
    Part, LsePart, Out, Lse,
    stride_ps, stride_pb, stride_ph, stride_pn, stride_pd,
    stride_ob, stride_oh, stride_on, stride_od, stride_ls,
    N, H_Q, D, LOOP_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Combine the forward's LOOP_SPLITS partials of one (batch, head, row block):
    out = sum_s 2^(lse_s - lse) o_s and lse = log2(sum_s 2^lse_s), in a fixed order (deterministic).
    Part: (LOOP_SPLITS, B, H_Q, N, D) fp32; LsePart: (LOOP_SPLITS, B, H_Q, N) fp32, rows contiguous,
    split stride ``stride_ls``.
    Rows no piece saw get zeros and lse = +inf, as the unsplit kernel writes them."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    io_mask = row_ok[:, None] & (offs_d[None, :] < D)
    lse_rows = LsePart + pid_bh * N + offs_m
    rows64 = offs_m[:, None].to(tl.int64)
    p_ptrs = Part + b * stride_pb + h * stride_ph + rows64 * stride_pn + offs_d[None, :] * stride_pd
    # Running max starts finite, so a piece with lse = -inf weighs exactly 0 (no inf - inf).
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _ in range(0, LOOP_SPLITS):
        lse_s = tl.load(lse_rows, mask=row_ok, other=float("-inf"))
        o_s = tl.load(p_ptrs, mask=io_mask, other=0.0)
        lse_rows += stride_ls
        p_ptrs += stride_ps
        m_new = tl.maximum(m, lse_s)
        alpha = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse_s - m_new)
        den = den * alpha + w
        acc = acc * alpha[:, None] + o_s * w[:, None]
        m = m_new
    seen = den > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, den, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m + tl.math.log2(tl.where(seen, den, 1.0)), float("inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)
    tl.store(Lse + pid_bh * N + offs_m, lse, mask=row_ok)


def fwd_schedule(lo, hi, heads_q: int, cfg: KernelConfig, loop_splits: int = 1) -> TileSchedule:
    """One program per (batch, query head, query tile, piece of its key loop)."""
    bounds = query_tile_bounds(lo, hi, cfg.block_m, cfg.block_n)
    return tile_schedule(bounds, cfg.block_n, heads_q, loop_splits=loop_splits)


def fwd_loop_splits(lo, heads_q: int, cfg: KernelConfig, device, sms=None) -> int:
    """Pieces of each query tile's key loop (``config.loop_splits``): 1 unless the grid is short."""
    B, N = lo.shape
    tiles = triton.cdiv(N, cfg.block_m)
    return loop_splits(B * heads_q * tiles, triton.cdiv(N, cfg.block_n), device, sms=sms)


def attention_fwd(q, k, v, lo, hi, scale: float, cfg: KernelConfig):
    """Launch the forward. q (B, Hq, N, D), k/v (B, Hkv, N, D); lo/hi int32 (B, N) contiguous.

    Returns ``out`` (B, Hq, N, D) laid out as (B, N, Hq, D) in memory, so the usual
    ``transpose(1, 2)`` back to token-major costs nothing, and ``lse`` (B, Hq, N) float32 in
    log2 units (what ``triton_bwd`` expects). When the grid is short of the GPU's SMs
    (``fwd_loop_splits``), each key loop is split over several programs writing fp32 partials,
    and a second, small launch merges them.
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    splits = fwd_loop_splits(lo, Hq, cfg, q.device)
    sched = fwd_schedule(lo, hi, Hq, cfg, splits)
    if splits == 1:
        part, lse_part = out, lse
    else:
        part = torch.empty(splits, B, Hq, N, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, B, Hq, N, dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[(sched.programs,)](
        q, k, v, part, lse_part, lo, hi, sched.bounds, sched.order,
        *q.stride(), *k.stride(), *v.stride(), *part.stride()[-4:],
        part.stride(0) if splits > 1 else 0, lse_part.stride(0) if splits > 1 else 0,
        N, Hq, Hq // Hkv, D, splits, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        EVEN_D=(block_d == D), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _fwd_merge_kernel[(triton.cdiv(N, MERGE_BLOCK_M), B * Hq)](
            part, lse_part, out, lse, *part.stride(), *out.stride(), lse_part.stride(0),
            N, Hq, D, splits, BLOCK_M=MERGE_BLOCK_M, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse
