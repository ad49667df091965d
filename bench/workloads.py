"""The benchmark workloads: shapes, masks and random inputs (shared by ``python -m bench`` and
the pytest-benchmark file ``bench/test_kernels_gpu.py``).

Attention (bf16, head dim 128, 12 query / 2 key-value heads, one row of N tokens):

- ``bridge_16k``: the EOS bridge of CoCoA stage 2 over 8 packed samples of [A 1,536 | B 512];
- ``bidir_packed_16k``: bidirectional attention inside the same 8 segments of 2,048;
- ``bidir_single_16k``: one bidirectional sequence of 16,384;
- ``causal_16k``: one causal sequence of 16,384;
- ``bridge_sweep_<N>``: the bridge for N = 1k ... 32k (segments of 2,048, or one of N when
  N < 2,048, always 3/4 block A and 1/4 block B).

Loss: 16,384 tokens, 40% of them counted (labels elsewhere -100), H = 1,536, V = 151,936 (the
Qwen2-VL-2B vocabulary). Smoke mode shrinks every size; the code paths stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cocoa_kernels import KeyRanges

IGNORE_INDEX = -100
SWEEP_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
SMOKE_SWEEP_SIZES = (16, 48)


def tokens_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttnShape:
    heads_q: int = 12
    heads_kv: int = 2
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    batch: int = 1


FULL_ATTN = AttnShape()
SMOKE_ATTN = AttnShape(heads_q=2, heads_kv=1, head_dim=32)


@dataclass(frozen=True)
class AttnWorkload:
    """One row of packed segments. ``segments`` holds (block A, block B) lengths; for the
    bidirectional and causal kinds a segment is simply A + B tokens long."""

    name: str
    kind: str  # "bridge" | "bidir" | "causal"
    segments: tuple[tuple[int, int], ...]
    group: str = "main"

    @property
    def n(self) -> int:
        return sum(a + b for a, b in self.segments)

    def segment_ids(self, device) -> torch.Tensor:
        lengths = torch.tensor([a + b for a, b in self.segments], device=device)
        return torch.repeat_interleave(torch.arange(len(self.segments), device=device), lengths).view(1, -1)

    def is_target(self, device) -> torch.Tensor:
        parts = [torch.cat([torch.zeros(a, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]) for a, b in self.segments]
        return torch.cat(parts).view(1, -1).to(device)

    def positions(self, device) -> torch.Tensor:
        """Position ids restarting at 0 in every packed sample, (1, N)."""
        return torch.cat([torch.arange(a + b) for a, b in self.segments]).view(1, -1).to(device)

    def mask(self, device) -> KeyRanges:
        seg = self.segment_ids(device)
        if self.kind == "bridge":
            return KeyRanges.eos_bridge(seg, self.is_target(device))
        if self.kind in ("bidir", "causal"):
            return KeyRanges.from_segments(seg, causal=self.kind == "causal")
        raise ValueError(f"unknown attention workload kind {self.kind!r}")

    def cu_seqlens(self, device) -> torch.Tensor:
        """flash-attn style cumulative segment lengths, int32 (S + 1,)."""
        lengths = torch.tensor([0] + [a + b for a, b in self.segments], dtype=torch.int32)
        return lengths.cumsum(0).to(torch.int32).to(device)

    @property
    def max_seqlen(self) -> int:
        return max(a + b for a, b in self.segments)


def bridge_segments(n: int, segment: int = 2048) -> tuple[tuple[int, int], ...]:
    """Segments of ``segment`` tokens (one of n if n is smaller), 3/4 block A and 1/4 block B."""
    seg = min(segment, n)
    if n % seg:
        raise ValueError(f"bridge workload: N = {n} is not a multiple of the segment length {seg}")
    b = seg // 4
    return ((seg - b, b),) * (n // seg)


def attention_workloads(smoke: bool = False) -> list[AttnWorkload]:
    n, seg = (32, 16) if smoke else (16384, 2048)
    label = tokens_label(n)
    packed = bridge_segments(n, seg)
    return [
        AttnWorkload(f"bridge_{label}", "bridge", packed),
        AttnWorkload(f"bidir_packed_{label}", "bidir", packed),
        AttnWorkload(f"bidir_single_{label}", "bidir", ((n, 0),)),
        AttnWorkload(f"causal_{label}", "causal", ((n, 0),)),
    ]


def sweep_workloads(smoke: bool = False, sizes=None) -> list[AttnWorkload]:
    seg = 16 if smoke else 2048
    sizes = sizes or (SMOKE_SWEEP_SIZES if smoke else SWEEP_SIZES)
    return [AttnWorkload(f"bridge_sweep_{tokens_label(n)}", "bridge", bridge_segments(n, seg), "sweep") for n in sizes]


@dataclass
class AttnInputs:
    """Token-major leaves, as a transformers layer holds them: q (B, N, Hq, D), k and v
    (B, N, Hkv, D), all requiring grad, and the upstream gradient ``dout`` (B, N, Hq, D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v


def attention_copy_bytes(n: int, shape: AttnShape) -> int:
    elem = torch.finfo(shape.dtype).bits // 8
    return shape.batch * n * shape.head_dim * (2 * shape.heads_q + 2 * shape.heads_kv) * elem


def make_attention_inputs(n: int, shape: AttnShape, device, copies: int, seed: int = 0) -> list[AttnInputs]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    B, D = shape.batch, shape.head_dim

    def leaf(heads):
        t = torch.randn(B, n, heads, D, generator=gen).to(device=device, dtype=shape.dtype)
        return t.requires_grad_(True)

    for _ in range(copies):
        q, k, v = leaf(shape.heads_q), leaf(shape.heads_kv), leaf(shape.heads_kv)
        dout = torch.randn(B, n, shape.heads_q, D, generator=gen).to(device=device, dtype=shape.dtype)
        out.append(AttnInputs(q, k, v, dout))
    return out


def visible_pairs(mask: KeyRanges) -> int:
    """Visible (query, key) pairs of one head, summed over the batch."""
    return int((mask.effective_hi().long() - mask.lo.long()).clamp(min=0).sum())


def attention_flops(pairs: int, shape: AttnShape) -> tuple[float, float]:
    """Forward and backward FLOPs counting visible pairs only: 4 * D per pair and head
    forward (two matrix products), 2.5 times that backward."""
    fwd = 4.0 * shape.head_dim * pairs * shape.heads_q
    return fwd, 2.5 * fwd


def copies_for(bytes_per_copy: int, l2_bytes: int, lo: int = 2, hi: int = 32) -> int:
    """How many input copies to rotate so that together they are at least 3x the L2 cache."""
    if l2_bytes <= 0:
        return lo
    need = -(-3 * l2_bytes // max(bytes_per_copy, 1))
    return max(lo, min(hi, need))


# ---------------------------------------------------------------------------- attention on the CPU
@dataclass(frozen=True)
class CpuAttnWorkload:
    """A batch of rows for the PyTorch (CPU) path: ``rows[b]`` holds row b's packed (block A,
    block B) samples; rows shorter than ``n`` end in padding. The bidirectional kind attends
    inside each sample (A + B as one segment). ``shape`` is the model's (heads, head dim,
    batch = len(rows)); ``threads`` the ``torch.set_num_threads`` it is measured with."""

    name: str
    kind: str  # "bridge" | "bidir"
    rows: tuple[tuple[tuple[int, int], ...], ...]
    n: int
    shape: AttnShape
    threads: int
    group: str = "cpu"
    ours_impl: str = "torch"  # the Cocoa adapter runs the PyTorch path, never the interpreter

    @property
    def n_tokens(self) -> int:
        return len(self.rows) * self.n

    def mask(self, device) -> KeyRanges:
        B = len(self.rows)
        seg = torch.full((B, self.n), -1, dtype=torch.int64)
        is_target = torch.zeros(B, self.n, dtype=torch.bool)
        for b, samples in enumerate(self.rows):
            pos = 0
            for s, (a, tail) in enumerate(samples):
                seg[b, pos : pos + a + tail] = s
                is_target[b, pos + a : pos + a + tail] = True
                pos += a + tail
            if pos > self.n:
                raise ValueError(f"{self.name}: row {b} holds {pos} tokens, more than N = {self.n}")
        seg, is_target = seg.to(device), is_target.to(device)
        if self.kind == "bridge":
            return KeyRanges.eos_bridge(seg, is_target)
        if self.kind == "bidir":
            return KeyRanges.from_segments(seg)
        raise ValueError(f"unknown CPU attention workload kind {self.kind!r}")


# The demo's shapes: a Qwen2-VL-2B attention layer (12/2 heads, d128) over 2 rows of 512 tokens
# (one row packing two samples, one row a single long one), and the tiny demo model (4/2 heads,
# d8): 32 rows of one sample each, padded to the longest (60), lengths 41-60, a quarter block B.
CPU_LAYER = AttnShape(heads_q=12, heads_kv=2, head_dim=128, dtype=torch.float32, batch=2)
CPU_TINY = AttnShape(heads_q=4, heads_kv=2, head_dim=8, dtype=torch.float32, batch=32)
CPU_THREADS = (1, 2)


def _one_sample_rows(batch: int, n: int, spread: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    rows = []
    for b in range(batch):
        length = n - (7 * b) % spread  # deterministic spread of lengths, the longest first
        rows.append(((length - length // 4, length // 4),))
    return tuple(rows)


def cpu_attention_workloads(smoke: bool = False, threads=CPU_THREADS) -> list[CpuAttnWorkload]:
    if smoke:
        layer, tiny = AttnShape(4, 2, 16, torch.float32, 2), AttnShape(2, 1, 8, torch.float32, 4)
        cases = ((layer, (((12, 4), (12, 4)), ((24, 8),)), 32), (tiny, _one_sample_rows(4, 12, 5), 12))
    else:
        layer_rows = (((192, 64), (192, 64)), ((384, 128),))
        cases = ((CPU_LAYER, layer_rows, 512), (CPU_TINY, _one_sample_rows(32, 60, 20), 60))
    out = []
    for t in threads:
        for kind in ("bridge", "bidir"):
            for shape, rows, n in cases:
                out.append(CpuAttnWorkload(f"cpu_{kind}_{len(rows)}x{n}_t{t}", kind, rows, n, shape, t))
    return out


# ---------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossWorkload:
    name: str
    tokens: int
    hidden: int
    vocab: int
    counted_frac: float = 0.4
    dtype: torch.dtype = torch.bfloat16

    @property
    def counted(self) -> int:
        return round(self.counted_frac * self.tokens)


FULL_LOSS = LossWorkload("lce_16k_40pct", tokens=16384, hidden=1536, vocab=151936)
SMOKE_LOSS = LossWorkload("lce_128_40pct", tokens=128, hidden=64, vocab=512)


@dataclass
class LossInputs:
    """hidden (T, H) requiring grad and labels (T,) with ``IGNORE_INDEX`` on uncounted rows."""

    hidden: torch.Tensor
    labels: torch.Tensor


def make_loss_inputs(w: LossWorkload, device, copies: int, seed: int = 0):
    """One LM-head weight (V, H) requiring grad, shared by every copy (it is far larger than
    any L2 cache), and ``copies`` (hidden, labels) pairs, each with exactly ``w.counted`` rows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = (0.02 * torch.randn(w.vocab, w.hidden, generator=gen)).to(device=device, dtype=w.dtype).requires_grad_(True)
    out = []
    for _ in range(copies):
        hidden = torch.randn(w.tokens, w.hidden, generator=gen).to(device=device, dtype=w.dtype).requires_grad_(True)
        labels = torch.full((w.tokens,), IGNORE_INDEX, dtype=torch.long)
        rows = torch.randperm(w.tokens, generator=gen)[: w.counted]
        labels[rows] = torch.randint(0, w.vocab, (w.counted,), generator=gen)
        out.append(LossInputs(hidden, labels.to(device)))
    return weight, out


def loss_flops(w: LossWorkload) -> tuple[float, float]:
    """Useful FLOPs: the counted rows' logits forward (2 T_c V H); d hidden and d weight
    backward (4 T_c V H). Work an implementation spends on ignored rows is not counted."""
    fwd = 2.0 * w.counted * w.vocab * w.hidden
    return fwd, 2.0 * fwd


def loss_copy_bytes(w: LossWorkload) -> int:
    return w.tokens * w.hidden * (torch.finfo(w.dtype).bits // 8)
