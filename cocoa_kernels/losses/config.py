"""Tile sizes, warps, vocab splits and the backward's chunk size for the fused linear cross-entropy.

Both kernels work on a [BLOCK_M rows, BLOCK_V vocab] logit tile, accumulated over the hidden dim
in BLOCK_H chunks (so H up to 8192 never sits whole in registers).

GPU table for 16-bit inputs (Hopper; starting points, to be re-measured on the H200 with
``bench/``):

- forward ``128 x 128 x 64``, 8 warps, 3 stages: a plain GEMM tile (no register spills on sm_90,
  checked with ``ptxas -v``); the vocab is split over several programs per row tile
  (``fwd_splits``), the split count chosen from the counted rows (the validation's host sync
  brings their number back) so that the last wave of programs is full: 33 splits for the 6,554
  counted rows of the goal workload on 132 SMs.
- logit gradient: the forward's tile. The backward's probabilities ``exp(z - lse)`` are only as
  accurate as the recomputed ``z`` agrees with the ``z`` the forward summed into ``lse``; with
  the same tile (above all the same BLOCK_H chunks of the reduction) the two are the same bits
  and the rounding cancels, which matters for large logits in fp32 (a test has logits of std
  60). The exact backward's two big products run in cuBLAS (see ``triton_bwd``).
- block-sparse products (the filtered backward, ``grad_filter_eps``): the logit-gradient tile's
  rows and columns (a tile is what the filter keeps or skips), ``BLOCK_H`` of the output wide.
- ``workspace_bytes``: the budget ``workspace.vocab_chunk`` fits the backward's workspace into
  (``workspace.backward_workspace_bytes``): 64 MB on a GPU, the figure the goal workload
  (16,384 tokens, 40% counted, H 1,536, V 151,936) is held to.

fp32 inputs use exact fp32 products (``input_precision="ieee"``: no tensor cores), which spill
at those sizes; they get ``64 x 64 x 16`` tiles. fp32 is the precise path, not the fast one.

The interpreter gets small tiles (every tl.dot dim >= 16), fixed splits and a tiny workspace budget,
so that tests at V ~ 1000, H ~ 80 already cover partial vocab tiles, partial hidden chunks, the
split combine and several backward chunks with a partial last one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._pinned import Pinned


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows (compacted tokens) per tile
    block_v: int  # vocab entries per tile
    block_h: int  # hidden-dim chunk of the inner loop
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class LossConfig:
    fwd: KernelConfig
    dz: KernelConfig  # the backward's logit-gradient kernel
    products: KernelConfig  # the filtered backward's block-sparse products (dz's block_m, block_v)
    fwd_splits: int | None = None  # vocab splits per row tile in the forward; None: from the grid
    workspace_bytes: int = 64_000_000  # the backward's workspace budget (see workspace.vocab_chunk)

    def __post_init__(self):
        # the products skip exactly the tiles the logit-gradient kernel flags
        if (self.products.block_m, self.products.block_v) != (self.dz.block_m, self.dz.block_v):
            raise ValueError(f"LossConfig: products tile {self.products} must match dz's block_m, block_v {self.dz}")


_INTERPRETER = LossConfig(
    fwd=KernelConfig(16, 128, 64),
    dz=KernelConfig(16, 128, 64),
    products=KernelConfig(16, 128, 64),
    fwd_splits=3,
    workspace_bytes=64 * 1024,
)

_GPU_16BIT = LossConfig(
    fwd=KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    dz=KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    products=KernelConfig(128, 128, 128, num_warps=8, num_stages=3),
)
_GPU_FP32 = LossConfig(
    fwd=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
    dz=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
    products=KernelConfig(64, 64, 32, num_warps=8, num_stages=2),
)

# Forward programs resident per SM at once: one, as ptxas gives the 16-bit forward tile 255
# registers a thread at 8 warps (tests/sm90_compile.py). The split search below fills waves of
# SMs x this many programs.
_FWD_PROGRAMS_PER_SM = 1

_pinned: Pinned[LossConfig] = Pinned()


def pick_config(on_gpu: bool, dtype: torch.dtype) -> LossConfig:
    if _pinned.config is not None:
        return _pinned.config
    if not on_gpu:
        return _INTERPRETER
    return _GPU_FP32 if dtype == torch.float32 else _GPU_16BIT


def fwd_splits(cfg: LossConfig, rows: int, V: int, sms: int) -> tuple[int, int]:
    """(splits, vocab columns per split) for the forward over ``rows`` counted rows (known on the
    host from the validation's sync) on ``sms`` SMs: ``cfg.fwd_splits`` if the config pins them,
    else the split count s that minimises the forward's makespan in vocab-tile steps,
    ``waves(row_tiles * s) * ceil(vocab_tiles / s)``, with waves of SMs x ``_FWD_PROGRAMS_PER_SM``
    programs, so the last wave is as full as the tiles allow (the smallest such s, to keep the
    split combine short). Splits are whole vocab tiles and never empty."""
    row_tiles = max(1, -(-rows // cfg.fwd.block_m))
    vocab_tiles = -(-V // cfg.fwd.block_v)
    splits = cfg.fwd_splits
    if splits is None:
        splits = _best_splits(row_tiles, vocab_tiles, max(1, sms) * _FWD_PROGRAMS_PER_SM)
    splits = max(1, min(splits, vocab_tiles))
    split_cols = -(-vocab_tiles // splits) * cfg.fwd.block_v
    return -(-V // split_cols), split_cols


def fwd_makespan(row_tiles: int, vocab_tiles: int, splits: int, slots: int) -> int:
    """Vocab-tile steps the busiest SM takes: waves of ``slots`` programs, ceil(tiles / s) each."""
    return -(-row_tiles * splits // slots) * -(-vocab_tiles // splits)


@functools.lru_cache(maxsize=256)
def _best_splits(row_tiles: int, vocab_tiles: int, slots: int) -> int:
    return min(range(1, vocab_tiles + 1), key=lambda s: (fwd_makespan(row_tiles, vocab_tiles, s, slots), s))


# Pin every launch inside a ``with use_config(config):`` block to ``config`` (tests, tuning).
use_config = _pinned.use
