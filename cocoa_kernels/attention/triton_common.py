"""Pieces shared by the forward and backward attention kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..mask import tile_loop_iterations

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


@dataclass(frozen=True)
class TileSchedule:
    """What one launch runs, in the order it runs it. Tile ``t`` of a grid of ``copies`` x
    ``num_tiles`` tiles is ``(copy, tile) = divmod(t, num_tiles)``, where a copy is a (batch,
    head[, split]) and ``tile`` indexes ``bounds[batch]``; program id ``p`` runs tile ``order[p]``.

    ``order`` is heavy first: programs take tiles in decreasing order of work, so the long ones
    start in the first wave and the short ones fill the gaps at the end (a longest-processing-
    time-first list schedule; launched in grid order, a causal row's longest query tiles would
    start last and a bridge's three sizes of key tiles would be dealt out blindly).
    ``work`` holds each tile's loop iterations (per tile index, not per program); the launchers
    use it only to build ``order``, and ``bench/work_model.py`` to predict the schedule."""

    bounds: torch.Tensor  # (B, num_tiles, 4) int32, from mask.query_tile_bounds / key_tile_bounds
    work: torch.Tensor  # (B * copies_per_batch * num_tiles,) int64
    order: torch.Tensor  # (same,) int32: a permutation of the tile indices

    @property
    def num_tiles(self) -> int:
        return self.bounds.shape[1]

    @property
    def programs(self) -> int:
        return self.order.numel()


def tile_schedule(bounds: torch.Tensor, step: int, copies_per_batch: int, iterations_per_step: int = 1) -> TileSchedule:
    """The schedule of a kernel whose programs walk ``bounds`` in loops of ``step``: every tile is
    repeated for ``copies_per_batch`` (heads, splits) of its batch row, and costs
    ``iterations_per_step`` loop bodies per step (the heads a dK/dV program loops over)."""
    B, tiles, _ = bounds.shape
    per_tile = tile_loop_iterations(bounds, step) * iterations_per_step  # (B, tiles)
    work = per_tile[:, None, :].expand(B, copies_per_batch, tiles).reshape(-1)
    # On the device, from the bounds already there: no host synchronisation. Stable, so equal
    # tiles keep grid order (neighbouring heads of one K/V head stay together for the L2).
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    return TileSchedule(bounds, work, order)


@triton.jit
def scheduled_tile(Order, NUM_TILES):
    """(tile, copy) this program runs: ``Order[program_id]`` split as in :class:`TileSchedule`."""
    t = tl.load(Order + tl.program_id(0))
    return t % NUM_TILES, t // NUM_TILES
