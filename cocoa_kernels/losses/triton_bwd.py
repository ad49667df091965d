"""Backward of the fused linear cross-entropy: d_hidden, d_weight and d_bias, and the launcher.

``dz = g * (softmax(z) - onehot(target))`` is the gradient of the logits ``z``. The launcher
gathers the n counted rows once (``h_c``, (n, H); into the first n rows of the d_hidden output,
which are free until the end) and walks the vocab in chunks of C columns:

1. ``_lce_dlogits_kernel`` recomputes the chunk's logits tile by tile from ``h_c`` and the weight
   rows (a GEMM over H with an fp32 accumulator), turns them into ``dz`` with the forward's
   log-sum-exp and stores ``dz`` (n, C) in the inputs' dtype;
2. ``d_weight[chunk] = dz.T @ h_c``: one GEMM whose reduction runs over all counted rows, in
   fp32, rounded once into the chunk's rows of ``d_weight`` (no accumulator across chunks);
3. ``dh_c += dz @ weight[chunk]``: accumulated in place into an (n, H) fp32 buffer (cuBLAS with
   an fp32 output and beta = 1 where PyTorch offers it), rounded and scattered back at the end.

Why chunks of dz and not a fully fused kernel: a fused kernel that owns rows (or vocab entries)
has to read-modify-write an fp32 (rows x H) accumulator in memory once per tile, since H (1,536 and
up) does not fit in registers; at V = 152k and 6.5k counted rows that traffic is ~100 GB per
call. Here dz is written once and read once by each GEMM, and the fp32 d_hidden rows are read
and written once per chunk. ``workspace.vocab_chunk`` picks C so that the whole workspace stays
within ``LossConfig.workspace_bytes`` (64 MB on a GPU; the formula is
``workspace.backward_workspace_bytes``).

``grad_filter_eps`` (opt-in): the logit-gradient kernel also flags each [BLOCK_M, BLOCK_V] tile
live unless every entry of ``softmax(z) - onehot(target)`` in it is below eps in magnitude (all
probabilities below eps and no target, or a target whose probability is above 1 - eps); a
skipped tile's dz is stored as zeros and the two products run as block-sparse Triton GEMMs over
the live tiles only (``triton_sparse``). Each dropped entry of dz is below ``eps * g`` of its
row, which bounds the gradients' change (see ``linear_cross_entropy``).

fp32 inputs: the Triton kernels use exact fp32 products; the exact path's GEMMs are PyTorch's, so
they follow ``torch.backends.cuda.matmul`` (TF32 only if the user turned it on, as for any fp32
matmul).

Only the counted rows are ever loaded. The number of counted rows sizes the GEMMs, so the
backward reads it on the host once (one sync per backward call). Every step is a fixed sequence
of deterministic kernels: gradients are bitwise equal run to run.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .compact import compact_rows
from .config import LossConfig
from .triton_common import add_bias, dot_precision, logits_tile, softmax_minus_onehot
from .triton_sparse import LiveLists, sparse_d_hidden_, sparse_d_weight
from .workspace import vocab_chunk

_GROUP_M = 8  # row tiles per group in the logit-gradient kernel's launch order


@triton.jit
def _lce_dlogits_kernel(
    HC, Weight, Bias, Targets, Lse, DLoss, DZ, Live, eps,
    stride_wv, stride_wh,
    n_rows, v0, n_cols, H,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_V: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr, FILTER: tl.constexpr,
):
    """HC: (n_rows, H) contiguous, the counted rows; Weight: (V, H), any strides; Bias: (V,)
    contiguous or unused. Targets: (n_rows,) int32; Lse: (n_rows,) float32 in log2 units;
    DLoss: (n_rows,) float32. DZ: (n_rows, n_cols) contiguous, the gradient of the logits of
    vocab columns ``[v0, v0 + n_cols)``; each program writes one [BLOCK_M, BLOCK_V] tile.
    MASK_V: n_cols is not a multiple of BLOCK_V (only the chunk's last column tile is partial).
    FILTER: also write Live[pid_m, pid_v] (int32, num_m x num_v): 1 if some entry of
    ``softmax - onehot`` in the tile is >= eps in magnitude, else 0 and the tile's dz is zeros.
    Without FILTER, Live and eps are never read.

    1-D grid, grouped order: programs walk GROUP_M row tiles down one column tile, then the
    next column tile, so the programs resident at once share a few weight tiles and a few
    row tiles in L2 (row-tiles-fastest would stream all of HC once per column tile when it
    outgrows L2)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_v = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_v = (pid % per_group) // rows_in_group
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < n_rows
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < n_cols
    cols = v0 + local
    offs_h = tl.arange(0, BLOCK_H)
    slots64 = slots.to(tl.int64)
    h_ptrs = HC + slots64[:, None] * H + offs_h[None, :]
    w_ptrs = Weight + cols.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh
    z = logits_tile(h_ptrs, w_ptrs, slot_ok, col_ok, offs_h, H, 1, stride_wh,
                    BLOCK_M, BLOCK_V, BLOCK_H, MASK_V, EVEN_H, DOT_PRECISION)
    z = add_bias(z, Bias, cols, col_ok, HAS_BIAS, MASK_V)
    tgt = tl.load(Targets + slots, mask=slot_ok, other=-1)
    lse2 = tl.load(Lse + slots, mask=slot_ok, other=float("inf"))
    g = tl.load(DLoss + slots, mask=slot_ok, other=0.0)
    delta = softmax_minus_onehot(z, cols, col_ok, tgt, lse2, MASK_V)
    dz = delta * g[:, None]
    if FILTER:
        size = tl.abs(delta)
        if MASK_V:  # a target just past the chunk's last column must not keep the tile alive
            size = tl.where(col_ok[None, :], size, 0.0)
        live = tl.max(tl.max(size, axis=1), axis=0) >= eps
        dz = tl.where(live, dz, 0.0)
        tl.store(Live + pid_m * num_v + pid_v, live.to(tl.int32))
    dz_ptrs = DZ + slots64[:, None] * n_cols + local[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def _version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


# torch.mm / torch.addmm with out_dtype=torch.float32 for 16-bit CUDA inputs: PyTorch 2.8 and
# later; addmm with an fp32 accumulator as ``self`` only where the version allows it (tried once).
_FP32_OUT_MM = _version() >= (2, 8)
_FP32_OUT_ADDMM = _FP32_OUT_MM


def _warn_once(what: str, e: Exception) -> None:
    warnings.warn(f"linear_cross_entropy backward: {what} failed ({e}); falling back (see triton_bwd)", stacklevel=3)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 result, for 16-bit inputs.

    On CUDA, cuBLAS with an fp32 output (``out_dtype``). Where PyTorch lacks or refuses it, the
    product is rounded to the inputs' dtype first (with a warning, once; an out-of-memory error is
    raised as it is). Elsewhere (the interpreter tests) the operands are upcast, which is the same
    arithmetic as the fp32 output."""
    global _FP32_OUT_MM
    if not a.is_cuda:
        return torch.mm(a.float(), b.float())
    if _FP32_OUT_MM:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _FP32_OUT_MM = False
            _warn_once("torch.mm(out_dtype=float32)", e)
    return torch.mm(a, b).float()


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_rows: int) -> None:
    """``acc += a @ b`` for an fp32 ``acc``, with fp32 accumulation and no ``acc``-sized temporary.

    fp32 inputs: ``addmm_`` in place. 16-bit CUDA inputs: cuBLAS with beta = 1 and an fp32 output
    that is ``acc`` itself (``torch.addmm(..., out_dtype=float32, out=acc)``). Otherwise the fp32
    product is formed ``slice_rows`` rows at a time and added, so the temporary stays at most
    slice_rows x H (the budget's d_weight-product term)."""
    global _FP32_OUT_ADDMM
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_OUT_ADDMM:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _FP32_OUT_ADDMM = False
            _warn_once("torch.addmm(out_dtype=float32) into an fp32 accumulator", e)
    for r0 in range(0, a.shape[0], slice_rows):
        acc[r0 : r0 + slice_rows] += _mm_fp32(a[r0 : r0 + slice_rows], b)


def lce_bwd(d_loss, hidden, weight, bias, targets, lse, ignore_index: int, cfg: LossConfig,
            wanted=(True, True, True), grad_filter_eps: float | None = None):
    """Gradients of ``sum(d_loss * loss)`` where ``loss, lse = triton_fwd.lce_fwd(...)``.

    d_loss: (T,) float32, the upstream gradient of each row's loss (ignored rows: any value).
    wanted: which of (d_hidden, d_weight, d_bias) to compute; the others come back empty.
    grad_filter_eps: None for exact gradients, or the filter's threshold (see the module docstring).
    Returns ``d_hidden`` (T, H), ``d_weight`` (V, H) (both contiguous, in the inputs' dtype) and
    ``d_bias`` (V,) in bias's dtype (empty when there is no bias)."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    has_bias = bias is not None
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and has_bias
    filtered = grad_filter_eps is not None
    d_hidden = torch.empty(T, H, dtype=dtype, device=dev) if want_h else hidden.new_empty(0)
    rows, count, slot_targets = compact_rows(targets, ignore_index)
    n = int(count.item()) if T else 0  # the one host sync: it sizes the GEMMs below
    if n == 0 or not (want_h or want_w or want_b):
        d_hidden.zero_()  # rows that do not count get exactly 0
        d_weight = torch.zeros(V, H, dtype=dtype, device=dev) if want_w else weight.new_empty(0)
        return d_hidden, d_weight, torch.zeros(V if want_b else 0, dtype=dtype, device=dev)

    rows_c = rows[:n].long()
    if want_h:
        # the counted rows live in d_hidden's first n rows until the last chunk: both products
        # read them, and d_hidden is written only after the loop
        d_hidden[n:].zero_()
        h_c = torch.index_select(hidden, 0, rows_c, out=d_hidden[:n])
    else:
        h_c = hidden.index_select(0, rows_c)  # (n, H) contiguous; ignored rows are never read
    lse_c = lse.index_select(0, rows_c)
    g_c = d_loss.to(torch.float32).index_select(0, rows_c)
    tgt_c = slot_targets[:n]
    b = bias.contiguous() if has_bias else weight  # never read without HAS_BIAS

    k = cfg.dz
    chunk = vocab_chunk(cfg, n, T, V, H, dtype, filtered=filtered)
    dz_buffer = torch.empty(n * chunk, dtype=dtype, device=dev)
    # every row of d_weight and d_bias is written by its chunk
    d_weight = torch.empty(V, H, dtype=dtype, device=dev) if want_w else weight.new_empty(0)
    d_bias = torch.empty(V if want_b else 0, dtype=dtype, device=dev)
    dh_c = torch.zeros(n if want_h else 0, H, dtype=torch.float32, device=dev)
    num_m = triton.cdiv(n, k.block_m)
    lists = LiveLists(num_m, triton.cdiv(chunk, k.block_v), dev) if filtered else None
    live = lists.live if filtered else dz_buffer  # never read without FILTER
    eps = float(grad_filter_eps) if filtered else 0.0
    precision = dot_precision(dtype)
    for v0 in range(0, V, chunk):
        cols = min(chunk, V - v0)
        dz = dz_buffer[: n * cols].view(n, cols)
        _lce_dlogits_kernel[(num_m * triton.cdiv(cols, k.block_v),)](
            h_c, weight, b, tgt_c, lse_c, g_c, dz, live, eps,
            *weight.stride(),
            n, v0, cols, H,
            BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h,
            HAS_BIAS=has_bias, MASK_V=(cols % k.block_v != 0), EVEN_H=(H % k.block_h == 0),
            DOT_PRECISION=precision, GROUP_M=_GROUP_M, FILTER=filtered,
            num_warps=k.num_warps, num_stages=k.num_stages,
        )
        if filtered:
            lists.build(triton.cdiv(cols, k.block_v))
            if want_w:
                sparse_d_weight(dz, h_c, d_weight[v0 : v0 + cols], lists, cfg.products, precision)
            if want_h:
                sparse_d_hidden_(dh_c, dz, weight, v0, lists, cfg.products, precision)
        else:
            if want_w:
                # [cols, n] @ [n, H] -> [cols, H]: the reduction over every counted row in one GEMM,
                # in fp32 (a 16-bit output may let cuBLAS reduce split-K partials in 16 bits),
                # rounded once
                if dtype == torch.float32:
                    torch.mm(dz.t(), h_c, out=d_weight[v0 : v0 + cols])
                else:
                    d_weight[v0 : v0 + cols].copy_(_mm_fp32(dz.t(), h_c))
            if want_h:
                # [n, cols] @ [cols, H] -> [n, H], added in fp32
                _add_product_(dh_c, dz, weight[v0 : v0 + cols], slice_rows=chunk)
        if want_b:
            d_bias[v0 : v0 + cols] = dz.sum(0, dtype=torch.float32)  # rounded once
    del dz, dz_buffer, lists
    if want_h:
        # h_c is no longer read: round the fp32 rows into place, a dz-sized slice at a time
        d_hidden[:n].zero_()
        step = max(1, (n * chunk) // H)
        for r0 in range(0, n, step):
            d_hidden.index_copy_(0, rows_c[r0 : r0 + step], dh_c[r0 : r0 + step].to(dtype))
    return d_hidden, d_weight, d_bias
