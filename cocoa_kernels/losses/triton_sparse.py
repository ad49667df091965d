"""The filtered backward's block-sparse products (``grad_filter_eps``): only the tiles of one
vocab chunk's logit gradient ``dz`` (n rows x C columns, tiles of BLOCK_M x BLOCK_V) that the
logit-gradient kernel flagged live are read or multiplied; a skipped tile costs nothing beyond
its flag. Both products reduce their live tiles in increasing tile order, one program per output
tile, so results are bitwise deterministic.

1. ``_live_lists_kernel``: from the flags ``Live`` (num_m x num_v, int32), for each row tile the
   live column tiles in order, and for each column tile the live row tiles in order (a prefix sum
   of the flags; each program writes its own list, so no atomics);
2. ``_dw_sparse_kernel``: ``d_weight[chunk] = dz.T @ h_c`` over the live row tiles of each
   column tile, fp32 accumulation, rounded once into d_weight (no fp32 temporary);
3. ``_dh_sparse_kernel``: ``dh_c += dz @ weight[chunk]`` over the live column tiles of each row
   tile, read-modify-write of the fp32 d_hidden rows (skipped when a row tile has none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig


@triton.jit
def _live_lists_kernel(Live, OrderH, CountH, OrderW, CountW, num_m, num_v, BLOCK: tl.constexpr):
    """Program p < num_m: row tile p's live column tiles into OrderH[p, :CountH[p]]; program
    num_m + j: column tile j's live row tiles into OrderW[j, :CountW[j]]."""
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    if pid < num_m:
        ok = idx < num_v
        flags = tl.load(Live + pid * num_v + idx, mask=ok, other=0)
        pos = tl.cumsum(flags, axis=0) - flags  # exclusive prefix sum: the slot in the list
        tl.store(OrderH + pid * num_v + pos, idx, mask=ok & (flags != 0))
        tl.store(CountH + pid, tl.sum(flags, axis=0))
    else:
        j = pid - num_m
        ok = idx < num_m
        flags = tl.load(Live + idx * num_v + j, mask=ok, other=0)
        pos = tl.cumsum(flags, axis=0) - flags
        tl.store(OrderW + j * num_m + pos, idx, mask=ok & (flags != 0))
        tl.store(CountW + j, tl.sum(flags, axis=0))


@triton.jit
def _dw_sparse_kernel(
    DZ, HC, DW, OrderW, CountW,
    stride_dwv, n_rows, n_cols, H, num_m,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """DZ: (n_rows, n_cols) contiguous; HC: (n_rows, H) contiguous; DW: the chunk's (n_cols, H)
    rows of d_weight, row stride ``stride_dwv``. Program (j, k) writes DW's [BLOCK_V, BLOCK_H]
    tile (j, k); a column tile with no live row tile gets zeros."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < n_cols
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    count = tl.load(CountW + pid_v)
    for t in range(0, count):
        i = tl.load(OrderW + pid_v * num_m + t)
        slots = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        slot_ok = slots < n_rows
        dz = tl.load(DZ + slots[:, None] * n_cols + local[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                     other=0.0)
        h = tl.load(HC + slots[:, None] * H + offs_h[None, :], mask=slot_ok[:, None] & h_ok[None, :], other=0.0)
        # [BLOCK_V, BLOCK_M] @ [BLOCK_M, BLOCK_H]: the reduction over this tile's counted rows
        acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
    out = DW + local.to(tl.int64)[:, None] * stride_dwv + offs_h[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=col_ok[:, None] & h_ok[None, :])


@triton.jit
def _dh_sparse_kernel(
    DZ, Weight, DH, OrderH, CountH,
    stride_wv, stride_wh, n_rows, n_cols, H, v0, num_v,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """DZ: (n_rows, n_cols) contiguous, vocab columns [v0, v0 + n_cols); Weight: (V, H), any
    strides; DH: (n_rows, H) fp32 contiguous, accumulated in place. Program (i, k) owns DH's
    [BLOCK_M, BLOCK_H] tile (i, k)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(CountH + pid_m)
    if count > 0:
        slots = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        slot_ok = slots < n_rows
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        dh_ptrs = DH + slots[:, None] * H + offs_h[None, :]
        dh_mask = slot_ok[:, None] & h_ok[None, :]
        acc = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
        for t in range(0, count):
            j = tl.load(OrderH + pid_m * num_v + t)
            local = j * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = local < n_cols
            dz = tl.load(DZ + slots[:, None] * n_cols + local[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                         other=0.0)
            w_ptrs = Weight + (v0 + local).to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh
            w = tl.load(w_ptrs, mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            # [BLOCK_M, BLOCK_V] @ [BLOCK_V, BLOCK_H]: this tile's share of the rows' d_hidden
            acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        tl.store(dh_ptrs, acc, mask=dh_mask)


class LiveLists:
    """The flags and per-tile lists of one chunk, allocated once for the widest chunk."""

    def __init__(self, num_m: int, max_v: int, device):
        self.num_m = num_m
        n = num_m * max_v
        self.live = torch.empty(n, dtype=torch.int32, device=device)
        self.order_h = torch.empty(n, dtype=torch.int32, device=device)
        self.order_w = torch.empty(n, dtype=torch.int32, device=device)
        self.count_h = torch.empty(num_m, dtype=torch.int32, device=device)
        self.count_w = torch.empty(max_v, dtype=torch.int32, device=device)

    def build(self, num_v: int) -> None:
        """Fill the lists from ``live[: num_m * num_v]``, written by the logit-gradient kernel."""
        block = triton.next_power_of_2(max(self.num_m, num_v))
        _live_lists_kernel[(self.num_m + num_v,)](
            self.live, self.order_h, self.count_h, self.order_w, self.count_w, self.num_m, num_v, BLOCK=block,
        )


def sparse_d_weight(dz, h_c, d_weight_rows, lists: LiveLists, k: KernelConfig, precision: str) -> None:
    """d_weight_rows (C, H) = dz.T @ h_c over the live tiles; every row written."""
    n, cols = dz.shape
    H = h_c.shape[1]
    num_v = triton.cdiv(cols, k.block_v)
    _dw_sparse_kernel[(num_v, triton.cdiv(H, k.block_h))](
        dz, h_c, d_weight_rows, lists.order_w, lists.count_w,
        d_weight_rows.stride(0), n, cols, H, lists.num_m,
        BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h, DOT_PRECISION=precision,
        num_warps=k.num_warps, num_stages=k.num_stages,
    )


def sparse_d_hidden_(dh_c, dz, weight, v0: int, lists: LiveLists, k: KernelConfig, precision: str) -> None:
    """dh_c (n, H) fp32 += dz @ weight[v0 : v0 + C] over the live tiles."""
    n, cols = dz.shape
    H = dh_c.shape[1]
    _dh_sparse_kernel[(lists.num_m, triton.cdiv(H, k.block_h))](
        dz, weight, dh_c, lists.order_h, lists.count_h,
        *weight.stride(), n, cols, H, v0, triton.cdiv(cols, k.block_v),
        BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h, DOT_PRECISION=precision,
        num_warps=k.num_warps, num_stages=k.num_stages,
    )
