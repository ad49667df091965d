"""Forward of the fused linear cross-entropy: per counted row, an online log-sum-exp over vocab
tiles and the target logit, without ever writing a logit to memory; and its launcher.

Grid: (row tiles of the compacted rows, vocab splits). Program (i, s) owns slots
``[i * BLOCK_M, (i + 1) * BLOCK_M)`` of the compaction and the vocab range of split s. It walks
that range in BLOCK_V tiles (full tiles unmasked, the vocab's partial last tile masked), each
tile's logits accumulated over the hidden dim in BLOCK_H chunks, and keeps a running max ``m``,
sum ``l`` (base 2) and target logit ``t`` per row. Row tiles at or past the device-side count
do no work. A second, tiny kernel merges the splits in a fixed order (deterministic) and writes
the per-row loss and log-sum-exp at the rows' original positions, zeros for the ignored rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compact import compact_rows
from .config import LossConfig, fwd_splits
from .triton_common import LN2, LOG2E, add_bias, dot_precision, logits_tile

_COMBINE_BLOCK = 256


@triton.jit
def _fwd_inner(
    m_i, l_i, t_i, h_ptrs, Weight, Bias, slot_ok, tgt, offs_v, offs_h,
    v_start, v_end, V, H, stride_wv, stride_wh, stride_hh,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_V: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < V
        w_ptrs = Weight + cols.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh
        z = logits_tile(h_ptrs, w_ptrs, slot_ok, col_ok, offs_h, H, stride_hh, stride_wh,
                        BLOCK_M, BLOCK_V, BLOCK_H, MASK_V, EVEN_H, DOT_PRECISION)
        z = add_bias(z, Bias, cols, col_ok, HAS_BIAS, MASK_V)
        s2 = z * LOG2E
        if MASK_V:
            s2 = tl.where(col_ok[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m_i, l_i, t_i


@triton.jit
def _lce_fwd_kernel(
    Hidden, Weight, Bias, Rows, SlotTargets, Count, Part,
    stride_ht, stride_hh, stride_wv, stride_wh,
    P, V, H, V_FULL, SPLIT_COLS, NUM_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Hidden: (T, H), any strides; Weight: (V, H), any strides; Bias: (V,) contiguous or unused.
    Rows, SlotTargets: (T,) int32, the compaction (counted rows first) and their targets;
    Count: (1,) int32, how many rows count. V_FULL = V rounded down to BLOCK_V; split s covers
    vocab ``[s * SPLIT_COLS, min((s + 1) * SPLIT_COLS, V))``.
    Part: (3, NUM_SPLITS, P) float32 (P >= count), written for slots < count: running max of the base-2
    logits, sum of exp2 relative to it, and the target logit (natural units, 0 outside the split)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(Count)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < count
    rows = tl.load(Rows + slots, mask=slot_ok, other=0).to(tl.int64)
    tgt = tl.load(SlotTargets + slots, mask=slot_ok, other=-1)
    offs_v = tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = Hidden + rows[:, None] * stride_ht + offs_h[None, :] * stride_hh

    v_lo = pid_s * SPLIT_COLS
    v_hi = tl.minimum(v_lo + SPLIT_COLS, V)
    v_hi = tl.where(pid_m * BLOCK_M < count, v_hi, v_lo)  # a tile past the counted rows does nothing
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: an empty split stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i, t_i = _fwd_inner(m_i, l_i, t_i, h_ptrs, Weight, Bias, slot_ok, tgt, offs_v, offs_h,
                               v_lo, tl.minimum(v_hi, V_FULL), V, H, stride_wv, stride_wh, stride_hh,
                               BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, False, EVEN_H, DOT_PRECISION)
    m_i, l_i, t_i = _fwd_inner(m_i, l_i, t_i, h_ptrs, Weight, Bias, slot_ok, tgt, offs_v, offs_h,
                               tl.maximum(v_lo, V_FULL), v_hi, V, H, stride_wv, stride_wh, stride_hh,
                               BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, True, EVEN_H, DOT_PRECISION)
    out = pid_s * P + slots
    tl.store(Part + out, m_i, mask=slot_ok)
    tl.store(Part + NUM_SPLITS * P + out, l_i, mask=slot_ok)
    tl.store(Part + 2 * NUM_SPLITS * P + out, t_i, mask=slot_ok)


@triton.jit
def _lce_combine_kernel(Part, Rows, Count, Loss, Lse, T, P, NUM_SPLITS, BLOCK: tl.constexpr):
    """Merge the splits of every slot in split order; write ``Loss[row] = lse - target logit``
    (natural units) and ``Lse[row]`` (log2 units) for counted rows, 0 for the others. Rows is a
    permutation of [0, T), so every element of Loss and Lse is written exactly once."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = slots < T
    valid = slots < tl.load(Count)
    m = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(Part + s * P + slots, mask=valid, other=-1.0e30)
        l_s = tl.load(Part + (NUM_SPLITS + s) * P + slots, mask=valid, other=0.0)
        t += tl.load(Part + (2 * NUM_SPLITS + s) * P + slots, mask=valid, other=0.0)
        m_new = tl.maximum(m, m_s)
        l = l * tl.math.exp2(m - m_new) + l_s * tl.math.exp2(m_s - m_new)
        m = m_new
    lse2 = m + tl.math.log2(tl.where(valid, l, 1.0))
    loss = lse2 * LN2 - t
    rows = tl.load(Rows + slots, mask=in_range, other=0)
    tl.store(Loss + rows, tl.where(valid, loss, 0.0), mask=in_range)
    tl.store(Lse + rows, tl.where(valid, lse2, 0.0), mask=in_range)


def lce_fwd(hidden, weight, bias, targets, ignore_index: int, cfg: LossConfig, n_counted: int | None = None):
    """hidden (T, H), weight (V, H), bias (V,) or None, targets (T,) integer; ``n_counted``: how
    many targets are not ``ignore_index``, if the caller knows (the grid then covers only the
    counted rows' tiles and the vocab splits are sized for them; else T bounds it).

    Returns ``loss`` (T,) float32 (0 where ``targets == ignore_index``) and ``lse`` (T,) float32
    in log2 units, which is what ``triton_bwd`` expects."""
    T, H = hidden.shape
    V = weight.shape[0]
    loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
    if T == 0:
        return loss, lse
    rows, count, slot_targets = compact_rows(targets, ignore_index)
    k = cfg.fwd
    rows_bound = T if n_counted is None else max(1, min(int(n_counted), T))
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
    splits, split_cols = fwd_splits(cfg, rows_bound, V, sms)
    # the partial results of the counted slots only (rows_bound of them at most)
    part = torch.empty(3, splits, rows_bound, dtype=torch.float32, device=hidden.device)
    b = bias.contiguous() if bias is not None else weight  # never read without HAS_BIAS
    _lce_fwd_kernel[(triton.cdiv(rows_bound, k.block_m), splits)](
        hidden, weight, b, rows, slot_targets, count, part,
        *hidden.stride(), *weight.stride(),
        rows_bound, V, H, (V // k.block_v) * k.block_v, split_cols, splits,
        BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h,
        HAS_BIAS=bias is not None, EVEN_H=(H % k.block_h == 0), DOT_PRECISION=dot_precision(hidden.dtype),
        num_warps=k.num_warps, num_stages=k.num_stages,
    )
    _lce_combine_kernel[(triton.cdiv(T, _COMBINE_BLOCK),)](
        part, rows, count, loss, lse, T, rows_bound, splits, BLOCK=_COMBINE_BLOCK,
    )
    return loss, lse
