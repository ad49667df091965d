"""Interval-masked attention on the CPU, fast: PyTorch's fused CPU flash kernel on mask-free pieces.

Same contract as ``reference.py`` (the readable specification this must match): ``lo``/``hi``
int32 (B, N) with any causal limit folded into ``hi``; query i sees key j iff ``lo <= j < hi``;
forward returns ``out`` and the natural-log ``lse`` (+inf, with ``out = 0``, on rows that see
nothing); backward recomputes from ``lse``.

Why it is fast: the masks CoCoA uses are made of *runs*, consecutive query rows that share one
key interval (a bidirectional segment, bridge block A or block B) or that grow it by one key per
row from a one-key start (a causal segment). A run is a plain dense, or top-left causal,
attention over a contiguous key slice, so it goes to ``aten._scaled_dot_product_flash_attention_for_cpu``
(one fused, multi-threaded call, no mask, grouped-query attention handled natively, forward
and backward) on views of q/k/v: no copies, no score tensor. Runs too small to pay for a call
of their own, and intervals without run structure (sliding windows, random intervals), are
grouped into row chunks that go to the same kernel with an additive mask over the chunk's key
hull. When the whole problem is small (many short rows, as in the tiny demo model), one chunk
spans the whole batch instead; a cost model picks whichever plan is cheaper.

Memory: a run needs no mask and the kernel tiles internally; a chunk's mask holds at most
``_CHUNK_ELEMENTS`` elements. No (N, N) tensor exists for a long row.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from .reference import _compute_dtype, lse_dtype

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# A masked chunk's additive mask holds at most this many elements (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22
# Rows per masked chunk: short chunks keep the key hull tight on packed rows.
_MAX_CHUNK_ROWS = 256

# Masks of one forward are kept for its backward when they hold at most this many elements.
_CACHED_MASK_ELEMENTS = 1 << 20

# Cost model, in nanoseconds of one thread forward + backward, fitted with time.thread_time on
# this project's 2-core CI machine (only the ratios matter): a kernel call costs _CALL_NS plus
# _CALL_HEAD_DIM_NS per query head and head dim (Python, views, copies and the kernel's own
# set-up), plus _ROW_HEAD_NS per batch row and query head (the kernel's per-block work), and
# each (query, key, query head) pair it computes _PAIR_NS plus _PAIR_DIM_NS per head dim (exp
# dominates at small head dims).
_CALL_NS = 250_000.0
_CALL_HEAD_DIM_NS = 400.0
_ROW_HEAD_NS = 5_000.0
_PAIR_NS = 10.0
_PAIR_DIM_NS = 0.22


class Piece(NamedTuple):
    """One kernel call: batch rows ``[b0, b1)``, query rows ``[r0, r1)``, keys ``[k0, k1)``.

    ``kind``: "dense" (every row sees every key of the slice), "causal" (row r0 + t sees keys
    k0 .. k0 + t: top-left causal, with k1 - k0 == r1 - r0) or "masked" (an additive mask built
    from lo/hi for exactly these rows and keys)."""

    b0: int
    b1: int
    r0: int
    r1: int
    k0: int
    k1: int
    kind: str


# ---------------------------------------------------------------------------- planning
def find_runs(lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[int, int, int, str]]:
    """The query rows of every batch row cut into runs ``(b, r0, r1, kind)``, in order, covering
    each row's ``[0, N)``.

    kind: "empty" (the rows see nothing), "dense" (all rows share one interval), "causal" (the
    interval starts with one key and grows by one key per row) or "odd" (it grows by one key
    per row from a longer start, as in a prefix-LM: left to a masked chunk). Every row-to-row
    transition inside a run is of the run's kind."""
    B, N = lo.shape
    lo, hi = lo.long(), hi.long()
    # The transition into row i: 0 = a new interval, 1 = the same interval, 2 = one key more.
    step = torch.zeros(B, N + 1, dtype=torch.int8)
    same_lo = lo[:, 1:] == lo[:, :-1]
    step[:, 1:N] = (same_lo & (hi[:, 1:] == hi[:, :-1])).to(torch.int8)
    step[:, 1:N] += 2 * (same_lo & (hi[:, 1:] == hi[:, :-1] + 1)).to(torch.int8)
    # Row i starts a run on a new interval, or when its transition differs from row i-1's. (A
    # row that starts a run keeps its own transition in ``step``: that can only split a run
    # early, never put rows of two kinds in one run.)
    start = torch.ones(B, N, dtype=torch.bool)
    start[:, 1:] = (step[:, 1:N] == 0) | ((step[:, :-2] != 0) & (step[:, 1:N] != step[:, :-2]))
    bs, r0s = start.nonzero(as_tuple=True)
    flat = bs * N + r0s
    r1s = torch.cat([flat[1:], flat.new_tensor([B * N])]) - bs * N
    r1s = torch.minimum(r1s, torch.full_like(r1s, N))  # a row's last run ends at N
    width = (hi - lo)[bs, r0s]
    inner = step[bs, r0s + 1]  # the run's own transition (meaningless for one-row runs)
    one_row = r1s - r0s == 1
    kind = torch.where(one_row | (inner == 1), torch.where(width > 0, 1, 0), torch.where(width == 1, 2, 3))
    names = ("empty", "dense", "causal", "odd")
    return [(b, r0, r1, names[c]) for b, r0, r1, c in zip(bs.tolist(), r0s.tolist(), r1s.tolist(), kind.tolist())]


def _pairs(p: Piece) -> int:
    rows = p.r1 - p.r0
    if p.kind == "causal":
        return (p.b1 - p.b0) * rows * (rows + 1) // 2
    return (p.b1 - p.b0) * rows * (p.k1 - p.k0)


def _call_ns(Hq: int, D: int) -> float:
    return _CALL_NS + _CALL_HEAD_DIM_NS * Hq * D


def _pair_ns(Hq: int, D: int) -> float:
    return Hq * (_PAIR_NS + _PAIR_DIM_NS * D)


def plan_cost(pieces: list[Piece], Hq: int, D: int) -> float:
    """Estimated forward + backward nanoseconds of running ``pieces`` (see the constants above)."""
    fixed = len(pieces) * _call_ns(Hq, D) + _ROW_HEAD_NS * Hq * sum(p.b1 - p.b0 for p in pieces)
    return fixed + _pair_ns(Hq, D) * sum(_pairs(p) for p in pieces)


def _chunk_rows(n_keys: int, batch: int) -> int:
    return max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, batch * n_keys)))


def batch_chunks(lo: torch.Tensor, hi: torch.Tensor, max_rows: int = _MAX_CHUNK_ROWS) -> list[Piece]:
    """All batch rows together in masked chunks of at most ``max_rows`` query rows, each over its
    key hull (the hull of the chunk's rows that see anything, in every batch row; chunks that
    see nothing are dropped)."""
    B, N = lo.shape
    lo, hi = lo.long(), hi.long()
    active = lo < hi
    if not bool(active.any()):
        return []
    widest = int(torch.where(active, hi, 0).amax(0).max() - torch.where(active, lo, N).amin(0).min())
    step = min(max_rows, _chunk_rows(min(N, max(1, widest)), B))
    n = -(-N // step)
    pad = n * step - N
    first = torch.nn.functional.pad(torch.where(active, lo, N), (0, pad), value=N).view(B, n, step).amin(dim=(0, 2))
    last = torch.nn.functional.pad(torch.where(active, hi, 0), (0, pad), value=0).view(B, n, step).amax(dim=(0, 2))
    return [
        Piece(0, B, c * step, min(N, (c + 1) * step), k0, k1, "masked")
        for c, (k0, k1) in enumerate(zip(first.tolist(), last.tolist()))
        if k0 < k1
    ]


def _row_chunks(b: int, lo_row: list[int], hi_row: list[int], r0: int, r1: int) -> list[Piece]:
    """Rows ``[r0, r1)`` of batch row b in masked chunks, each over its key hull."""
    step = _chunk_rows(len(lo_row), 1)
    pieces = []
    for c0 in range(r0, r1, step):
        c1 = min(r1, c0 + step)
        seen = [(lo, hi) for lo, hi in zip(lo_row[c0:c1], hi_row[c0:c1]) if lo < hi]
        if seen:
            pieces.append(Piece(b, b + 1, c0, c1, min(lo for lo, _ in seen), max(hi for _, hi in seen), "masked"))
    return pieces


def run_pieces(lo: torch.Tensor, hi: torch.Tensor, Hq: int, D: int) -> list[Piece]:
    """One call per run that is worth a call of its own; the other runs of each batch row in
    masked chunks of consecutive rows. Runs of the same layout in consecutive batch rows share
    one call.

    A run is worth its own call when that (its share of it, for a layout several rows have)
    costs no more than its rows would in masked chunks: their share of those calls, and a key
    hull at least as wide as a chunk (``_MAX_CHUNK_ROWS`` rows, or the row)."""
    fixed_ns, pair_ns = _call_ns(Hq, D) + _ROW_HEAD_NS * Hq, _pair_ns(Hq, D)
    chunk_rows = min(lo.shape[1], _MAX_CHUNK_ROWS)
    lo_l, hi_l = lo.tolist(), hi.tolist()
    runs = [Piece(b, b + 1, r0, r1, lo_l[b][r0], hi_l[b][r1 - 1], kind) for b, r0, r1, kind in find_runs(lo, hi)]
    layouts: dict[tuple, int] = {}
    for p in runs:
        layouts[p[2:]] = layouts.get(p[2:], 0) + 1
    pieces: list[Piece] = []
    pending: list[Piece] = []  # consecutive runs of one batch row, for masked chunks

    def flush():
        if pending:
            b = pending[0].b0
            pieces.extend(_row_chunks(b, lo_l[b], hi_l[b], pending[0].r0, pending[-1].r1))
            pending.clear()

    for p in runs:
        if pending and pending[-1].b0 != p.b0:
            flush()
        if p.kind == "empty":
            flush()
            continue
        rows = p.r1 - p.r0
        alone_ns = fixed_ns / layouts[p[2:]] + pair_ns * _pairs(p)
        in_chunks_ns = fixed_ns * rows / chunk_rows + pair_ns * rows * max(p.k1 - p.k0, chunk_rows)
        if p.kind in ("dense", "causal") and alone_ns <= in_chunks_ns:
            flush()
            pieces.append(p)
        else:
            pending.append(p)
    flush()
    return merge_batch_rows(pieces)


def merge_batch_rows(pieces: list[Piece]) -> list[Piece]:
    """Pieces that differ only in their batch row, for consecutive rows, as one piece (rows of
    the same layout, e.g. equally long samples, then cost one call)."""
    rows_of: dict[tuple, list[int]] = {}
    for p in pieces:
        rows_of.setdefault((p.r0, p.r1, p.k0, p.k1, p.kind), []).append(p.b0)
    merged = []
    for (r0, r1, k0, k1, kind), bs in rows_of.items():
        start = bs[0]
        for prev, b in zip(bs, bs[1:] + [None]):
            if b != prev + 1:
                merged.append(Piece(start, prev + 1, r0, r1, k0, k1, kind))
                start = b
    return merged


def plan(lo: torch.Tensor, hi: torch.Tensor, Hq: int, D: int) -> list[Piece]:
    """The kernel calls that compute attention for the mask ``(lo, hi)``: per-row runs, or
    masked chunks spanning the whole batch, whichever the cost model says is cheaper."""
    lo, hi = lo.cpu(), hi.cpu()
    if lo.shape[0] == 1:
        return run_pieces(lo, hi, Hq, D)
    # Shorter chunks have tighter key hulls but cost more calls: keep the cheapest.
    N = lo.shape[1]
    sizes = sorted({min(_MAX_CHUNK_ROWS, N)} | {rows for rows in (64, 32, 16) if rows < N}, reverse=True)
    options = [batch_chunks(lo, hi, rows) for rows in sizes]
    batched = min(options, key=lambda ps: plan_cost(ps, Hq, D))
    batched_cost = plan_cost(batched, Hq, D)
    # Per-row runs cost at least one call plus every visible pair; when the batched chunks beat
    # that already, skip planning the runs (short rows, where planning them would cost as much
    # as the attention).
    width = (hi.long() - lo.long()).clamp(min=0)
    if batched_cost <= _call_ns(Hq, D) + _pair_ns(Hq, D) * int(width.sum()):
        return batched
    by_runs = run_pieces(lo, hi, Hq, D)
    return batched if batched_cost <= plan_cost(by_runs, Hq, D) else by_runs


_last_plan: list = [None]  # [(key, planned(...))] of the latest forward or backward


def _plan_key(lo: torch.Tensor, hi: torch.Tensor, *extra):
    try:
        return (weakref.ref(lo), weakref.ref(hi), lo._version, hi._version) + extra
    except RuntimeError:  # inference-mode tensors have no version counter: never reused
        return None


def planned(lo: torch.Tensor, hi: torch.Tensor, Hq: int, D: int, dtype: torch.dtype):
    """``plan``, the pieces' masks (None where built on use) and the flat indices of the rows
    that see nothing in a token-major (B, N, Hq) log-sum-exp (None if there are none). The
    backward gets the very tensors ``lo``/``hi`` its forward got, so it reuses the forward's plan
    (and its masks, when small), and so does every layer of a model that shares one mask: the
    key is their identity and version counter, so a mask edited in place in between is planned
    again."""
    key = _plan_key(lo, hi, Hq, D, dtype)
    last = _last_plan[0]
    if key is not None and last is not None:
        last_key = last[0]
        if last_key[0]() is lo and last_key[1]() is hi and last_key[2:] == key[2:]:
            return last[1]
    pieces = plan(lo, hi, Hq, D)
    masked = sum(_pairs(p) for p in pieces if p.kind == "masked")
    masks = [_mask(p, lo, hi, dtype) for p in pieces] if masked <= _CACHED_MASK_ELEMENTS else [None] * len(pieces)
    empty_rows = (lo >= hi).reshape(-1).nonzero().squeeze(1)  # b * N + n
    empty = None
    if empty_rows.numel():
        empty = (empty_rows[:, None] * Hq + torch.arange(Hq, device=lo.device)).reshape(-1)
    result = pieces, masks, empty
    _last_plan[0] = None if key is None else (key, result)
    return result


# ---------------------------------------------------------------------------- execution
def _views(p: Piece, *tensors):
    return [t[p.b0 : p.b1, :, p.r0 : p.r1] for t in tensors]


def _key_views(p: Piece, *tensors):
    return [t[p.b0 : p.b1, :, p.k0 : p.k1] for t in tensors]


def _mask(p: Piece, lo, hi, dtype):
    """The additive (B, 1, R, K) mask of a masked piece (0 where visible, -inf elsewhere), or None."""
    if p.kind != "masked":
        return None
    j = torch.arange(p.k0, p.k1, device=lo.device)
    rows_lo = lo[p.b0 : p.b1, p.r0 : p.r1, None]
    rows_hi = hi[p.b0 : p.b1, p.r0 : p.r1, None]
    hidden = (j < rows_lo) | (j >= rows_hi)
    return torch.where(hidden, float("-inf"), 0.0).to(dtype)[:, None]


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, N, D) stored as (B, N, H, D), or a (B, H, N) lse as (B, N, H): the kernel's own
    layouts, copied only if it is not already."""
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (the usual fp32 case: at the tiny
    demo's shapes each call's fixed host time is a few percent of the attention)."""
    return t if t.dtype == dtype else t.to(dtype)


def _covers_all(pieces: list[Piece], B: int, N: int) -> bool:
    """One call over every batch row, query and key: its outputs are the results as they are."""
    return len(pieces) == 1 and tuple(pieces[0][:6]) == (0, B, 0, N, 0, N)


def attention_forward(q, k, v, lo, hi, scale: float):
    """Returns ``out`` (B, Hq, N, D) in q's dtype and ``lse`` (B, Hq, N), natural log, float32
    (float64 for float64 inputs), both token-major in memory (the kernel's own layouts, so a
    single call's results are returned as they are); rows that see nothing get 0 and +inf."""
    B, Hq, N, D = q.shape
    in_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    q, k, v = (_as(t, dtype) for t in (q, k, v))  # no copy unless the inputs are fp16/bf16
    pieces, masks, empty = planned(lo, hi, Hq, D, dtype)
    if _covers_all(pieces, B, N):  # the tiny demo's shapes: no slicing, no copies
        mask = _mask(pieces[0], lo, hi, dtype) if masks[0] is None else masks[0]
        o, lse = _flash_fwd(q, k, v, 0.0, pieces[0].kind == "causal", attn_mask=mask, scale=scale)
        out, lse = _token_major(_as(o, in_dtype)), _token_major(lse)
    else:
        out = torch.zeros(B, N, Hq, D, dtype=in_dtype, device=q.device).transpose(1, 2)
        lse = torch.full((B, N, Hq), math.inf, dtype=lse_dtype(dtype), device=q.device).transpose(1, 2)
        for p, mask in zip(pieces, masks):
            (qp,) = _views(p, q)
            kp, vp = _key_views(p, k, v)
            mask = _mask(p, lo, hi, dtype) if mask is None else mask
            o, l = _flash_fwd(qp, kp, vp, 0.0, p.kind == "causal", attn_mask=mask, scale=scale)
            out[p.b0 : p.b1, :, p.r0 : p.r1] = o
            lse[p.b0 : p.b1, :, p.r0 : p.r1] = l
    # Masked chunks may hold rows that see nothing: the kernel outputs 0 there (which
    # tests/test_attention_cpu.py holds it to) but a log-sum-exp of 0, and the contract wants +inf.
    if empty is not None:
        lse.transpose(1, 2).view(-1).index_fill_(0, empty, math.inf)
    return out, lse


def attention_backward(do, q, k, v, out, lse, lo, hi, scale: float):
    """Gradients (dq, dk, dv) of ``attention_forward`` (the same pieces, from ``out`` and ``lse``)."""
    B, Hq, N, D = q.shape
    dtype = _compute_dtype(q.dtype)
    in_dtypes = q.dtype, k.dtype, v.dtype
    q, k, v, do, out = (_as(t, dtype) for t in (q, k, v, do, out))
    # The kernel wants the upstream gradient in out's (token-major) layout and otherwise copies
    # it inside, at a multiple of the cost of this one copy.
    do = _token_major(do)
    lse = _as(lse, lse_dtype(dtype))
    pieces, masks, _ = planned(lo, hi, Hq, D, dtype)
    if _covers_all(pieces, B, N):
        mask = _mask(pieces[0], lo, hi, dtype) if masks[0] is None else masks[0]
        grads = _flash_bwd(do, q, k, v, out, lse, 0.0, pieces[0].kind == "causal", attn_mask=mask, scale=scale)
        return tuple(_as(g, t) for g, t in zip(grads, in_dtypes))
    # Token-major like the kernel's gradients, so that every write below is a plain copy.
    grads = [torch.zeros_like(_token_major(t)) for t in (q, k, v)]
    for p, mask in zip(pieces, masks):
        qp, dop, op, lp = _views(p, q, do, out, lse)
        kp, vp = _key_views(p, k, v)
        mask = _mask(p, lo, hi, dtype) if mask is None else mask
        gq, gk, gv = _flash_bwd(dop, qp, kp, vp, op, lp, 0.0, p.kind == "causal", attn_mask=mask, scale=scale)
        grads[0][p.b0 : p.b1, :, p.r0 : p.r1] = gq
        grads[1][p.b0 : p.b1, :, p.k0 : p.k1] += gk
        grads[2][p.b0 : p.b1, :, p.k0 : p.k1] += gv
    return tuple(_as(g, t) for g, t in zip(grads, in_dtypes))
