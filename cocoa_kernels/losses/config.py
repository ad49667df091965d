"""Tile sizes, warps and vocab splits for the fused linear cross-entropy kernels.

Three kernels share one tile shape: a [BLOCK_M rows, BLOCK_V vocab] logit tile, accumulated over
the hidden dim in BLOCK_H chunks (so H up to 8192 never sits whole in registers).

GPU table for 16-bit inputs (Hopper; starting points, to be re-measured on the H200 with
``bench/``). All three compile for sm_90 without register spills (checked with ``cuobjdump
-res-usage``: 237-255 registers a thread, 8 warps, 1 program per SM):

- forward ``128 x 128 x 64``, 8 warps, 3 stages: a plain GEMM tile; the vocab is split over
  several programs per row tile (``fwd_splits``) so that ~6.5k counted rows still fill 132 SMs.
- d_hidden ``64 x 256 x 64``, 8 warps, 3 stages: each program owns 64 rows and walks the vocab; its
  fp32 [64, H] accumulator lives in global memory and is read-modified-written once per vocab
  tile, so the traffic per flop falls with BLOCK_V, hence the wide vocab tile.
- d_weight ``256 x 64 x 64``, 8 warps, 3 stages: each program owns 64 vocab rows and walks the
  counted rows; its fp32 [64, H] accumulator is read-modified-written once per row tile, so the
  traffic per flop falls with BLOCK_M, hence the tall row tile.

fp32 inputs use exact fp32 products (``input_precision="ieee"``: no tensor cores), which spill
at those sizes; they get ``64 x 64 x 16`` tiles (no spills). fp32 is the precise path, not the
fast one.

The interpreter gets small tiles (every tl.dot dim >= 16) and fixed splits, so that tests at
V ~ 1000, H ~ 80 already cover partial vocab tiles, partial hidden chunks and the split combine.
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
    dh: KernelConfig
    dw: KernelConfig
    fwd_splits: int | None = None  # vocab splits per row tile in the forward; None: from the grid
    dh_splits: int | None = None  # same for the d_hidden kernel (each split has its own fp32 buffer)


_INTERPRETER = LossConfig(
    fwd=KernelConfig(16, 128, 64),
    dh=KernelConfig(16, 128, 64),
    dw=KernelConfig(32, 64, 64),
    fwd_splits=3,
    dh_splits=2,
)

_GPU_16BIT = LossConfig(
    fwd=KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    dh=KernelConfig(64, 256, 64, num_warps=8, num_stages=3),
    dw=KernelConfig(256, 64, 64, num_warps=8, num_stages=3),
)
_GPU_FP32 = LossConfig(
    fwd=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
    dh=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
    dw=KernelConfig(64, 64, 16, num_warps=8, num_stages=2),
)

# Programs to aim for per SM when splitting the vocab (assuming every row counts; with 40% of
# the rows counted the forward still gets ~3 waves). d_hidden splits cost an fp32 (T, H) buffer
# each, so it gets fewer.
_FWD_PROGRAMS_PER_SM = 8
_DH_PROGRAMS_PER_SM = 2
_MAX_DH_SPLITS = 4

_override: LossConfig | None = None


def pick_config(on_gpu: bool, dtype: torch.dtype) -> LossConfig:
    if _override is not None:
        return _override
    if not on_gpu:
        return _INTERPRETER
    return _GPU_FP32 if dtype == torch.float32 else _GPU_16BIT


def _splits(fixed: int | None, kernel: KernelConfig, T: int, V: int, device: torch.device,
            per_sm: int, cap: int) -> tuple[int, int]:
    """(splits, vocab columns per split): ``fixed`` splits if the config pins them, else enough
    that ``row_tiles * splits`` reaches ``per_sm`` programs per SM. Splits are whole vocab tiles
    and never empty."""
    row_tiles = -(-T // kernel.block_m)
    vocab_tiles = -(-V // kernel.block_v)
    if fixed is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        fixed = min(cap, -(-per_sm * sms // max(1, row_tiles)))
    splits = max(1, min(fixed, vocab_tiles))
    split_cols = -(-vocab_tiles // splits) * kernel.block_v
    return -(-V // split_cols), split_cols


def fwd_splits(cfg: LossConfig, T: int, V: int, device: torch.device) -> tuple[int, int]:
    return _splits(cfg.fwd_splits, cfg.fwd, T, V, device, _FWD_PROGRAMS_PER_SM, cap=1 << 16)


def dh_splits(cfg: LossConfig, T: int, V: int, device: torch.device) -> tuple[int, int]:
    return _splits(cfg.dh_splits, cfg.dh, T, V, device, _DH_PROGRAMS_PER_SM, cap=_MAX_DH_SPLITS)


@contextlib.contextmanager
def use_config(config: LossConfig):
    """Pin every linear_cross_entropy launch inside the block to ``config`` (tests, tuning)."""
    global _override
    previous, _override = _override, config
    try:
        yield
    finally:
        _override = previous
