"""Masks, inputs and the float64 truth shared by the attention tests."""

from __future__ import annotations

import torch

from cocoa_kernels import KeyRanges

FAMILIES = ("causal_packed", "bidir_packed", "eos_bridge", "sliding_window", "padding_rows", "random_intervals",
            "long_segments")


def packed_segments(N: int, gen: torch.Generator, pad: int = 0, max_len: int = 40) -> torch.Tensor:
    """One row of segment ids: random lengths (a length-1 segment included), then ``pad`` -1s."""
    ids, seg, pos = [], 0, 0
    lengths = [1]  # a one-token sample is always present
    while sum(lengths) < N - pad:
        lengths.append(int(torch.randint(1, max_len, (1,), generator=gen)))
    for length in lengths:
        take = min(length, N - pad - pos)
        if take <= 0:
            break
        ids += [seg] * take
        pos += take
        seg += 1
    return torch.tensor(ids + [-1] * (N - len(ids)), dtype=torch.int64)


def bridge_targets(segment_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Block B = a random suffix of each segment; segment 0 gets a one-token block A, segment 1
    an empty block B, so both edge cases are always present when the row has them."""
    is_target = torch.zeros_like(segment_ids, dtype=torch.bool)
    for s in segment_ids.unique().tolist():
        if s < 0:
            continue
        idx = (segment_ids == s).nonzero().flatten()
        L = idx.numel()
        if s == 0:
            a = 1
        elif s == 1:
            a = L
        else:
            a = int(torch.randint(1, L + 1, (1,), generator=gen))
        is_target[idx[a:]] = True
    return is_target


def make_mask(family: str, B: int, N: int, seed: int = 0) -> KeyRanges:
    gen = torch.Generator().manual_seed(seed)
    pad = [0] + [max(1, N // 7)] * (B - 1) if N > 1 else [0] * B
    seg = torch.stack([packed_segments(N, gen, pad=pad[b]) for b in range(B)])
    if family == "causal_packed":
        return KeyRanges.from_segments(seg, causal=True)
    if family == "bidir_packed":
        return KeyRanges.from_segments(seg)
    if family == "eos_bridge":
        is_target = torch.stack([bridge_targets(seg[b], gen) for b in range(B)])
        return KeyRanges.eos_bridge(seg, is_target)
    if family == "sliding_window":
        i = torch.arange(N).expand(B, N)
        w = 9
        return KeyRanges((i - w).clamp(min=0), (i + w + 1).clamp(max=N), causal=True)
    if family == "padding_rows":
        # Row 0 is all padding (every query sees nothing); row 1 is left-padded.
        seg[0] = -1
        seg[1, : N // 3] = -1
        return KeyRanges.from_segments(seg)
    if family == "long_segments":
        # The packed families' segments (< 40 tokens) leave the kernels' unmasked full-tile loops
        # and their trailing masked loops idle at the shipped tiles: row 0 is one bidirectional
        # segment over the whole row, the others two long segments (a third of N and the rest,
        # then padding), so both loops run in every kernel at the test and the shipped tiles
        # (tests/test_attention_loop_coverage.py).
        seg = torch.full((B, N), -1, dtype=torch.int64)
        seg[0] = 0
        for b in range(1, B):
            cut, end = N // 3, N - pad[b]
            seg[b, :cut], seg[b, cut:end] = 0, 1
        return KeyRanges.from_segments(seg)
    if family == "random_intervals":
        # No structure at all (not monotone, empty rows included): tile bounds must still cover.
        a = torch.randint(0, N + 1, (B, N), generator=gen)
        b = torch.randint(0, N + 1, (B, N), generator=gen)
        return KeyRanges(torch.minimum(a, b), torch.maximum(a, b))
    raise ValueError(family)


def make_qkv(B, Hq, Hkv, N, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    do = torch.randn(B, Hq, N, D, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def dense_attention(q, k, v, mask: KeyRanges, scale=None):
    """Softmax attention with the (B, N, N) dense mask, in the inputs' dtype, autograd-friendly.
    Rows that see nothing give zeros. With float64 inputs this is the truth."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    dense = mask.to_dense()[:, None].to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~dense, float("-inf"))
    p = torch.softmax(s.float() if s.dtype != torch.float64 else s, dim=-1).to(q.dtype)
    p = torch.where(dense, p, torch.zeros_like(p))  # all-masked rows: NaN -> 0
    return p @ v


def run_with_grads(fn, q, k, v, do):
    """fn(q, k, v) -> out; returns (out, dq, dk, dv) as detached tensors."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def truth_and_baseline(q, k, v, do, mask, scale=None):
    """The float64 truth, and PyTorch's own dense result in the inputs' dtype (on CPU)."""
    cpu = [t.detach().cpu() for t in (q, k, v, do)]
    mask_cpu = mask.to("cpu")
    truth = run_with_grads(lambda a, b, c: dense_attention(a, b, c, mask_cpu, scale), *[t.double() for t in cpu])
    base = run_with_grads(lambda a, b, c: dense_attention(a, b, c, mask_cpu, scale), *cpu)
    return truth, base


def assert_close(name, actual, truth, baseline, mult=2.0, eps=None):
    """Kernel error against the truth at most ``mult`` times PyTorch's same-dtype error, plus eps."""
    if eps is None:
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float64: 1e-10}[actual.dtype]
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    diff = (actual.detach().cpu().double() - truth).abs()
    err = diff.max().item()
    base = (baseline.detach().cpu().double() - truth).abs().max().item()
    where = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
    assert err <= mult * base + eps, (
        f"{name}: error {err:.3e} (at {where}) > {mult} x PyTorch's {base:.3e} + {eps:.0e}"
    )
