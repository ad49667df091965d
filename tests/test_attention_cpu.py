"""The fast CPU path (cocoa_kernels/attention/cpu.py): run detection, planning, every plan it can
choose against the float64 dense truth, the reference.py specification, and O(N) memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_cases import FAMILIES, assert_close, make_mask, make_qkv, run_with_grads, truth_and_baseline
from cocoa_kernels import KeyRanges, attention
from cocoa_kernels.attention import cpu, reference

NAMES = ("out", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def _fresh_plan_cache():
    cpu._last_plan[0] = None
    yield
    cpu._last_plan[0] = None


def _segments(*lengths, pad=0):
    ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)] + [torch.full((pad,), -1)])
    return ids.view(1, -1)


def _runs(mask):
    return [(b, r0, r1, kind) for b, r0, r1, kind in cpu.find_runs(mask.lo, mask.effective_hi())]


# ---------------------------------------------------------------------------- run detection
def test_runs_of_bidirectional_segments_and_padding():
    mask = KeyRanges.from_segments(_segments(3, 2, pad=1))
    assert _runs(mask) == [(0, 0, 3, "dense"), (0, 3, 5, "dense"), (0, 5, 6, "empty")]


def test_runs_of_causal_segments_start_with_one_key():
    mask = KeyRanges.from_segments(_segments(4, 1, 3), causal=True)
    assert _runs(mask) == [(0, 0, 4, "causal"), (0, 4, 5, "dense"), (0, 5, 8, "causal")]


def test_runs_of_the_eos_bridge_are_block_a_and_block_b():
    seg = _segments(5, 3)
    is_target = torch.tensor([[False, False, False, True, True, False, False, True]])
    assert _runs(KeyRanges.eos_bridge(seg, is_target)) == [
        (0, 0, 3, "dense"), (0, 3, 5, "dense"), (0, 5, 7, "dense"), (0, 7, 8, "dense")]


def test_a_run_growing_from_a_longer_start_is_odd():
    """A prefix-LM: rows 0-1 see the 2-token prefix, then each row one key more (not top-left
    causal, so not a mask-free call)."""
    lo = torch.zeros(1, 6, dtype=torch.int32)
    hi = torch.tensor([[2, 2, 3, 4, 5, 6]], dtype=torch.int32)
    assert _runs(KeyRanges(lo, hi)) == [(0, 0, 2, "dense"), (0, 2, 6, "odd")]


def test_runs_are_per_batch_row():
    seg = torch.cat([_segments(2, 2), _segments(4)])
    assert _runs(KeyRanges.from_segments(seg)) == [(0, 0, 2, "dense"), (0, 2, 4, "dense"), (1, 0, 4, "dense")]


# ---------------------------------------------------------------------------- planning
def test_long_packed_rows_are_planned_as_mask_free_calls_per_segment():
    mask = KeyRanges.from_segments(_segments(512, 512, 1024, pad=64), causal=True)
    pieces = cpu.plan(mask.lo, mask.effective_hi(), 12, 128)
    assert [(p.r0, p.r1, p.k0, p.k1, p.kind) for p in pieces] == [
        (0, 512, 0, 512, "causal"), (512, 1024, 512, 1024, "causal"), (1024, 2048, 1024, 2048, "causal")]


def test_rows_with_one_layout_share_a_call():
    seg = _segments(128).expand(8, -1)
    is_target = (torch.arange(128) >= 96).expand(8, -1)
    pieces = cpu.plan(*_lo_hi(KeyRanges.eos_bridge(seg, is_target)), 4, 64)
    assert sorted(tuple(p) for p in pieces) == [(0, 8, 0, 96, 0, 96, "dense"), (0, 8, 96, 128, 95, 128, "dense")]


def test_short_varied_rows_go_to_one_masked_call_for_the_whole_batch():
    """The tiny demo model's batch: a call per row would cost more than computing the padding."""
    seg = torch.stack([_segments(60 - 3 * b, pad=3 * b)[0] for b in range(16)])
    pieces = cpu.plan(*_lo_hi(KeyRanges.from_segments(seg)), 4, 8)
    assert [tuple(p) for p in pieces] == [(0, 16, 0, 60, 0, 60, "masked")]


def test_every_plan_covers_each_visible_pair_once():
    for family in FAMILIES:
        mask = make_mask(family, 3, 150, seed=4)
        lo, hi = _lo_hi(mask)
        dense = mask.to_dense()
        for pieces in _plans(lo, hi):
            seen = torch.zeros(3, 150, 150, dtype=torch.int32)
            owners = torch.zeros(3, 150, dtype=torch.int32)
            for p in pieces:
                block = torch.zeros(3, 150, 150, dtype=torch.bool)
                block[p.b0 : p.b1, p.r0 : p.r1, p.k0 : p.k1] = True
                if p.kind == "causal":  # what the kernel computes: top-left causal in the slice
                    block[:, p.r0 : p.r1, p.k0 : p.k1] &= torch.ones(p.r1 - p.r0, p.k1 - p.k0, dtype=torch.bool).tril()
                if p.kind != "masked":  # no mask: every pair the call computes must be visible
                    assert torch.equal(block & dense, block), (family, p)
                owners[p.b0 : p.b1, p.r0 : p.r1] += 1
                seen += (block & dense).int()
            # Each query row is written by one call, and every visible pair is computed once.
            assert int(owners.max()) <= 1, family
            assert torch.equal(seen, dense.int()), family


def _lo_hi(mask):
    return mask.lo, mask.effective_hi()


def _every_run_alone(lo, hi, Hq, D):
    """run_pieces with free calls: every dense or causal run gets a mask-free call of its own
    (at these small sizes the cost model would put most runs in masked chunks)."""
    saved = cpu._CALL_NS, cpu._CALL_HEAD_DIM_NS, cpu._ROW_HEAD_NS
    cpu._CALL_NS = cpu._CALL_HEAD_DIM_NS = cpu._ROW_HEAD_NS = 0.0
    try:
        return cpu.run_pieces(lo, hi, Hq, D)
    finally:
        cpu._CALL_NS, cpu._CALL_HEAD_DIM_NS, cpu._ROW_HEAD_NS = saved


def _plans(lo, hi):
    """Every plan the planner can choose from (per-row runs, batch-wide chunks of two sizes)."""
    return [cpu.run_pieces(lo, hi, 4, 64), _every_run_alone(lo, hi, 4, 64), cpu.batch_chunks(lo, hi),
            cpu.batch_chunks(lo, hi, max_rows=16)]


def test_free_calls_give_causal_and_dense_pieces():
    """What makes the "every_run_alone" plan below exercise the mask-free kernel calls."""
    for family, kinds in (("causal_packed", {"causal", "dense"}), ("eos_bridge", {"dense"})):
        pieces = _every_run_alone(*_lo_hi(make_mask(family, 2, 130, seed=7)), 4, 32)
        assert kinds <= {p.kind for p in pieces}, family


# ---------------------------------------------------------------------------- numerics
PLANS = {
    "runs": lambda lo, hi, Hq, D: cpu.run_pieces(lo, hi, Hq, D),
    "every_run_alone": _every_run_alone,
    "batched": lambda lo, hi, Hq, D: cpu.batch_chunks(lo, hi),
    "batched_16_rows": lambda lo, hi, Hq, D: cpu.batch_chunks(lo, hi, max_rows=16),
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_plan_against_float64_truth(monkeypatch, family, plan):
    """Out and every gradient to float64 precision, GQA (4 query heads over 2), padding and
    empty rows included, whichever plan runs."""
    monkeypatch.setattr(cpu, "plan", PLANS[plan])
    mask = make_mask(family, 2, 130, seed=7)
    q, k, v, do = make_qkv(2, 4, 2, 130, 32, torch.float64, "cpu", seed=8)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch"), q, k, v, do)
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"{plan} {name}", g, t, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefix_lm_odd_runs_against_truth(dtype):
    N = 90
    lo = torch.zeros(2, N, dtype=torch.int32)
    i = torch.arange(N, dtype=torch.int32)
    hi = torch.maximum(i + 1, torch.tensor(30, dtype=torch.int32)).expand(2, N).contiguous()
    mask = KeyRanges(lo, hi)
    assert "odd" in {kind for *_, kind in cpu.find_runs(lo, hi)}
    q, k, v, do = make_qkv(2, 2, 1, N, 64, dtype, "cpu", seed=9)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch"), q, k, v, do)
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(name, g, t, b)


@pytest.mark.parametrize("family", ["eos_bridge", "causal_packed", "padding_rows", "random_intervals"])
def test_matches_the_reference_specification(family):
    """cpu.py and reference.py: same out, lse (float64 for float64 inputs) and gradients."""
    mask = make_mask(family, 2, 110, seed=10)
    lo, hi = _lo_hi(mask)
    q, k, v, do = make_qkv(2, 6, 2, 110, 16, torch.float64, "cpu", seed=11)
    out, lse = cpu.attention_forward(q, k, v, lo, hi, 0.3)
    ref_out, ref_lse = reference.attention_forward(q, k, v, lo, hi, 0.3)
    assert lse.dtype == ref_lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)  # +inf on the same rows
    grads = cpu.attention_backward(do, q, k, v, out, lse, lo, hi, 0.3)
    ref_grads = reference.attention_backward(do, q, k, v, ref_out, ref_lse, lo, hi, 0.3)
    for name, a, b in zip(NAMES[1:], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", ["eos_bridge", "random_intervals"])
def test_reference_in_small_chunks_against_float64_truth(monkeypatch, family):
    """reference.py stays the tested specification: chunked into 7-row pieces, out and every
    gradient still match the dense truth (it serves impl="torch" off the CPU)."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 4 * 90 * 7)
    mask = make_mask(family, 2, 90, seed=17)
    lo, hi = _lo_hi(mask)
    q, k, v, do = make_qkv(2, 4, 2, 90, 16, torch.float64, "cpu", seed=17)
    out, lse = reference.attention_forward(q, k, v, lo, hi, 0.25)
    got = (out, *reference.attention_backward(do, q, k, v, out, lse, lo, hi, 0.25))
    truth, base = truth_and_baseline(q, k, v, do, mask, scale=0.25)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"reference {name}", g, t, b)


@pytest.mark.parametrize("plan", PLANS)
def test_rows_that_see_nothing_get_zeros_and_infinite_lse(monkeypatch, plan):
    monkeypatch.setattr(cpu, "plan", PLANS[plan])
    seg = torch.stack([_segments(20, 15, pad=5)[0], torch.full((40,), -1)])
    mask = KeyRanges.from_segments(seg)
    q, k, v, do = make_qkv(2, 2, 1, 40, 16, torch.float32, "cpu", seed=12)
    out, lse = cpu.attention_forward(q, k, v, mask.lo, mask.hi, 0.25)
    empty = torch.zeros(2, 40, dtype=torch.bool)
    empty[0, 35:] = True
    empty[1] = True
    assert torch.all(lse[:, :, empty[0]][0] == float("inf")) and torch.all(lse[1] == float("inf"))
    assert torch.isfinite(lse[0, :, :35]).all()
    assert torch.all(out[0, :, 35:] == 0) and torch.all(out[1] == 0)
    dq, dk, dv = cpu.attention_backward(do, q, k, v, out, lse, mask.lo, mask.hi, 0.25)
    assert torch.all(dq[0, :, 35:] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("plan", PLANS)
def test_lse_is_token_major_and_infinite_on_empty_rows(monkeypatch, plan):
    """out and lse come back token-major, the layout the op's fake kernel declares (the CPU
    kernel's own: a single call covering the whole problem returns its results uncopied) and
    reference.py's; padding rows get +inf in either path."""
    monkeypatch.setattr(cpu, "plan", PLANS[plan])
    seg = torch.stack([torch.zeros(40, dtype=torch.long), _segments(20, 13, pad=7)[0]])
    mask = KeyRanges.from_segments(seg)
    q, k, v, _ = make_qkv(2, 4, 2, 40, 16, torch.float32, "cpu", seed=14)
    pieces, _, _ = cpu.planned(mask.lo, mask.hi, 4, 16, torch.float32)
    if plan == "batched":  # one masked call over every row and key: the uncopied path
        assert cpu._covers_all(pieces, 2, 40)
    for impl in (cpu, reference):
        out, lse = impl.attention_forward(q, k, v, mask.lo, mask.hi, 0.25)
        assert out.transpose(1, 2).is_contiguous() and lse.transpose(1, 2).is_contiguous(), impl.__name__
        assert torch.all(lse[1, :, 33:] == float("inf")) and torch.isfinite(lse[1, :, :33]).all(), impl.__name__
        assert torch.isfinite(lse[0]).all() and torch.all(out[1, :, 33:] == 0), impl.__name__


def test_a_mask_edited_in_place_is_planned_again():
    """The plan is reused for the same lo/hi tensors only while their version is unchanged."""
    mask = KeyRanges.from_segments(_segments(10, 10))
    q, k, v, _ = make_qkv(1, 2, 1, 20, 16, torch.float64, "cpu", seed=13)
    attention(q, k, v, mask, impl="torch")
    mask.hi[0, :10] = 20  # the first segment now sees every key
    got = attention(q, k, v, mask, impl="torch")
    fresh = KeyRanges(mask.lo.clone(), mask.hi.clone())
    cpu._last_plan[0] = None
    torch.testing.assert_close(got, attention(q, k, v, fresh, impl="torch"), rtol=0, atol=0)


def test_inference_mode_works_without_the_plan_cache():
    mask = make_mask("eos_bridge", 1, 40, seed=14)
    q, k, v, _ = make_qkv(1, 2, 1, 40, 16, torch.float32, "cpu", seed=14)
    expected = attention(q, k, v, mask, impl="torch")
    with torch.inference_mode():
        lo, hi = mask.lo.clone(), mask.hi.clone()
        got = attention(q, k, v, KeyRanges(lo, hi), impl="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_opcheck_float64_keeps_a_float64_lse():
    """The fake kernel declares what the PyTorch path returns (torch.compile relies on it)."""
    mask = make_mask("eos_bridge", 1, 33, seed=15)
    q, k, v, do = make_qkv(1, 2, 1, 33, 16, torch.float64, "cpu", seed=15)
    lo, hi = _lo_hi(mask)
    torch.library.opcheck(torch.ops.cocoa.attention_fwd.default, (q, k, v, lo, hi, 0.25, "torch"))
    out, lse = torch.ops.cocoa.attention_fwd(q, k, v, lo, hi, 0.25, "torch")
    assert lse.dtype == torch.float64
    torch.library.opcheck(torch.ops.cocoa.attention_bwd.default, (do, q, k, v, out, lse, lo, hi, 0.25, "torch"))


# ---------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output held."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("family", ["bidir_packed", "sliding_window"])
def test_a_32k_token_row_never_holds_an_n_by_n_tensor(family):
    """Forward and backward of one 32k-token row: runs need no mask, masked chunks are bounded
    (a sliding window has no runs at all)."""
    N = 32768
    if family == "bidir_packed":
        mask = KeyRanges.from_segments(torch.arange(N // 1024).repeat_interleave(1024).view(1, N))
    else:
        i = torch.arange(N).view(1, N)
        mask = KeyRanges((i - 64).clamp(min=0), (i + 1), causal=True)
    q, k, v, do = make_qkv(1, 1, 1, N, 8, torch.float32, "cpu", seed=16)
    lo, hi = _lo_hi(mask)
    with _LargestTensor() as probe:  # the implementation itself: the mode sees a custom op whole
        out, lse = cpu.attention_forward(q, k, v, lo, hi, 0.25)
        cpu.attention_backward(do, q, k, v, out, lse, lo, hi, 0.25)
    assert probe.largest <= max(cpu._CHUNK_ELEMENTS, 4 * N * 8), f"{family}: a tensor of {probe.largest} elements"
    assert probe.largest < N * N // 64
