"""Pieces shared by the forward and backward attention kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the softmax scale is folded into one multiply


@triton.jit
def load_bounds(Bounds, b, tile, NUM_TILES):
    """The four loop bounds ``mask.query_tile_bounds``/``key_tile_bounds`` computed for a tile."""
    ptr = Bounds + (b * NUM_TILES + tile) * 4
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)


@triton.jit
def load_tile(ptrs, rows, offs_d, N, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; masks only what may fall outside (rows >= N, padded dims)."""
    if MASK_ROWS:
        mask = rows[:, None] < N
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < D)
        return tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def score_tile(q, k_ptrs, v_ptrs, cols, offs_d, lo, hi, N, D, scale_log2,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Load the K and V tiles at ``cols`` and score ``q`` against K in log2 units:
    -inf where a row's interval excludes the key (masked tiles only). Shared by forward and dQ."""
    k = load_tile(k_ptrs, cols, offs_d, N, D, MASKED, EVEN_D)
    v = load_tile(v_ptrs, cols, offs_d, N, D, MASKED, EVEN_D)
    # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s, k, v


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 products (about fp32 accuracy) instead of silent single-pass TF32;
    # 16-bit inputs ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"
