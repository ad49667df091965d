"""Short rows: each tile's loop split over several programs (forward and dQ: key loop; dK/dV:
query loop), fp32 partials merged by the launcher. Checked against the float64 truth with the
split pinned, at sizes where some pieces are empty and some rows see nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_cases import assert_close, make_mask, make_qkv, run_with_grads, truth_and_baseline
from conftest import DEVICE, SMALL_TILES
from cocoa_kernels import attention
from cocoa_kernels.attention import config as attn_config

NAMES = ("out", "dq", "dk", "dv")


def _check(mask, q, k, v, do, cfg):
    with attn_config.use_config(cfg):
        got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"{name} ({cfg.loop_splits} pieces)", g, t, b)
    return got


# (family, pieces, dK/dV head splits): 2 and 3 are what short rows get on a GPU; 5 pieces of
# loops only 2 to 5 tiles long leave pieces empty; padding_rows has rows that see nothing (the
# merge must give zeros and lse = +inf, not NaN); random_intervals has no structure at all.
CASES = [("eos_bridge", 2, 1), ("eos_bridge", 3, 2), ("padding_rows", 3, 1), ("random_intervals", 5, 2),
         ("causal_packed", 5, 1)]


@pytest.mark.parametrize("family, pieces, head_splits", CASES, ids=[f"{f}-x{p}-h{s}" for f, p, s in CASES])
def test_split_loops_match_truth(family, pieces, head_splits):
    cfg = dataclasses.replace(SMALL_TILES, loop_splits=pieces, dkdv_splits=head_splits)
    mask = make_mask(family, 2, 75, seed=pieces).to(DEVICE)
    q, k, v, do = make_qkv(2, 4, 2, 75, 64, torch.bfloat16, DEVICE, seed=pieces)
    _check(mask, q, k, v, do, cfg)


def test_split_loops_fp32_and_deterministic():
    """fp32 (tight tolerance) and two runs bitwise equal: partials are summed in a fixed order."""
    cfg = dataclasses.replace(SMALL_TILES, loop_splits=3)
    mask = make_mask("eos_bridge", 1, 53, seed=4).to(DEVICE)
    q, k, v, do = make_qkv(1, 2, 1, 53, 64, torch.float32, DEVICE, seed=4)
    first = _check(mask, q, k, v, do, cfg)
    with attn_config.use_config(cfg):
        second = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_loop_splits_fill_short_grids(monkeypatch):
    """Unpinned: the fewest pieces that give every SM ``LOOP_SPLIT_MIN_WAVES`` (3) programs, at
    most ``LOOP_SPLIT_MAX`` (3) and the tile's loop length; none off the GPU."""
    monkeypatch.setattr(attn_config, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    with attn_config.use_config(None):
        assert attn_config.loop_splits(96, 16, gpu) == 3  # the bridge's forward at 1k: 96 programs, capped
        assert attn_config.loop_splits(192, 32, gpu) == 3  # 2k: 576 >= 396
        assert attn_config.loop_splits(384, 64, gpu) == 2  # 4k: 768 >= 396
        assert attn_config.loop_splits(396, 64, gpu) == 1  # already 3 waves
        assert attn_config.loop_splits(12, 2, gpu) == 2  # a loop of 2 tiles has at most 2 pieces
        assert attn_config.loop_splits(12, 40, torch.device("cpu")) == 1
    pinned = dataclasses.replace(SMALL_TILES, loop_splits=4)
    assert attn_config.loop_splits(10_000, 1, gpu, cfg=pinned) == 4  # a pin wins
    with attn_config.use_config(pinned):
        assert attn_config.loop_splits(10_000, 1, gpu) == 4  # the pinned config by default


def test_split_loops_with_the_atomic_dq_backward():
    """deterministic=False runs the dK/dV kernel with ACCUMULATE_DQ: its query-loop pieces each
    add their share of dQ atomically and write dK/dV partials (with head splits too)."""
    cfg = dataclasses.replace(SMALL_TILES, loop_splits=3, dkdv_splits=2)
    mask = make_mask("eos_bridge", 2, 75, seed=6).to(DEVICE)
    q, k, v, do = make_qkv(2, 4, 2, 75, 64, torch.bfloat16, DEVICE, seed=6)
    with attn_config.use_config(cfg):
        got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton", deterministic=False),
                             q, k, v, do)
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"{name} (3 pieces, atomic dQ)", g, t, b)
