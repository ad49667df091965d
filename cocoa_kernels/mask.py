"""The O(N) attention mask: one contiguous key interval per query.

Query ``i`` of row ``b`` sees key ``j`` iff ``lo[b, i] <= j < hi[b, i]`` (and ``j <= i`` when
``causal``). Every mask CoCoA needs has this form (see ``shared/DESIGN.md``, "The mask
contract"): causal or bidirectional attention over packed segments, the EOS bridge, padding
(an empty interval), sliding windows and prefix-LM masks.

Builders validate once, here, so the attention hot path never synchronises with the device; under
``torch.compile`` the same checks run on the device (:func:`refuse`).
"""

from __future__ import annotations

import torch

__all__ = ["KeyRanges", "key_tile_bounds", "query_tile_bounds", "refuse", "tile_loop_iterations"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
EOS_SEES = ("block_a", "all")  # what the bridge row of KeyRanges.eos_bridge sees


def _check_int_matrix(name: str, t, batch_shape=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N), got {tuple(t.shape)}")
    if batch_shape is not None and tuple(t.shape) != tuple(batch_shape):
        raise ValueError(f"{name} must have shape {tuple(batch_shape)}, got {tuple(t.shape)}")
    return t


def refuse(bad: torch.Tensor, message) -> None:
    """Raise ``ValueError(message(b, i))`` at the first True ``[b, i]`` of ``bad`` (B, N).

    Reading a tensor's value on the host breaks a ``torch.compile`` graph (and synchronises with
    the device), so under compile the same check runs on the device instead: the compiled run
    fails with a generic message (run eagerly to see where and why), never a silently wrong mask.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "cocoa: invalid attention mask (run without torch.compile for the "
                                        "position and the reason)")
        return
    if bool(bad.any()):
        b, i = torch.nonzero(bad)[0].tolist()
        raise ValueError(message(b, i))


def _runs(segment_ids: torch.Tensor):
    """Start and end (exclusive) of the run of equal ids that contains each position."""
    B, N = segment_ids.shape
    pos = torch.arange(N, device=segment_ids.device).expand(B, N)
    new_run = torch.ones_like(segment_ids, dtype=torch.bool)
    new_run[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    run_ends = torch.ones_like(new_run)
    run_ends[:, :-1] = new_run[:, 1:]
    end_mark = torch.where(run_ends, pos + 1, torch.full_like(pos, N))
    end = end_mark.flip(1).cummin(dim=1).values.flip(1)
    return start, end, new_run


class KeyRanges:
    """Per-query key intervals ``[lo, hi)`` plus a ``causal`` flag.

    Attributes:
        lo, hi: int32 tensors of shape (B, N).
        causal: when True, query ``i`` additionally sees only keys ``j <= i``.

    Build it with :meth:`from_segments`, :meth:`eos_bridge`, :meth:`from_cu_seqlens`, or raw
    as ``KeyRanges(lo, hi, causal=False)``. A query whose interval is empty sees nothing: its
    attention output is zero and its gradients are zero.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, causal: bool = False):
        _check_int_matrix("lo", lo)
        _check_int_matrix("hi", hi, batch_shape=lo.shape)
        if lo.device != hi.device:
            raise ValueError(f"lo and hi must be on the same device, got {lo.device} and {hi.device}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        B, N = lo.shape
        if N >= 2**31 - 1:
            raise ValueError(f"sequence length {N} does not fit the int32 interval bounds")
        lo64, hi64 = lo.long(), hi.long()
        for name, t in (("lo", lo64), ("hi", hi64)):
            refuse((t < 0) | (t > N), lambda b, i, name=name, t=t: (
                f"{name}[{b}, {i}] = {int(t[b, i])} is outside [0, N] with N = {N}; intervals must lie inside the row"))
        refuse(lo64 > hi64, lambda b, i: f"lo > hi at [{b}, {i}]: lo = {int(lo64[b, i])}, hi = {int(hi64[b, i])}")
        self.lo = lo.to(torch.int32).contiguous()
        self.hi = hi.to(torch.int32).contiguous()
        self.causal = causal

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor, causal: bool = False) -> "KeyRanges":
        """Attention inside each segment; ``segment_ids`` (B, N) int, ``-1`` marks padding.

        Each segment id must occupy one contiguous run of its row (packed samples).
        """
        seg, start, end, new_run = _segments(segment_ids)
        pad = seg < 0
        zero = torch.zeros_like(start)
        return cls(torch.where(pad, zero, start), torch.where(pad, zero, end), causal=causal)

    @classmethod
    def eos_bridge(cls, segment_ids: torch.Tensor, is_target: torch.Tensor, eos_sees: str = "block_a") -> "KeyRanges":
        """The EOS-bridge mask of CoCoA stage 2.

        Each segment is block A (its leading tokens, the last of which is the bridge ``<EOS>``)
        followed by block B (the tokens where ``is_target`` is True). A attends bidirectionally
        inside A; B attends to itself and to the EOS of A, nothing else of A. The bridge row itself
        sees block A (``eos_sees="block_a"``: B learns A through the EOS alone) or the whole
        segment (``eos_sees="all"``: A, itself and B, as the authors' code masks it). Block B may be
        empty; block A must hold at least one token.
        """
        _check_int_matrix("segment_ids", segment_ids)
        if eos_sees not in EOS_SEES:
            raise ValueError(f"eos_sees must be one of {EOS_SEES}, got {eos_sees!r}")
        if not isinstance(is_target, torch.Tensor) or is_target.dtype != torch.bool:
            raise TypeError("is_target must be a bool tensor")
        if tuple(is_target.shape) != tuple(segment_ids.shape):
            raise ValueError(f"is_target must have shape {tuple(segment_ids.shape)}, got {tuple(is_target.shape)}")
        if is_target.device != segment_ids.device:
            raise ValueError("is_target must be on the same device as segment_ids")
        seg, start, end, new_run = _segments(segment_ids)
        pad = seg < 0
        refuse(is_target & pad, lambda b, i: f"is_target[{b}, {i}] is True on a padding position (segment id -1)")
        first_of_seg = new_run & ~pad
        refuse(is_target & first_of_seg, lambda b, i: (
            f"the segment starting at [{b}, {i}] has no block-A token: its first token is a "
            "target; block A (ending in the bridge <EOS>) needs at least one token"))
        # Block B must be a contiguous suffix: no target token followed by a non-target one
        # inside the same segment.
        back_to_a = torch.zeros_like(pad)
        back_to_a[:, 1:] = is_target[:, :-1] & ~is_target[:, 1:] & ~new_run[:, 1:]
        refuse(back_to_a, lambda b, i: (
            f"block B is not a contiguous suffix of its segment: position [{b}, {i}] is block A "
            "but follows a block-B token of the same segment"))
        # Position just past the last A token of each segment = first B token (or segment end).
        B, N = seg.shape
        pos = torch.arange(N, device=seg.device).expand(B, N)
        # For an A token: the next target at or after it, if inside its segment, else the end.
        next_target = torch.where(is_target, pos, torch.full_like(pos, N))
        next_target = next_target.flip(1).cummin(dim=1).values.flip(1)
        a_end = torch.minimum(next_target, end)
        # For a B token: the first target of its segment, the latest B start at or before it.
        b_starts = is_target & ~_shift_right(is_target, new_run)
        first_b = torch.where(b_starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        a_end = torch.where(is_target, first_b, a_end)
        lo = torch.where(is_target, a_end - 1, start)
        hi = torch.where(is_target, end, a_end)
        if eos_sees == "all":  # the bridge (block A's last token) sees its whole segment
            hi = torch.where(~is_target & (pos == a_end - 1), end, hi)
        zero = torch.zeros_like(lo)
        return cls(torch.where(pad, zero, lo), torch.where(pad, zero, hi), causal=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, causal: bool = False, length: int | None = None) -> "KeyRanges":
        """One packed row (B = 1) from flash-attn style cumulative lengths ``[0, l0, l0+l1, ...]``.

        ``length``: the row's length N (``cu_seqlens[-1]``) when the caller knows it from a tensor's
        shape; required under ``torch.compile``, where ``cu_seqlens``'s values cannot be read."""
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in _INT_DTYPES:
            raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 1, got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.long()
        if torch.compiler.is_compiling():  # the values cannot be read: checked on the device below
            if length is None:
                raise ValueError("KeyRanges.from_cu_seqlens: pass length= under torch.compile (the row's length "
                                 "cannot be read from cu_seqlens there)")
            torch._check(cu.numel() >= 2)
            N = length
            refuse((cu[[0, -1]] != torch.tensor([0, N], device=cu.device))[None], lambda b, i: "")
        else:
            if cu.numel() < 2:
                raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 1, got {tuple(cu_seqlens.shape)}")
            if int(cu[0]) != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
            N = int(cu[-1])
            if length is not None and N != length:
                raise ValueError(f"cu_seqlens ends at {N} but the row has length {length}")
        if N < 1:
            raise ValueError("cu_seqlens describes an empty row (total length 0)")
        refuse((cu[1:] < cu[:-1])[None], lambda b, i: f"cu_seqlens must be non-decreasing (entry {i + 1})")
        # position p lies in segment s where cu[s] <= p < cu[s + 1] (empty segments hold none)
        seg = torch.searchsorted(cu, torch.arange(N, device=cu.device), right=True) - 1
        return cls(cu[seg].view(1, N), cu[seg + 1].view(1, N), causal=causal)

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "KeyRanges":
        """From a (B, N, N) boolean mask whose every row is one contiguous run of True (or empty).

        The inverse of :meth:`to_dense` (with ``causal=False``); rows that are not an interval are
        an error. Costs O(N^2): meant for masks that arrive dense, not for the training loop.
        """
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool:
            raise TypeError("dense must be a bool tensor")
        if dense.dim() != 3 or dense.shape[1] != dense.shape[2]:
            raise ValueError(f"dense must have shape (B, N, N), got {tuple(dense.shape)}")
        N = dense.shape[-1]
        count = dense.sum(-1)
        lo = torch.where(count > 0, dense.int().argmax(-1), 0)
        hi = torch.where(count > 0, N - dense.flip(-1).int().argmax(-1), 0)
        refuse((hi - lo) != count, lambda b, i: (
            f"row {i} of batch {b} of the dense mask is not one contiguous interval of keys; "
            "cocoa attention needs one [lo, hi) interval per query"))
        return cls(lo, hi)

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    @property
    def device(self) -> torch.device:
        return self.lo.device

    def to(self, device) -> "KeyRanges":
        out = KeyRanges.__new__(KeyRanges)
        out.lo, out.hi, out.causal = self.lo.to(device), self.hi.to(device), self.causal
        return out

    def effective_hi(self) -> torch.Tensor:
        """``hi`` with the causal limit folded in (``min(hi, i + 1)``): what the kernels use."""
        if not self.causal:
            return self.hi
        N = self.hi.shape[1]
        limit = torch.arange(1, N + 1, device=self.hi.device, dtype=torch.int32)
        return torch.minimum(self.hi, limit)

    def to_dense(self) -> torch.Tensor:
        """The (B, N, N) boolean mask, ``dense[b, i, j]`` = query i sees key j. For references."""
        N = self.lo.shape[1]
        j = torch.arange(N, device=self.lo.device)
        return (j >= self.lo[:, :, None]) & (j < self.effective_hi()[:, :, None])

    def __repr__(self) -> str:
        B, N = self.lo.shape
        return f"KeyRanges(B={B}, N={N}, causal={self.causal}, device={self.device})"


def _shift_right(x: torch.Tensor, new_run: torch.Tensor) -> torch.Tensor:
    """x[i-1] within the same run, False at the first position of each run."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out & ~new_run


def _segments(segment_ids: torch.Tensor):
    """Validated segment ids (int64) and, per position, its run's start, end and run-start flag."""
    seg = _check_int_matrix("segment_ids", segment_ids).long()
    refuse(seg < -1, lambda b, i: f"segment_ids[{b}, {i}] = {int(seg[b, i])}; ids must be >= 0, or -1 for padding")
    start, end, new_run = _runs(seg)
    _check_contiguous_segments(seg, new_run)
    return seg, start, end, new_run


def _check_contiguous_segments(seg: torch.Tensor, new_run: torch.Tensor) -> None:
    # A segment id that starts more than one run in its row is split by another id.
    starts = torch.where(new_run & (seg >= 0), seg, torch.full_like(seg, -1))
    ordered, _ = starts.sort(dim=1)
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    refuse(dup, lambda b, i: (
        f"segment {int(ordered[b, i + 1])} of row {b} is not contiguous: each segment id must "
        "occupy one run of consecutive positions"))


def _query_tile_stats(lo: torch.Tensor, hi: torch.Tensor, block_m: int):
    """Per query tile of ``block_m`` rows, over its active rows (non-empty interval):
    min lo, max hi (the key hull) and max lo, min hi (the keys every active row sees)."""
    B, N = lo.shape
    nq = -(-N // block_m)
    pad = nq * block_m - N
    lo, hi = lo.long(), hi.long()
    if pad:
        lo = torch.nn.functional.pad(lo, (0, pad))
        hi = torch.nn.functional.pad(hi, (0, pad))
    active = lo < hi
    big = torch.full_like(lo, N)
    zero = torch.zeros_like(lo)

    def per_tile(x, fill, reduce):
        return reduce(torch.where(active, x, fill).view(B, nq, block_m), -1)

    return (
        per_tile(lo, big, torch.amin),
        per_tile(hi, zero, torch.amax),
        per_tile(lo, zero, torch.amax),
        per_tile(hi, big, torch.amin),
    )


def query_tile_bounds(lo: torch.Tensor, hi: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """For each query tile, the key loop of the forward and dQ kernels.

    ``hi`` must already have any causal limit folded in. Returns int32 (B, n_query_tiles, 4):
    key positions ``[start, full_start, full_end, end)``. Keys in ``[start, end)`` cover the
    tile's hull; key tiles in ``[full_start, full_end)`` are seen whole by every row of the tile
    that sees anything, so the kernel skips element masking there. All are multiples of
    ``block_n`` except ``end``. A tile with no active row gets empty loops.
    """
    min_lo, max_hi, max_lo, min_hi = _query_tile_stats(lo, hi, block_m)
    any_active = max_hi > 0
    start = torch.div(min_lo, block_n, rounding_mode="floor") * block_n
    full_start = -torch.div(-max_lo, block_n, rounding_mode="floor") * block_n
    full_end = torch.div(min_hi, block_n, rounding_mode="floor") * block_n
    has_full = (full_end > full_start) & any_active
    end = max_hi
    full_start = torch.where(has_full, full_start, end)
    full_end = torch.where(has_full, full_end, end)
    start = torch.where(any_active, start, 0)
    return torch.stack([start, full_start, full_end, end], dim=-1).to(torch.int32).contiguous()


def key_tile_bounds(lo: torch.Tensor, hi: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """For each key tile, the query rows that can see it, for the dK/dV kernel.

    ``hi`` must already have any causal limit folded in. Returns int32 (B, n_key_tiles, 4):
    ``[q_begin, full_begin, full_end, q_end)`` in query rows (multiples of ``block_m``, except
    that ``q_end`` may stop at a partial last tile, and that ``full_begin == full_end == q_end``
    when no tile is full). Query tiles in ``[q_begin, q_end)`` include every tile with a row that
    sees the key tile; those in ``[full_begin, full_end)`` lie inside the row and see it whole in
    every row that sees anything, so the kernel skips element masking there.

    O(B (nq + nk)): monotone envelopes of the per-tile statistics plus binary searches. For the
    masks CoCoA uses (causal/bidirectional segments, EOS bridge, windows) the per-tile bounds are
    non-decreasing and the result is exact; for any other interval mask it is a conservative
    cover (extra tiles run masked, never the other way round). No host synchronisation.
    """
    B, N = lo.shape
    nk = -(-N // block_n)
    min_lo, max_hi, max_lo, min_hi = _query_tile_stats(lo, hi, block_m)
    k0 = (torch.arange(nk, device=lo.device) * block_n).expand(B, nk).contiguous()
    k1 = k0 + block_n

    def searchsorted(sorted_rows, values, right):
        return torch.searchsorted(sorted_rows.contiguous(), values, right=right)

    # A tile m can touch key tile t only if max_hi[m] > k0 and min_lo[m] < k1. Every tile before
    # the first whose running max of max_hi passes k0 fails the first test; every tile from the
    # first whose suffix min of min_lo reaches k1 fails the second.
    run_max_hi = max_hi.cummax(dim=1).values
    suf_min_lo = min_lo.flip(1).cummin(dim=1).values.flip(1)
    q_begin = searchsorted(run_max_hi, k0, right=True)
    q_end = searchsorted(suf_min_lo, k1, right=False)
    untouched = q_end <= q_begin
    q_begin = torch.where(untouched, 0, q_begin)
    q_end = torch.where(untouched, 0, q_end)
    # Full tiles: max_lo[m] <= k0 for a prefix of tiles (running max) and min_hi[m] >= k1 for a
    # suffix (suffix min); the partial last query tile never counts (unmasked loads stay in the row).
    run_max_lo = max_lo.cummax(dim=1).values
    suf_min_hi = min_hi.flip(1).cummin(dim=1).values.flip(1)
    f_end = searchsorted(run_max_lo, k0, right=True)
    f_begin = searchsorted(suf_min_hi, k1, right=False)
    f_begin = torch.maximum(f_begin, q_begin)
    f_end = torch.minimum(torch.minimum(f_end, q_end), torch.full_like(f_end, N // block_m))
    no_full = f_end <= f_begin
    f_begin = torch.where(no_full, q_end, f_begin)
    f_end = torch.where(no_full, q_end, f_end)
    rows = torch.stack([q_begin, f_begin, f_end, q_end], dim=-1) * block_m
    return rows.clamp_(max=N).to(torch.int32).contiguous()


def tile_loop_iterations(bounds: torch.Tensor, step: int) -> torch.Tensor:
    """Iterations of the three loops (masked, unmasked, masked) a kernel runs over one tile's
    ``bounds`` from :func:`query_tile_bounds` (``step = block_n``) or :func:`key_tile_bounds`
    (``step = block_m``): int64, the bounds' shape without the last dimension of 4.

    Each loop takes ``range(begin, end, step)``, so a loop costs ``cdiv(end - begin, step)``;
    this is the work the schedulers sort on and ``bench/work_model.py`` sums. No host sync."""
    b = bounds.long()
    edges = b[..., 1:] - b[..., :-1]  # the three loops' extents, never negative
    return (-torch.div(-edges, step, rounding_mode="floor")).sum(-1)
