"""Command line: ``cocoa demo``."""

from __future__ import annotations

import argparse
import time

import torch

from cocoa_kernels import KeyRanges, attention


def _bridge_batch(rows: int, samples: int, a_len: int, b_len: int):
    """Packed rows of ``samples`` x [block A (a_len, ending in EOS) + block B (b_len)]."""
    seg = torch.arange(samples).repeat_interleave(a_len + b_len)
    is_target = torch.tensor(([False] * a_len + [True] * b_len) * samples)
    return seg.expand(rows, -1).contiguous(), is_target.expand(rows, -1).contiguous()


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seg, is_target = _bridge_batch(args.rows, args.samples, args.a_len, args.b_len)
    mask = KeyRanges.eos_bridge(seg, is_target).to(device)
    B, N = seg.shape
    Hq, Hkv, D = 12, 2, 128  # Qwen2-VL-2B's language model heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=gen).to(device, dtype).requires_grad_() for h in (Hq, Hkv, Hkv))

    d_out = torch.randn(B, Hq, N, D, generator=gen).to(device, dtype)

    def step():
        start = time.perf_counter()
        out = attention(q, k, v, mask, impl=args.impl)
        out.backward(d_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    step()  # warm-up: first-call dispatch and, on a GPU, kernel compilation
    q.grad = k.grad = v.grad = None
    out, elapsed = step()

    dense = mask.to_dense()
    visible = int(dense.sum())
    a_q = (~is_target[0]).nonzero()[0].item()
    b_q = is_target[0].nonzero()[0].item()
    eos = args.a_len - 1
    print(f"cocoa demo: EOS-bridge attention on {device} ({dtype}), impl={args.impl or 'auto'}")
    print(f"  batch: {B} rows x {N} tokens = {args.samples} samples/row of [A {args.a_len} (ends in <EOS>) + B {args.b_len}]")
    print(f"  heads: q {Hq}, kv {Hkv} (grouped), head dim {D}")
    print(f"  mask: {visible:,} visible (query, key) pairs = {visible / (B * N * N):.1%} of dense, "
          f"held as 2 int32 tensors of {B}x{N}")
    print(f"  a block-A query (pos {a_q}) sees keys [{mask.lo[0, a_q].item()}, {mask.hi[0, a_q].item()})")
    print(f"  a block-B query (pos {b_q}) sees keys [{mask.lo[0, b_q].item()}, {mask.hi[0, b_q].item()}): "
          f"the EOS at {eos} and block B only")
    print(f"  forward + backward: {elapsed * 1e3:.1f} ms; out {tuple(out.shape)}, "
          f"gradient norms dq {q.grad.float().norm():.1f}, dk {k.grad.float().norm():.1f}, dv {v.grad.float().norm():.1f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cocoa", description="CoCoA kernels and training layer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the EOS-bridge attention on an example packed batch")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="samples packed per row")
    p.add_argument("--a-len", type=int, default=96, help="block A tokens per sample, EOS included")
    p.add_argument("--b-len", type=int, default=32, help="block B (target) tokens per sample")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--impl", choices=["triton", "torch"], default=None)
    args = parser.parse_args(argv)
    return demo(args)
