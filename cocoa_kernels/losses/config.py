"""Tile sizes, warps, vocab splits and the backward's chunk size for the fused linear cross-entropy.

Both kernels work on a [BLOCK_M rows, BLOCK_V vocab] logit tile, accumulated over the hidden dim
in BLOCK_H chunks (so H up to 8192 never sits whole in registers).

GPU table for 16-bit inputs (Hopper; starting points, to be re-measured on the H200 with
``bench/``):

- forward ``128 x 128 x 64``, 8 warps, 3 stages: a plain GEMM tile (no register spills on sm_90,
  checked with ``ptxas -v``); the vocab is split over several programs per row tile
  (``fwd_splits``) so that ~6.5k counted rows still fill 132 SMs.
- logit gradient: the forward's tile. The backward's probabilities ``exp(z - lse)`` are only as
  accurate as the recomputed ``z`` agrees with the ``z`` the forward summed into ``lse``; with
  the same tile (above all the same BLOCK_H chunks of the reduction) the two are the same bits
  and the rounding cancels, which matters for large logits in fp32 (a test has logits of std
  60). The backward's two big products run in cuBLAS (see ``triton_bwd``).
- ``dz_buffer_elems``: the backward's chunk of logit gradients holds at most this many elements
  (64 Mi: 128 MiB in bf16); the chunk width follows from the number of counted rows.

fp32 inputs use exact fp32 products (``input_precision="ieee"``: no tensor cores), which spill
at those sizes; they get ``64 x 64 x 16`` tiles. fp32 is the precise path, not the fast one.

The interpreter gets small tiles (every tl.dot dim >= 16), fixed splits and a tiny dz buffer, so
that tests at V ~ 1000, H ~ 80 already cover partial vocab tiles, partial hidden chunks, the split
combine and several backward chunks with a partial last one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


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
    fwd_splits: int | None = None  # vocab splits per row tile in the forward; None: from the grid
    dz_buffer_elems: int = 1 << 26  # most logit-gradient elements the backward holds at once


_INTERPRETER = LossConfig(
    fwd=KernelConfig(16, 128, 64),
    dz=KernelConfig(16, 128, 64),
    fwd_splits=3,
    dz_buffer_elems=8192,
)

_GPU_16BIT = LossConfig(
    fwd=KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    dz=KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
)
_GPU_FP32 = LossConfig(
    fwd=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
    dz=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
)

# Forward programs to aim for per SM when splitting the vocab (assuming every row counts; with
# 40% of the rows counted the forward still gets ~3 waves).
_FWD_PROGRAMS_PER_SM = 8

_override: LossConfig | None = None


def pick_config(on_gpu: bool, dtype: torch.dtype) -> LossConfig:
    if _override is not None:
        return _override
    if not on_gpu:
        return _INTERPRETER
    return _GPU_FP32 if dtype == torch.float32 else _GPU_16BIT


def fwd_splits(cfg: LossConfig, T: int, V: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocab columns per split) for the forward: ``cfg.fwd_splits`` if the config pins
    them, else enough that ``row_tiles * splits`` reaches ``_FWD_PROGRAMS_PER_SM`` programs per
    SM. Splits are whole vocab tiles and never empty."""
    row_tiles = -(-T // cfg.fwd.block_m)
    vocab_tiles = -(-V // cfg.fwd.block_v)
    wanted = cfg.fwd_splits
    if wanted is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = -(-_FWD_PROGRAMS_PER_SM * sms // max(1, row_tiles))
    splits = max(1, min(wanted, vocab_tiles))
    split_cols = -(-vocab_tiles // splits) * cfg.fwd.block_v
    return -(-V // split_cols), split_cols


def vocab_chunk(cfg: LossConfig, n_rows: int, V: int) -> int:
    """Vocab columns per backward chunk: as many whole ``dz`` tiles as keep ``n_rows x chunk``
    within ``cfg.dz_buffer_elems`` (at least one tile, at most the whole vocab)."""
    tile = cfg.dz.block_v
    tiles = max(1, cfg.dz_buffer_elems // max(1, n_rows) // tile)
    return min(tiles * tile, V)


@contextlib.contextmanager
def use_config(config: LossConfig):
    """Pin every linear_cross_entropy launch inside the block to ``config`` (tests, tuning)."""
    global _override
    previous, _override = _override, config
    try:
        yield
    finally:
        _override = previous
