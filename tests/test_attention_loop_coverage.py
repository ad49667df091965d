"""The shared test masks exercise every loop of every attention kernel: at the tiles the
interpreter tests pin (conftest.SMALL_TILES) and at every shipped GPU tile, the masks of
``test_mask_families_gqa`` (N = 130) give some tile a full (unmasked) key loop and some tile a
trailing masked loop, in the forward, the dQ and the dK/dV kernels. Without that, a kernel that
skipped its full-tile loop or its last tiles would pass the correctness tests (it did: the
packed families' segments are shorter than the tiles)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_TILES

from attention_cases import FAMILIES, make_mask
from cocoa_kernels.attention import config as cfg
from cocoa_kernels.mask import key_tile_bounds, query_tile_bounds

B, N = 2, 130  # test_mask_families_gqa's shape


def _shipped_tiles() -> dict:
    """Every (kernel, block_m, block_n) the GPU tables ship, named by where it comes from."""
    tiles = {}
    tables = {"16bit": cfg._GPU_16BIT, "16bit_mma_v2": cfg._GPU_16BIT_MMA_V2}
    for table, by_d in tables.items():
        for d, config in by_d.items():
            for kernel in ("fwd", "dq", "dkdv"):
                k = getattr(config, kernel)
                tiles[f"{table}-d{d}-{kernel}"] = (kernel, k.block_m, k.block_n)
    for kernel in ("fwd", "dq", "dkdv"):
        k = getattr(cfg._GPU_FP32, kernel)
        tiles[f"fp32-{kernel}"] = (kernel, k.block_m, k.block_n)
    for name, by_d in (("tma", cfg._GPU_16BIT_TMA), ("tma_ws", cfg._GPU_16BIT_TMA_WS)):
        for d, k in by_d.items():
            tiles[f"{name}-d{d}-fwd"] = ("fwd", k.block_m, k.block_n)
    for kernel in ("fwd", "dq", "dkdv"):
        k = getattr(SMALL_TILES, kernel)
        tiles[f"test-{kernel}"] = (kernel, k.block_m, k.block_n)
    return tiles


TILES = _shipped_tiles()


def _loops(kernel: str, mask, block_m: int, block_n: int) -> torch.Tensor:
    """Iterations of the (leading masked, full, trailing masked) loops of every tile: (..., 3)."""
    hi = mask.effective_hi()
    if kernel == "dkdv":
        bounds, step = key_tile_bounds(mask.lo, hi, block_m, block_n).long(), block_m
    else:
        bounds, step = query_tile_bounds(mask.lo, hi, block_m, block_n).long(), block_n
    extents = bounds[..., 1:] - bounds[..., :-1]
    return -torch.div(-extents, step, rounding_mode="floor")


@pytest.mark.parametrize("name", sorted(TILES))
def test_full_and_trailing_loops_each_run(name):
    kernel, block_m, block_n = TILES[name]
    runs = sum(_loops(kernel, make_mask(f, B, N, seed=1), block_m, block_n).reshape(-1, 3).gt(0).sum(0)
               for f in FAMILIES)
    assert runs[1] > 0, f"{name} ({block_m}x{block_n}): no tile of the test masks runs the full-tile loop"
    assert runs[2] > 0, f"{name} ({block_m}x{block_n}): no tile of the test masks runs the trailing masked loop"


def test_the_long_segment_family_is_what_reaches_the_full_tiles_at_the_shipped_tiles():
    """At 128-row tiles the other families give no full key tile: without long_segments the
    forward's unmasked loop would go untested on a GPU."""
    others = [f for f in FAMILIES if f != "long_segments"]
    full = sum(_loops("fwd", make_mask(f, B, N, seed=1), 128, 128)[..., 1].gt(0).sum() for f in others)
    assert full == 0
    assert _loops("fwd", make_mask("long_segments", B, N, seed=1), 128, 128)[..., 1].gt(0).any()
