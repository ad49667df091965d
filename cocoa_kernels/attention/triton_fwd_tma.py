"""Forward kernel of interval-masked flash attention on Hopper: tensor descriptors (TMA).

Same work split and contract as ``triton_fwd``: one program per query tile of one (batch, query
head), heaviest tile first (``fwd_schedule``), three key loops over the bounds from
``mask.query_tile_bounds`` (masked edge, unmasked full tiles, masked edge), rows that see nothing
written as zeros with ``lse = +inf``. What differs is how tiles move:

- Q, K, V and the output move by TMA through host-side 4-D descriptors over the tensors as
  (B, H, N, D) with their own strides, one [1, 1, rows, BLOCK_D] block per tile: rows past N and
  columns past D read as zeros and are not written, so neither row nor head-dim masks exist in
  the kernel, and a tile at the end of one head never reads the next. The copy engine does the
  address arithmetic (in 64 bits), so no pointer tiles occupy registers; that is what lets
  128x128 tiles at D = 128 fit without spills, where the pointer path spills.
- Not warp-specialised itself: triton 3.6's Hopper pass (``tl.range(..., warp_specialize=True)``)
  fails on a kernel with the masked edge loops in it ("'scf.for' op operation destroyed but still
  has uses") and ignores the flag at 8 warps. ``triton_fwd_ws`` (opt-in) therefore runs the full
  tiles in a kernel of their own, warp-specialised, and this kernel with ``FULL_DONE`` then runs
  only the edges and merges. Unspecialised, the full-tile loop here is 3.84 SASS instructions per
  key at D = 128 (``tests/sm90_compile.py``).

Softmax form shared with the backward (so both recompute identical probabilities): the raw score
``qk = q @ k^T`` is masked as it is, the running max is kept in scaled log2 units and
``p = exp2(qk * scale_log2 - m)`` is one expression (one FFMA and one MUFU.EX2 per score).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .config import KernelConfig, block_d_for, current_forward_path, device_capability, tma_fwd_config
from .triton_common import LOG2E, dot_precision, load_bounds, mask_if, online_softmax_step, scheduled_tile
from .triton_fwd import fwd_loop_splits, fwd_schedule

_TMA_DTYPES = (torch.float16, torch.bfloat16)
_TMA_ALIGN = 16  # bytes: base address and every stride but the last, as the copy engine requires
_TMA_MAX_STRIDE = 1 << 40  # bytes: the descriptor's stride fields are 40 bits wide
_MAX_BLOCK_D = 128  # the widest head-dim tile the configs size shared memory for


@triton.jit
def load_desc_tile(desc, b, h, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [ROWS, BLOCK_D] tile of head ``h`` of batch ``b`` from row ``row``; zeros past N and D."""
    return desc.load([b, h, row, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def _fwd_tma_inner(
    acc, l_i, m_i, q, desc_k, desc_v, b, h_kv, lo, hi, start, end, scale_log2,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k = load_desc_tile(desc_k, b, h_kv, start_n, BLOCK_N, BLOCK_D)
        v = load_desc_tile(desc_v, b, h_kv, start_n, BLOCK_N, BLOCK_D)
        # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N], raw (unscaled) scores
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            cols = start_n + offs_n
            visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, scale_log2, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, Lse, Lo, Hi, Bounds, Order, Part, LsePart,
    stride_pb, stride_ph, stride_pn,
    N, H_Q, GROUP, D, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FULL_DONE: tl.constexpr,
):
    """desc_q, desc_o: (B, H_Q, N, D) with blocks [1, 1, BLOCK_M, BLOCK_D]; desc_k, desc_v:
    (B, H_Q // GROUP, N, D) with blocks [1, 1, BLOCK_N, BLOCK_D]. The rest as ``triton_fwd``:
    Lse (B, H_Q, N) float32 in log2 units, +inf for rows that see nothing; Lo, Hi (B, N) int32
    with the causal limit folded into Hi; Bounds from ``mask.query_tile_bounds``; Order the
    heavy-first tile of each program.
    FULL_DONE: the full-tile loop already ran in ``triton_fwd_ws``'s warp-specialised pass, which
    left Part (B, H_Q, N, D) fp32, last stride 1, normalised by its own sum, and LsePart (B, H_Q, N)
    fp32 in the same log2 units, for the tiles that have full key tiles (the others are not
    written): this kernel runs the two masked edge loops only and merges that partial into its
    result. Otherwise Part and LsePart are unused."""
    num_tiles = tl.cdiv(N, BLOCK_M)
    pid_m, pid_bh = scheduled_tile(Order, num_tiles)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    # int64: b * N + row passes 2**31 for a (B, N) mask of more than 2**31 elements.
    row_base = b.to(tl.int64) * N
    lo = tl.load(Lo + row_base + offs_m, mask=row_ok, other=0)
    hi = tl.load(Hi + row_base + offs_m, mask=row_ok, other=0)
    active = row_ok & (lo < hi)
    start, full_start, full_end, end = load_bounds(Bounds, b, pid_m, num_tiles)

    q = load_desc_tile(desc_q, b, h, row0, BLOCK_M, BLOCK_D)
    # Finite start for the running max: a fully masked tile then gives p = exp2(-inf) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    h_kv = h // GROUP
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, h_kv, lo, hi, start, full_start,
                                   scale_log2, BLOCK_N, BLOCK_D, True, DOT_PRECISION)
    if not FULL_DONE:
        acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, h_kv, lo, hi, full_start, full_end,
                                       scale_log2, BLOCK_N, BLOCK_D, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, h_kv, lo, hi, full_end, end,
                                   scale_log2, BLOCK_N, BLOCK_D, True, DOT_PRECISION)
    lse_rows = row_base * H_Q + h.to(tl.int64) * N + offs_m
    if FULL_DONE:
        # Merge the full tiles' partial as one more step of the online softmax: its lse is the
        # running max and log-sum of those tiles in the same units, its rows their normalised output.
        # A tile without full key tiles has no partial (the pass wrote none): nothing is read.
        has_full = full_start < full_end
        offs_d = tl.arange(0, BLOCK_D)
        part_ptrs = (Part + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
                     + offs_m[:, None].to(tl.int64) * stride_pn + offs_d[None, :])
        o_full = tl.load(part_ptrs, mask=mask_if(has_full, row_ok[:, None] & (offs_d[None, :] < D)),
                         other=0.0)
        lse_full = tl.load(LsePart + lse_rows, mask=mask_if(has_full, row_ok), other=float("-inf"))
        m_new = tl.maximum(m_i, lse_full)
        alpha = tl.math.exp2(m_i - m_new)
        w_full = tl.math.exp2(lse_full - m_new)  # 0 where the pass saw nothing (lse -inf, m finite)
        acc = acc * alpha[:, None] + o_full * w_full[:, None]
        l_i = l_i * alpha + w_full
        m_i = m_new

    l_safe = tl.where(active, l_i, 1.0)
    out = tl.where(active[:, None], acc / l_safe[:, None], 0.0)
    # log2 units, exactly what the backward's exp2(qk * scale_log2 - lse) expects.
    lse = tl.where(active, m_i + tl.math.log2(l_safe), float("inf"))
    desc_o.store([b, h, row0, 0], out.to(desc_o.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(Lse + lse_rows, lse, mask=row_ok)


def _strides_take_tma(t: torch.Tensor) -> bool:
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % _TMA_ALIGN == 0
            and all((s * size) % _TMA_ALIGN == 0 and s * size < _TMA_MAX_STRIDE for s in t.stride()[:-1]))


def tma_forward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          capability: tuple[int, int] | None = None) -> bool:
    """Whether ``attention_fwd_tma`` can run these inputs: a GPU of compute capability 9.0 or
    later (``capability``; default the tensors' device's, and False off CUDA), fp16 or bf16, a
    head dim of at most 128 whose rows are a whole number of 16-byte units (the output's strides
    are multiples of it), and q, k, v each with a contiguous last dimension, a 16-byte-aligned
    start and every other stride a multiple of 16 bytes (what a TMA descriptor takes)."""
    if capability is None:
        if not q.is_cuda:
            return False
        capability = device_capability(q.device)  # cached: this runs on every forward
    if tuple(capability) < (9, 0):
        return False
    if q.dtype not in _TMA_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    D = q.shape[-1]
    if block_d_for(D) > _MAX_BLOCK_D or (D * q.element_size()) % _TMA_ALIGN:
        return False
    return all(_strides_take_tma(t) for t in (q, k, v))


def tma_forward_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                      capability: tuple[int, int] | None = None, sms: int | None = None) -> KernelConfig | None:
    """The tiles to run this launch's forward with here (also the warp-specialised forward's, under
    ``config.forward_path("tma_ws")``), or None for the pointer forward: None under
    ``config.forward_path("pointer")``, for inputs :func:`tma_forward_supported` refuses,
    and for grids short enough that the pointer forward splits their key loops
    (``triton_fwd.fwd_loop_splits`` > 1 at these tiles), which this kernel does not do.
    ``capability``/``sms``: the GPU's (default the tensors' device's; ``bench/work_model.py``
    passes a Hopper's for meta tensors)."""
    if current_forward_path() == "pointer" or not tma_forward_supported(q, k, v, capability):
        return None
    tiles = tma_fwd_config(block_d_for(q.shape[-1]), on_gpu=True)
    return tiles if fwd_loop_splits(lo, q.shape[1], tiles, q.device, sms=sms) == 1 else None


def tile_descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """(B, H, N, D) ``t`` with its own strides, read and written a [rows, block_d] tile at a time."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def attention_fwd_tma(q, k, v, lo, hi, scale: float, cfg: KernelConfig):
    """The forward through tensor descriptors; contract of ``triton_fwd.attention_fwd``.

    q (B, Hq, N, D), k/v (B, Hkv, N, D) accepted by :func:`tma_forward_supported`; lo/hi int32
    (B, N) contiguous. Returns ``out`` (B, Hq, N, D) laid out as (B, N, Hq, D) and ``lse``
    (B, Hq, N) float32 in log2 units.
    """
    return launch_tma_forward(q, k, v, lo, hi, scale, cfg, fwd_schedule(lo, hi, q.shape[1], cfg))


def launch_tma_forward(q, k, v, lo, hi, scale: float, cfg: KernelConfig, sched, full_partial=None):
    """``_attn_fwd_tma_kernel`` over ``sched``'s tiles; ``full_partial``: the (part, lse_part) the
    warp-specialised full-tile pass left (``triton_fwd_ws``), when it ran: then only the edge loops
    run here, merged with it."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    part, lse_part = (lse, lse) if full_partial is None else full_partial
    part_strides = (0, 0, 0) if full_partial is None else part.stride()[:3]
    block_d = block_d_for(D)
    _attn_fwd_tma_kernel[(sched.programs,)](
        tile_descriptor(q, cfg.block_m, block_d), tile_descriptor(k, cfg.block_n, block_d),
        tile_descriptor(v, cfg.block_n, block_d), tile_descriptor(out, cfg.block_m, block_d),
        lse, lo, hi, sched.bounds, sched.order, part, lse_part, *part_strides,
        N, Hq, Hq // Hkv, D, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), FULL_DONE=full_partial is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse
