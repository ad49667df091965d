"""The backward's workspace: the formula for its size, and the vocab chunk width chosen from it.

The backward (``triton_bwd.lce_bwd``) allocates, besides its outputs d_hidden (T, H), d_weight
(V, H) and d_bias (V,):

- ``n x H x 4``: the fp32 d_hidden rows of the n counted rows, accumulated over the vocab
  chunks (when d_hidden is wanted). The gathered counted rows of hidden (``n x H`` in the inputs'
  dtype), which both products read, then live in the first n rows of the d_hidden output until the
  last chunk, so they cost nothing extra; without d_hidden they are a buffer of their own.
- ``n x C x e``: one chunk of the logits' gradient, C vocab columns wide, in the inputs' dtype
  (e bytes an element).
- ``C x H x 4``: the fp32 product that becomes a chunk's d_weight rows, for 16-bit inputs on the
  exact path (cuBLAS writes fp32, rounded once into d_weight); fp32 inputs and the filtered path
  write d_weight directly. ``C x 4``: the chunk's fp32 d_bias sums.
- ``tiles x 32``: the filtered path's per-tile liveness flags and their two orderings.
- ``48 x T + 16 x n``: the compaction's index vectors and sort temporaries (a bound, measured on
  the CPU at 25 x T), the counted rows' indices, log-sum-exp, upstream gradient and targets.

After the last chunk the fp32 d_hidden rows are rounded into d_hidden in slices no larger than
the chunk's dz, which has been freed by then, so the loop's peak is the backward's peak.

The formula holds where PyTorch multiplies 16-bit matrices into an fp32 result
(``torch.mm``/``torch.addmm`` with ``out_dtype``, CUDA, PyTorch 2.8 and later) and for fp32
inputs everywhere; the interpreter's 16-bit products upcast their operands instead (CPU tests only).
"""

from __future__ import annotations

import torch

from .config import LossConfig

_COMPACTION_BYTES_PER_ROW = 48  # rows, slot targets, the sort's keys/values/temporaries (bound)
_COUNTED_BYTES_PER_ROW = 16  # int64 row index + fp32 lse + fp32 upstream gradient
_FLAG_BYTES_PER_TILE = 32  # int32 flag + two int64 argsort results, int32 copies


def backward_workspace_bytes(
    n_rows: int, T: int, V: int, H: int, dtype: torch.dtype, chunk: int, *,
    wanted=(True, True, True), filtered: bool = False, block_m: int = 128, block_v: int = 128,
) -> int:
    """Peak bytes the backward allocates beyond its outputs, for ``n_rows`` counted rows of T,
    vocab V, hidden H, inputs of ``dtype``, vocab chunks of ``chunk`` columns; ``wanted`` says
    which of (d_hidden, d_weight, d_bias) are computed. See the module docstring for the terms."""
    want_h, want_w, want_b = wanted
    e = torch.empty(0, dtype=dtype).element_size()
    small = _COMPACTION_BYTES_PER_ROW * T + _COUNTED_BYTES_PER_ROW * n_rows
    if n_rows == 0 or not any(wanted):
        return small
    fixed = n_rows * H * (4 if want_h else e)
    C = min(chunk, V)
    per_chunk = n_rows * C * e
    if want_w and e < 4 and not filtered:
        per_chunk += C * H * 4
    if want_b:
        per_chunk += C * 4
    if filtered:
        per_chunk += -(-n_rows // block_m) * -(-C // block_v) * _FLAG_BYTES_PER_TILE
    return small + fixed + per_chunk


def vocab_chunk(cfg: LossConfig, n_rows: int, T: int, V: int, H: int, dtype: torch.dtype, *,
                filtered: bool = False) -> int:
    """Vocab columns C per backward chunk: whole ``dz`` tiles (or the whole vocab), the widest
    that keeps ``backward_workspace_bytes`` within ``cfg.workspace_bytes`` with every gradient
    wanted. (It does not depend on which gradients autograd asks for, so that a frozen LM head
    leaves d_hidden's chunking, and so its bits, unchanged; fewer gradients need less.)

    Never narrower than H / 2 (rounded up to a tile): every chunk also reads and writes the
    n x H fp32 d_hidden rows (8 n H bytes), and at C >= H / 2 that stays within ~3x the chunk's
    own dz traffic. Where the fixed part (those rows) leaves too little of the budget, as with
    very many counted rows, the chunk sits at that floor and the workspace exceeds the budget,
    growing like the d_hidden rows themselves."""
    tile = cfg.dz.block_v
    floor = max(1, -(-(H // 2) // tile)) * tile
    if floor >= V:
        return V

    def size(c):
        return backward_workspace_bytes(n_rows, T, V, H, dtype, c, filtered=filtered,
                                        block_m=cfg.dz.block_m, block_v=tile)

    if size(V) <= cfg.workspace_bytes:
        return V
    # size() grows with C: the widest fitting number of tiles, by bisection over tile counts
    lo, hi = floor // tile, -(-V // tile)
    if size(lo * tile) > cfg.workspace_bytes:
        return floor
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid * tile) <= cfg.workspace_bytes else (lo, mid)
    return min(lo * tile, V)
