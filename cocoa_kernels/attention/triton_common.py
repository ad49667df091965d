"""Pieces shared by the forward and backward attention kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..mask import tile_loop_iterations

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): scale * LOG2E is the one factor of the exponent's FFMA


@triton.jit
def load_bounds(Bounds, b, tile, NUM_TILES):
    """The four loop bounds ``mask.query_tile_bounds``/``key_tile_bounds`` computed for a tile."""
    ptr = Bounds + (b * NUM_TILES + tile) * 4
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)


@triton.jit
def mask_if(flag, mask):
    """``mask`` where the scalar ``flag`` holds, all False elsewhere: a block mask predicated on a
    scalar condition. Not ``flag & mask``: triton 3.9's interpreter broadcasts a scalar comparison
    with int32 data, which its masked loads and stores reject ('mask has unsupported dtype');
    compiled, both forms are one predicate."""
    return tl.where(flag, mask, False)


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
def score_tile(q, k_ptrs, v_ptrs, cols, offs_d, lo, hi, N, D,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Load the K and V tiles at ``cols`` and return the raw scores ``q @ k^T`` (unscaled), -inf
    where a row's interval excludes the key (masked tiles only). Shared by forward and dQ.

    The scale is left to the caller's exponent, ``exp2(qk * scale_log2 - m)``: one FFMA per score
    instead of a multiply here and a subtraction there. ``scale_log2 > 0`` (``attention()`` checks
    the scale), so -inf stays -inf and ``max(qk) * scale_log2 == max(qk * scale_log2)``."""
    k = load_tile(k_ptrs, cols, offs_d, N, D, MASKED, EVEN_D)
    v = load_tile(v_ptrs, cols, offs_d, N, D, MASKED, EVEN_D)
    # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    return qk, k, v


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, scale_log2, DOT_PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax, from the raw (masked) scores ``qk``: the
    running max in scaled log2 units, the probabilities in one FFMA + EX2 per score (the
    expression the backward recomputes them with, ``exp2(qk * scale_log2 - lse)``), and the
    rescaled accumulator. ``scale_log2 > 0`` (``attention()`` checks the scale), so
    ``max(qk) * scale_log2 == max(qk * scale_log2)``. Shared by the pointer and TMA forwards."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale_log2)
    p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # [BLOCK_M, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 products (about fp32 accuracy) instead of silent single-pass TF32;
    # 16-bit inputs ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class TileSchedule:
    """What one launch runs, in the order it runs it. Tile ``t`` of a grid of ``copies`` x
    ``num_tiles`` tiles is ``(copy, tile) = divmod(t, num_tiles)``, where a copy is a (batch,
    head[, head split], loop split) and ``tile`` indexes ``bounds[batch]``; program id ``p`` runs
    tile ``order[p]``. With ``loop_splits`` = S > 1 every (batch, head) tile is run by S programs,
    program ``copy % S`` taking that piece of the tile's loop iterations (:func:`loop_piece`).

    ``order`` is heavy first: programs take tiles in decreasing order of work, so the long ones
    start in the first wave and the short ones fill the gaps at the end (a longest-processing-
    time-first list schedule; launched in grid order, a causal row's longest query tiles would
    start last and a bridge's three sizes of key tiles would be dealt out blindly).
    ``work`` holds each program's loop iterations (per tile index, not per program); the launchers
    use it only to build ``order``, and ``bench/work_model.py`` to predict the schedule."""

    bounds: torch.Tensor  # (B, num_tiles, 4) int32, from mask.query_tile_bounds / key_tile_bounds
    work: torch.Tensor  # (B * copies_per_batch * loop_splits * num_tiles,) int64
    order: torch.Tensor  # (same,) int32: a permutation of the tile indices
    loop_splits: int = 1

    @property
    def num_tiles(self) -> int:
        return self.bounds.shape[1]

    @property
    def programs(self) -> int:
        return self.order.numel()


# Which of a tile's three loops (masked edge, full tiles, masked edge) a kernel runs: all of them,
# or (the warp-specialised forward's two passes, ``triton_fwd_ws``) the middle one or the edges.
_LOOPS = {"all": (0, 1, 2), "full": (1,), "edges": (0, 2)}


def tile_schedule(bounds: torch.Tensor, step: int, copies_per_batch: int, iterations_per_step: int = 1,
                  loop_splits: int = 1, loops: str = "all") -> TileSchedule:
    """The schedule of a kernel whose programs walk ``bounds`` in loops of ``step``: every tile is
    repeated for ``copies_per_batch`` (heads, head splits) of its batch row, split into
    ``loop_splits`` pieces of its loop iterations, and costs ``iterations_per_step`` loop bodies
    per step (the heads a dK/dV program loops over). ``loops``: "all" three loops, or only the
    "full" (middle) one or the masked "edges", for a pass that runs just those."""
    if loop_splits < 1:
        raise ValueError(f"loop_splits must be >= 1, got {loop_splits}")
    if loops not in _LOOPS or (loops != "all" and loop_splits != 1):
        raise ValueError(f"loops must be one of {tuple(_LOOPS)} (only 'all' with loop_splits > 1), got {loops!r}")
    B, tiles, _ = bounds.shape
    if loops == "all":
        n = tile_loop_iterations(bounds, step)  # (B, tiles)
    else:
        n = sum(tile_loop_iterations(bounds[..., i : i + 2], step) for i in _LOOPS[loops])
    s = torch.arange(loop_splits, device=bounds.device)[None, :, None]
    pieces = (s + 1) * n[:, None, :] // loop_splits - s * n[:, None, :] // loop_splits  # as loop_piece splits
    per_program = pieces * iterations_per_step  # (B, loop_splits, tiles)
    work = per_program[:, None].expand(B, copies_per_batch, loop_splits, tiles).reshape(-1)
    # On the device, from the bounds already there: no host synchronisation. Stable, so equal
    # tiles keep grid order (neighbouring heads of one K/V head stay together for the L2).
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    return TileSchedule(bounds, work, order, loop_splits)


@triton.jit
def scheduled_tile(Order, NUM_TILES):
    """(tile, copy) this program runs: ``Order[program_id]`` split as in :class:`TileSchedule`."""
    t = tl.load(Order + tl.program_id(0))
    return t % NUM_TILES, t // NUM_TILES


@triton.jit
def _piece_of_loop(begin, end, step, j0, j1):
    """Iterations [j0, j1) (clamped) of ``range(begin, end, step)``, as a (begin, end) range."""
    n = tl.cdiv(end - begin, step)
    j0 = tl.minimum(tl.maximum(j0, 0), n)
    j1 = tl.minimum(tl.maximum(j1, j0), n)
    return begin + j0 * step, tl.minimum(begin + j1 * step, end)


@triton.jit
def loop_piece(start, mid0, mid1, end, step, piece, PIECES):
    """Piece ``piece`` of ``PIECES`` of the three loops ``[start, mid0)`` (masked), ``[mid0, mid1)``
    (unmasked), ``[mid1, end)`` (masked), taken as one run of ``n`` iterations: the piece owns
    iterations ``[piece * n // PIECES, (piece + 1) * n // PIECES)``, the count ``tile_schedule``
    charges it. Returns the three loops' new bounds; with ``PIECES == 1`` they are unchanged."""
    n0 = tl.cdiv(mid0 - start, step)
    n1 = tl.cdiv(mid1 - mid0, step)
    n = n0 + n1 + tl.cdiv(end - mid1, step)
    i0 = piece * n // PIECES
    i1 = (piece + 1) * n // PIECES
    a0, a1 = _piece_of_loop(start, mid0, step, i0, i1)
    b0, b1 = _piece_of_loop(mid0, mid1, step, i0 - n0, i1 - n0)
    c0, c1 = _piece_of_loop(mid1, end, step, i0 - n0 - n1, i1 - n0 - n1)
    return a0, a1, b0, b1, c0, c1
