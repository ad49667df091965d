"""The Hopper forward with a warp-specialised full-tile loop (opt-in: ``config.forward_path("tma_ws")``).

Triton 3.6 warp-specialises a loop (``tl.range(..., warp_specialize=True)``: a producer warp
issues the TMA loads, two consumer warp groups of 64 rows each run the products and the softmax)
only when it is the kernel's one loop and carries no element mask; with the masked edge loops
of ``triton_fwd_tma`` in the same kernel the pass fails. So the forward runs in two passes over
the same tiles and bounds (``mask.query_tile_bounds``):

1. ``_attn_fwd_full_ws_kernel`` (here): each query tile's full key tiles, the ones every active
   row sees whole, unmasked and warp-specialised, into an fp32 partial: the output normalised by
   its own sum and the log-sum-exp in the forward's log2 units (written only for tiles that have
   full key tiles).
2. ``triton_fwd_tma._attn_fwd_tma_kernel`` with ``FULL_DONE``: the masked edge tiles, merged with
   that partial as one more online-softmax step, and the final output and lse as the one-pass
   forward writes them.

Each pass takes its tiles heaviest first by its own loop's work (``tile_schedule(loops=...)``).
The partial costs an fp32 (B, Hq, N, D) buffer while the forward runs (4 bytes per element: 0.8
GB at 128k tokens and 12 heads) and 8 bytes of traffic per element of the tiles that have full key
tiles (written once, read once in the edge pass's epilogue, where nothing overlaps it): ~200 MB at
16k tokens and 12 heads, a few percent of that forward's time at H200 bandwidth, relatively more
for masks with few full tiles (short segments, the bridge's block B). Whether the overlap pays for
that and for the second launch is a GPU question still open (the full-tile loop is 3.52 SASS
instructions per key per consumer warp here against 3.84 in the one-pass TMA kernel,
``tests/sm90_compile.py``), so the one-pass kernel stays the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import query_tile_bounds
from .config import KernelConfig, block_d_for
from .triton_common import (LOG2E, dot_precision, load_bounds, mask_if, online_softmax_step, scheduled_tile,
                             tile_schedule)
from .triton_fwd_tma import launch_tma_forward, load_desc_tile, tile_descriptor


@triton.jit
def _attn_fwd_full_ws_kernel(
    desc_q, desc_k, desc_v, Part, LsePart, Bounds, Order,
    stride_pb, stride_ph, stride_pn,
    N, H_Q, GROUP, D, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """desc_q: (B, H_Q, N, D) with blocks [1, 1, BLOCK_M, BLOCK_D]; desc_k, desc_v: (B, H_Q // GROUP,
    N, D) with blocks [1, 1, BLOCK_N, BLOCK_D]. Part: (B, H_Q, N, D) fp32, last stride 1; LsePart:
    (B, H_Q, N) fp32 contiguous. Bounds from ``mask.query_tile_bounds``; Order the heavy-first tile
    (by full-tile iterations) of each program. Tiles without full key tiles write nothing (their
    store is masked off) and the edge pass reads nothing for them.

    No early exit and no masks inside the loop: either keeps triton 3.6 from warp-specialising it
    (so a tile without full key tiles still loads its Q and runs an empty loop).
    Rows that see nothing run through the loop too; the edge pass writes them as zeros."""
    num_tiles = tl.cdiv(N, BLOCK_M)
    pid_m, pid_bh = scheduled_tile(Order, num_tiles)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    row0 = pid_m * BLOCK_M
    _, full_start, full_end, _ = load_bounds(Bounds, b, pid_m, num_tiles)

    q = load_desc_tile(desc_q, b, h, row0, BLOCK_M, BLOCK_D)
    # Finite start for the running max, as in the one-pass kernels.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    h_kv = h // GROUP
    for start_n in tl.range(full_start, full_end, BLOCK_N, warp_specialize=True):
        k = load_desc_tile(desc_k, b, h_kv, start_n, BLOCK_N, BLOCK_D)
        v = load_desc_tile(desc_v, b, h_kv, start_n, BLOCK_N, BLOCK_D)
        # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N], raw (unscaled) scores
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, scale_log2, DOT_PRECISION)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    # Every row of a tile with full key tiles summed at least its own maximum (l >= 1; nothing is
    # masked here); the other tiles' values (0 / 0) are not stored.
    out = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    # A pointer store: the consumers each hold 64 of the 128 rows, and a descriptor store of the
    # whole tile does not type-check after the split.
    part_ptrs = (Part + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
                 + offs_m[:, None].to(tl.int64) * stride_pn + offs_d[None, :])
    has_full = full_start < full_end
    tl.store(part_ptrs, out, mask=mask_if(has_full, row_ok[:, None] & (offs_d[None, :] < D)))
    tl.store(LsePart + (b.to(tl.int64) * H_Q + h) * N + offs_m, lse, mask=mask_if(has_full, row_ok))


def attention_fwd_tma_ws(q, k, v, lo, hi, scale: float, cfg: KernelConfig, full_cfg: KernelConfig):
    """The two-pass forward; contract of ``triton_fwd_tma.attention_fwd_tma``. ``cfg``: the edge
    pass's tiles and launch (``config.tma_fwd_config``), ``full_cfg``: the full-tile pass's
    (``config.tma_ws_config``); both passes walk the same tiles, so their block sizes must agree."""
    if (cfg.block_m, cfg.block_n) != (full_cfg.block_m, full_cfg.block_n):
        raise ValueError(f"attention_fwd_tma_ws: both passes need the same tiles, got {cfg} and {full_cfg}")
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    part = torch.empty(B, Hq, N, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    bounds = query_tile_bounds(lo, hi, cfg.block_m, cfg.block_n)
    full = tile_schedule(bounds, cfg.block_n, Hq, loops="full")
    _attn_fwd_full_ws_kernel[(full.programs,)](
        tile_descriptor(q, cfg.block_m, block_d), tile_descriptor(k, cfg.block_n, block_d),
        tile_descriptor(v, cfg.block_n, block_d), part, lse_part, full.bounds, full.order, *part.stride()[:3],
        N, Hq, Hq // Hkv, D, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=full_cfg.num_warps, num_stages=full_cfg.num_stages,
    )
    edges = tile_schedule(bounds, cfg.block_n, Hq, loops="edges")
    return launch_tma_forward(q, k, v, lo, hi, scale, cfg, edges, full_partial=(part, lse_part))
