"""KeyRanges builders, validation and the tile bounds the kernels loop over."""

from __future__ import annotations

import pytest
import torch

from attention_cases import FAMILIES, make_mask
from cocoa_kernels import KeyRanges
from cocoa_kernels.mask import key_tile_bounds, query_tile_bounds


def _dense_from_rule(N, rule):
    return torch.tensor([[rule(i, j) for j in range(N)] for i in range(N)])


def test_from_segments_bidirectional_and_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    bi = KeyRanges.from_segments(seg)
    assert bi.lo.tolist() == [[0, 0, 0, 3, 3, 0, 0]]
    assert bi.hi.tolist() == [[3, 3, 3, 5, 5, 0, 0]]
    assert bi.lo.dtype == torch.int32 and bi.hi.dtype == torch.int32 and not bi.causal
    ids = seg[0].tolist()
    same = lambda i, j: ids[i] >= 0 and ids[i] == ids[j]  # noqa: E731
    assert torch.equal(bi.to_dense()[0], _dense_from_rule(7, same))
    causal = KeyRanges.from_segments(seg, causal=True)
    assert causal.causal
    assert torch.equal(causal.to_dense()[0], _dense_from_rule(7, lambda i, j: same(i, j) and j <= i))


def test_left_padding_and_length_one_segments():
    seg = torch.tensor([[-1, -1, 4, 7, 7]])
    m = KeyRanges.from_segments(seg)
    assert m.lo.tolist() == [[0, 0, 2, 3, 3]]
    assert m.hi.tolist() == [[0, 0, 3, 5, 5]]


@pytest.mark.parametrize("eos_sees", ["block_a", "all"])
def test_eos_bridge_rule(eos_sees):
    # segment 0: A = [0, 1, 2] (EOS at 2), B = [3, 4]; segment 1: A = [5] only (EOS), B = [6, 7];
    # segment 2: A = [8, 9], B empty; then padding.
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, -1]])
    tgt = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    m = KeyRanges.eos_bridge(seg, tgt, eos_sees=eos_sees)
    assert m.lo.tolist() == [[0, 0, 0, 2, 2, 5, 5, 5, 8, 8, 0]]
    if eos_sees == "block_a":
        assert m.hi.tolist() == [[3, 3, 3, 5, 5, 6, 8, 8, 10, 10, 0]]
    else:  # each EOS row (2, 5, 9) sees its whole segment
        assert m.hi.tolist() == [[3, 3, 5, 5, 5, 8, 8, 8, 10, 10, 0]]
    ids, t = seg[0].tolist(), tgt[0].tolist()
    eos = {0: 2, 1: 5, 2: 9}

    def sees(i, j):
        if ids[i] < 0 or ids[i] != ids[j]:
            return False
        if i == eos[ids[i]] and eos_sees == "all":  # the bridge row: the whole sample
            return True
        if not t[i]:  # block A: A only
            return not t[j]
        return t[j] or j == eos[ids[i]]  # block B: B and the EOS of A

    assert torch.equal(m.to_dense()[0], _dense_from_rule(11, sees))


def test_eos_sees_must_be_a_known_view():
    with pytest.raises(ValueError, match=r"eos_sees must be one of \('block_a', 'all'\), got 'b'"):
        KeyRanges.eos_bridge(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[False, False, True]]), eos_sees="b")


def test_from_cu_seqlens():
    m = KeyRanges.from_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32), causal=True)
    ref = KeyRanges.from_segments(torch.tensor([[0, 0, 0, 2, 2, 2, 2]]), causal=True)
    assert m.causal and torch.equal(m.lo, ref.lo) and torch.equal(m.hi, ref.hi)


def test_raw_sliding_window():
    N, w = 12, 3
    i = torch.arange(N)[None]
    m = KeyRanges((i - w).clamp(min=0), torch.full_like(i, N), causal=True)
    assert torch.equal(m.to_dense()[0], _dense_from_rule(N, lambda a, b: a - w <= b <= a))


@pytest.mark.parametrize(
    "lo, hi, match",
    [
        ([[0, 2]], [[1, 1]], r"lo > hi at \[0, 1\]"),
        ([[0, -1]], [[1, 1]], r"lo\[0, 1\] = -1 is outside \[0, N\]"),
        ([[0, 0]], [[3, 1]], r"hi\[0, 0\] = 3 is outside \[0, N\] with N = 2"),
    ],
)
def test_raw_interval_errors(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        KeyRanges(torch.tensor(lo), torch.tensor(hi))


def test_raw_shape_and_dtype_errors():
    with pytest.raises(TypeError, match="lo must have an integer dtype"):
        KeyRanges(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"hi must have shape \(1, 3\)"):
        KeyRanges(torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lo must have shape \(B, N\)"):
        KeyRanges(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="causal must be a bool"):
        KeyRanges(torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32), causal=1)


def test_segment_errors():
    with pytest.raises(ValueError, match="segment 0 of row 1 is not contiguous"):
        KeyRanges.from_segments(torch.tensor([[0, 0, 1], [0, 1, 0]]))
    with pytest.raises(ValueError, match=r"ids must be >= 0, or -1 for padding"):
        KeyRanges.from_segments(torch.tensor([[0, -2]]))
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        KeyRanges.from_segments(torch.zeros(1, 3))


def test_eos_bridge_errors():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    bad_suffix = torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="block B is not a contiguous suffix"):
        KeyRanges.eos_bridge(seg, bad_suffix)
    no_a = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"segment starting at \[0, 3\] has no block-A token"):
        KeyRanges.eos_bridge(seg, no_a)
    on_pad = torch.tensor([[0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="True on a padding position"):
        KeyRanges.eos_bridge(seg, on_pad)
    with pytest.raises(TypeError, match="is_target must be a bool tensor"):
        KeyRanges.eos_bridge(seg, torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"is_target must have shape \(1, 6\)"):
        KeyRanges.eos_bridge(seg, torch.zeros(1, 5, dtype=torch.bool))


def test_cu_seqlens_errors():
    with pytest.raises(ValueError, match="must start at 0"):
        KeyRanges.from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        KeyRanges.from_cu_seqlens(torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match=r"shape \(S \+ 1,\)"):
        KeyRanges.from_cu_seqlens(torch.tensor([[0, 3]]))
    with pytest.raises(TypeError, match="integer dtype"):
        KeyRanges.from_cu_seqlens(torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("N", [1, 17, 130])
@pytest.mark.parametrize("family", FAMILIES)
def test_tile_bounds_cover_every_visible_pair_and_full_tiles_are_full(family, N, bm, bn):
    """The kernels' loop bounds, checked tile by tile against the dense mask."""
    mask = make_mask(family, 2, N, seed=N)
    dense = mask.to_dense()
    lo, hi = mask.lo, mask.effective_hi()
    active = lo < hi
    qb = query_tile_bounds(lo, hi, bm, bn)
    kb = key_tile_bounds(lo, hi, bm, bn)
    for b in range(2):
        for m in range(qb.shape[1]):
            start, fs, fe, end = qb[b, m].tolist()
            rows = slice(m * bm, min(N, (m + 1) * bm))
            seen = dense[b, rows].any(0).nonzero().flatten()
            if seen.numel():
                assert start <= int(seen.min()) and int(seen.max()) < end
            assert start <= fs <= fe <= end and start % bn == 0
            assert (fs % bn == 0 and fe % bn == 0) or fs == fe == end  # no full tiles: all masked
            for n0 in range(fs, fe, bn):  # unmasked: every active row sees every key of the tile
                block = dense[b, rows, n0:n0 + bn][active[b, rows]]
                assert n0 + bn <= N and bool(block.all())
        for t in range(kb.shape[1]):
            q0, f0, f1, q1 = kb[b, t].tolist()
            keys = slice(t * bn, min(N, (t + 1) * bn))
            seers = dense[b, :, keys].any(1).nonzero().flatten()
            if seers.numel():
                assert q0 <= int(seers.min()) and int(seers.max()) < q1
            assert q0 <= f0 <= f1 <= q1 and q0 % bm == 0
            assert (f0 % bm == 0 and f1 % bm == 0) or f0 == f1 == q1
            for m0 in range(f0, f1, bm):
                assert m0 + bm <= N
                block = dense[b, m0:m0 + bm, keys][active[b, m0:m0 + bm]]
                assert keys.stop - keys.start == bn and bool(block.all())


def test_tile_bounds_skip_what_nobody_sees():
    """Packed segments: a query tile inside one segment loops over that segment's keys only."""
    seg = torch.arange(8).repeat_interleave(64)[None]  # 8 samples of 64 tokens
    m = KeyRanges.from_segments(seg)
    qb = query_tile_bounds(m.lo, m.hi, 32, 32)
    assert qb[0, 5].tolist() == [128, 128, 192, 192]  # rows 160..191 -> keys 128..191, all full
    kb = key_tile_bounds(m.lo, m.hi, 32, 32)
    assert kb[0, 5].tolist() == [128, 128, 192, 192]


@pytest.mark.parametrize("family", FAMILIES)
def test_from_dense_inverts_to_dense(family):
    mask = make_mask(family, 2, 37, seed=2)
    back = KeyRanges.from_dense(mask.to_dense())
    assert torch.equal(back.to_dense(), mask.to_dense())


def test_from_dense_refuses_rows_with_gaps():
    dense = torch.zeros(1, 4, 4, dtype=torch.bool)
    dense[0, 2, [0, 2]] = True
    with pytest.raises(ValueError, match="row 2 of batch 0 of the dense mask is not one contiguous interval"):
        KeyRanges.from_dense(dense)
    with pytest.raises(ValueError, match=r"shape \(B, N, N\)"):
        KeyRanges.from_dense(torch.zeros(1, 4, 3, dtype=torch.bool))
