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
- ``chunk_elems``: the backward's vocab chunk keeps its logit gradients (counted rows x C, in the
  inputs' dtype) and its fp32 d_weight rows (C x H) within this many elements each: 64 Mi, i.e.
  128 MiB of bf16 and 256 MiB of fp32 (see ``vocab_chunk`` for the one exception).

fp32 inputs use exact fp32 products (``input_precision="ieee"``: no tensor cores), which spill
at those sizes; they get ``64 x 64 x 16`` tiles. fp32 is the precise path, not the fast one.

The interpreter gets small tiles (every tl.dot dim >= 16), fixed splits and a tiny chunk budget, so
that tests at V ~ 1000, H ~ 80 already cover partial vocab tiles, partial hidden chunks, the split
combine and several backward chunks with a partial last one.
"""

from __future__ import annotations

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
    fwd_splits: int | None = None  # vocab splits per row tile in the forward; None: from the grid
    chunk_elems: int = 1 << 26  # the backward's chunk budget, in elements (see vocab_chunk)


_INTERPRETER = LossConfig(
    fwd=KernelConfig(16, 128, 64),
    dz=KernelConfig(16, 128, 64),
    fwd_splits=3,
    chunk_elems=8192,
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

_pinned: Pinned[LossConfig] = Pinned()


def pick_config(on_gpu: bool, dtype: torch.dtype) -> LossConfig:
    if _pinned.config is not None:
        return _pinned.config
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


def vocab_chunk(cfg: LossConfig, n_rows: int, V: int, H: int) -> int:
    """Vocab columns C per backward chunk, in whole ``dz`` tiles, at most the whole vocab.

    Two buffers scale with C: dz (n_rows, C) and the fp32 d_weight rows (C, H) before rounding;
    C keeps both within ``cfg.chunk_elems``, but is never narrower than H (rounded up to a tile):
    each chunk also adds an (n_rows, H) fp32 product into the d_hidden buffer, and with C >= H
    that update never moves more bytes than dz itself. (With very many counted rows dz then
    grows past the budget, to about n_rows x H: the size of the d_hidden buffer itself.)"""
    tile = cfg.dz.block_v
    tiles = max(cfg.chunk_elems // max(1, n_rows, H) // tile, -(-H // tile), 1)
    return min(tiles * tile, V)


# Pin every launch inside a ``with use_config(config):`` block to ``config`` (tests, tuning).
use_config = _pinned.use
