"""Pieces shared by the forward and backward linear cross-entropy kernels.

Every kernel works on the same [BLOCK_M rows, BLOCK_V vocab] tile of logits
``z = hidden[rows] @ weight[cols].T (+ bias[cols])``, recomputed by ``logits_tile`` in BLOCK_H
chunks of the hidden dim with an fp32 accumulator; no kernel keeps a whole hidden row in registers.
Rows are gathered through the compaction permutation, so a row pointer tile has one base per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products (no silent TF32); 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_chunk(ptrs, row_ok, offs_h, h0, H, MASK_ROWS: tl.constexpr, EVEN_H: tl.constexpr):
    """Load a [rows, BLOCK_H] chunk at hidden offset ``h0``; masks only what may fall outside."""
    if MASK_ROWS:
        mask = row_ok[:, None]
        if not EVEN_H:
            mask = mask & ((h0 + offs_h) < H)[None, :]
        return tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_H:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=((h0 + offs_h) < H)[None, :], other=0.0)


@triton.jit
def logits_tile(
    h_ptrs, w_ptrs, slot_ok, col_ok, offs_h, H, stride_hh, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    MASK_V: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 logits [BLOCK_M, BLOCK_V] without bias.

    h_ptrs: [BLOCK_M, BLOCK_H] pointers to the first hidden chunk of the gathered rows;
    w_ptrs: [BLOCK_V, BLOCK_H] pointers to the first chunk of the weight rows ``cols``.
    Rows past the counted ones (``~slot_ok``) load zeros; so do vocab rows >= V when MASK_V.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = load_chunk(h_ptrs, slot_ok, offs_h, h0, H, True, EVEN_H)
        w = load_chunk(w_ptrs, col_ok, offs_h, h0, H, MASK_V, EVEN_H)
        # [BLOCK_M, BLOCK_H] @ [BLOCK_H, BLOCK_V] -> [BLOCK_M, BLOCK_V]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    return acc


@triton.jit
def add_bias(z, Bias, cols, col_ok, HAS_BIAS: tl.constexpr, MASK_V: tl.constexpr):
    if HAS_BIAS:
        if MASK_V:
            b = tl.load(Bias + cols, mask=col_ok, other=0.0)
        else:
            b = tl.load(Bias + cols)
        z += b.to(tl.float32)[None, :]
    return z


@triton.jit
def softmax_minus_onehot(z, cols, col_ok, tgt, lse2, MASK_V: tl.constexpr):
    """``softmax(z) - onehot(tgt)`` for a [BLOCK_M, BLOCK_V] tile, fp32: the logits' gradient
    before the upstream factor, and what the backward's filter measures.

    ``lse2`` is the row's log-sum-exp in log2 units (+inf for rows that do not count, which
    makes their probabilities exactly 0); ``tgt`` the row's target (-1 for rows that do not count).
    """
    p = tl.math.exp2(z * LOG2E - lse2[:, None])
    if MASK_V:
        p = tl.where(col_ok[None, :], p, 0.0)
    return p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
