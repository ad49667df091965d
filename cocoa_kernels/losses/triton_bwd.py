"""Backward of the fused linear cross-entropy: d_hidden, d_weight and d_bias, and the launcher.

``d z = g * (softmax(z) - onehot(target))`` is recomputed tile by tile from the forward's
log-sum-exp; no (rows x vocab) buffer exists. Two kernels, no atomics, so every gradient is
bitwise deterministic run to run:

1. ``_lce_bwd_dh_kernel``: grid (row tiles of the compaction, vocab splits). A program owns its
   rows' fp32 d_hidden accumulator in its split's slice of a (splits, T, H) buffer and walks its
   vocab range: per vocab tile it recomputes the [BLOCK_M, BLOCK_V] logits (BLOCK_H chunks),
   forms d z, then adds ``d z @ weight[cols]`` chunk by chunk into the accumulator
   (read-modify-write of memory no other program touches). The splits are summed in a fixed order.
2. ``_lce_bwd_dw_kernel``: grid (vocab tiles). A program owns BLOCK_V rows of the fp32 d_weight
   accumulator and of d_bias and walks the counted rows in BLOCK_M tiles: recompute, d z, then
   ``d z^T @ hidden[rows]`` chunk by chunk into its accumulator; d_bias sums d z in registers.

Rows that do not count are never loaded or multiplied; slots past the device-side count load
``lse = +inf`` and ``g = 0``, so their d z is exactly 0 even in a partly filled tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compact import compact_rows
from .config import LossConfig, dh_splits
from .triton_common import add_bias, dot_precision, load_chunk, logits_tile, softmax_grad, store_chunk


@triton.jit
def _dh_inner(
    h_ptrs, dh_ptrs, Weight, Bias, slot_ok, tgt, lse2, g, offs_v, offs_h,
    v_start, v_end, V, H, stride_wv, stride_wh, stride_hh,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_V: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < V
        w_base = Weight + cols.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh
        z = logits_tile(h_ptrs, w_base, slot_ok, col_ok, offs_h, H, stride_hh, stride_wh,
                        BLOCK_M, BLOCK_V, BLOCK_H, MASK_V, EVEN_H, DOT_PRECISION)
        z = add_bias(z, Bias, cols, col_ok, HAS_BIAS, MASK_V)
        dz = softmax_grad(z, cols, col_ok, tgt, lse2, g, MASK_V).to(Weight.dtype.element_ty)
        w_ptrs = w_base
        acc_ptrs = dh_ptrs
        for h0 in range(0, H, BLOCK_H):
            w = load_chunk(w_ptrs, col_ok, offs_h, h0, H, MASK_V, EVEN_H)
            acc = load_chunk(acc_ptrs, slot_ok, offs_h, h0, H, True, EVEN_H)
            # [BLOCK_M, BLOCK_V] @ [BLOCK_V, BLOCK_H] -> [BLOCK_M, BLOCK_H]
            acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
            store_chunk(acc_ptrs, acc, slot_ok, offs_h, h0, H, EVEN_H)
            w_ptrs += BLOCK_H * stride_wh
            acc_ptrs += BLOCK_H


@triton.jit
def _lce_bwd_dh_kernel(
    Hidden, Weight, Bias, Rows, SlotTargets, Count, Lse, DLoss, DH,
    stride_ht, stride_hh, stride_wv, stride_wh,
    T, V, H, V_FULL, SPLIT_COLS,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Hidden: (T, H), Weight: (V, H), any strides; Bias: (V,) contiguous or unused.
    Rows, SlotTargets: (T,) int32 compaction; Count: (1,) int32. Lse: (T,) float32 in log2
    units and DLoss: (T,) float32, both indexed by row. DH: (splits, T, H) float32 contiguous,
    zero-filled; program (i, s) adds into DH[s, rows of tile i, :] only."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(Count)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < count
    rows = tl.load(Rows + slots, mask=slot_ok, other=0).to(tl.int64)
    tgt = tl.load(SlotTargets + slots, mask=slot_ok, other=-1)
    lse2 = tl.load(Lse + rows, mask=slot_ok, other=float("inf"))
    g = tl.load(DLoss + rows, mask=slot_ok, other=0.0)
    offs_v = tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = Hidden + rows[:, None] * stride_ht + offs_h[None, :] * stride_hh
    dh_ptrs = DH + (pid_s.to(tl.int64) * T + rows[:, None]) * H + offs_h[None, :]

    v_lo = pid_s * SPLIT_COLS
    v_hi = tl.minimum(v_lo + SPLIT_COLS, V)
    v_hi = tl.where(pid_m * BLOCK_M < count, v_hi, v_lo)  # a tile past the counted rows does nothing
    _dh_inner(h_ptrs, dh_ptrs, Weight, Bias, slot_ok, tgt, lse2, g, offs_v, offs_h,
              v_lo, tl.minimum(v_hi, V_FULL), V, H, stride_wv, stride_wh, stride_hh,
              BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, False, EVEN_H, DOT_PRECISION)
    _dh_inner(h_ptrs, dh_ptrs, Weight, Bias, slot_ok, tgt, lse2, g, offs_v, offs_h,
              tl.maximum(v_lo, V_FULL), v_hi, V, H, stride_wv, stride_wh, stride_hh,
              BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, True, EVEN_H, DOT_PRECISION)


@triton.jit
def _lce_bwd_dw_kernel(
    Hidden, Weight, Bias, Rows, SlotTargets, Count, Lse, DLoss, DW, DB,
    stride_ht, stride_hh, stride_wv, stride_wh,
    V, H,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_V: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Same inputs as the d_hidden kernel. DW: (V, H) float32 contiguous, zero-filled; program j
    adds into rows ``[j * BLOCK_V, (j + 1) * BLOCK_V)`` only. DB: (V,) float32, written whole
    (when HAS_BIAS). MASK_V: V is not a multiple of BLOCK_V (every program then masks its
    vocab rows; only the last one has any past V)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    w_ptrs = Weight + cols64[:, None] * stride_wv + offs_h[None, :] * stride_wh
    dw_base = DW + cols64[:, None] * H + offs_h[None, :]
    count = tl.load(Count)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        slots = m0 + offs_m
        slot_ok = slots < count
        rows = tl.load(Rows + slots, mask=slot_ok, other=0).to(tl.int64)
        tgt = tl.load(SlotTargets + slots, mask=slot_ok, other=-1)
        lse2 = tl.load(Lse + rows, mask=slot_ok, other=float("inf"))
        g = tl.load(DLoss + rows, mask=slot_ok, other=0.0)
        h_base = Hidden + rows[:, None] * stride_ht + offs_h[None, :] * stride_hh
        z = logits_tile(h_base, w_ptrs, slot_ok, col_ok, offs_h, H, stride_hh, stride_wh,
                        BLOCK_M, BLOCK_V, BLOCK_H, MASK_V, EVEN_H, DOT_PRECISION)
        z = add_bias(z, Bias, cols, col_ok, HAS_BIAS, MASK_V)
        dz = softmax_grad(z, cols, col_ok, tgt, lse2, g, MASK_V)
        db += tl.sum(dz, axis=0)
        dz_t = tl.trans(dz.to(Hidden.dtype.element_ty))
        h_ptrs = h_base
        acc_ptrs = dw_base
        for h0 in range(0, H, BLOCK_H):
            h = load_chunk(h_ptrs, slot_ok, offs_h, h0, H, True, EVEN_H)
            acc = load_chunk(acc_ptrs, col_ok, offs_h, h0, H, MASK_V, EVEN_H)
            # [BLOCK_V, BLOCK_M] @ [BLOCK_M, BLOCK_H] -> [BLOCK_V, BLOCK_H]
            acc = tl.dot(dz_t, h, acc, input_precision=DOT_PRECISION)
            store_chunk(acc_ptrs, acc, col_ok, offs_h, h0, H, EVEN_H)
            h_ptrs += BLOCK_H * stride_hh
            acc_ptrs += BLOCK_H
    if HAS_BIAS:
        tl.store(DB + cols, db, mask=col_ok)


def lce_bwd(d_loss, hidden, weight, bias, targets, lse, ignore_index: int, cfg: LossConfig):
    """Gradients of ``sum(d_loss * loss)`` where ``loss, lse = triton_fwd.lce_fwd(...)``.

    d_loss: (T,) float, the upstream gradient of each row's loss (ignored rows: any value).
    Returns ``d_hidden`` (T, H), ``d_weight`` (V, H) (both contiguous, in the inputs' dtype) and
    ``d_bias`` (V,) in bias's dtype, or an empty tensor when there is no bias."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else weight  # never read without HAS_BIAS
    d_loss = d_loss.to(torch.float32).contiguous()
    precision = dot_precision(hidden.dtype)
    if T == 0:
        d_bias = torch.zeros(V if has_bias else 0, dtype=hidden.dtype, device=dev)
        return hidden.new_zeros(T, H), weight.new_zeros(V, H), d_bias
    rows, count, slot_targets = compact_rows(targets, ignore_index)

    k = cfg.dh
    splits, split_cols = dh_splits(cfg, T, V, dev)
    dh = torch.zeros(splits, T, H, dtype=torch.float32, device=dev)  # accumulator: zeros
    _lce_bwd_dh_kernel[(triton.cdiv(T, k.block_m), splits)](
        hidden, weight, b, rows, slot_targets, count, lse, d_loss, dh,
        *hidden.stride(), *weight.stride(),
        T, V, H, (V // k.block_v) * k.block_v, split_cols,
        BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h,
        HAS_BIAS=has_bias, EVEN_H=(H % k.block_h == 0), DOT_PRECISION=precision,
        num_warps=k.num_warps, num_stages=k.num_stages,
    )
    d_hidden = (dh.sum(0) if splits > 1 else dh.squeeze(0)).to(hidden.dtype)

    k = cfg.dw
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev)  # accumulator: zeros
    db = torch.empty(V if has_bias else 0, dtype=torch.float32, device=dev)
    _lce_bwd_dw_kernel[(triton.cdiv(V, k.block_v),)](
        hidden, weight, b, rows, slot_targets, count, lse, d_loss, dw, db,
        *hidden.stride(), *weight.stride(),
        V, H,
        BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h,
        HAS_BIAS=has_bias, MASK_V=(V % k.block_v != 0), EVEN_H=(H % k.block_h == 0), DOT_PRECISION=precision,
        num_warps=k.num_warps, num_stages=k.num_stages,
    )
    d_bias = db.to(bias.dtype) if has_bias else torch.empty(0, dtype=hidden.dtype, device=dev)
    return d_hidden, dw.to(weight.dtype), d_bias
