"""Command line: ``cocoa demo``, ``cocoa train``, ``cocoa embed``, ``cocoa bench``, ``cocoa kernels-demo``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cocoa_kernels import KeyRanges, attention


def _bridge_batch(rows: int, samples: int, a_len: int, b_len: int):
    """Packed rows of ``samples`` x [block A (a_len, ending in EOS) + block B (b_len)]."""
    seg = torch.arange(samples).repeat_interleave(a_len + b_len)
    is_target = torch.tensor(([False] * a_len + [True] * b_len) * samples)
    return seg.expand(rows, -1).contiguous(), is_target.expand(rows, -1).contiguous()


def kernels_demo(args) -> int:
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
    print(f"cocoa kernels-demo: EOS-bridge attention on {device} ({dtype}), impl={args.impl or 'auto'}")
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


def demo(args) -> int:
    from .demo import format_table, run_demo

    report = run_demo(args.out, steps=tuple(args.steps), batch_size=args.batch_size, train_size=args.train_size,
                      eval_size=args.eval_size, seed=args.seed)
    print()
    print(f"cocoa demo on {report['device']} ({report['attn_implementation']}), {report['wall_s']} s; "
          f"steps per stage {report['config']['steps']} vs contrastive only {sum(report['config']['steps'])}")
    print(format_table(report))
    print(f"report: {Path(args.out) / 'report.json'}" + (f", plot: {report['plot']}" if report.get("plot") else ""))
    return 0


def train(args) -> int:
    from .train import StageConfig

    if args.config:
        spec = json.loads(Path(args.config).read_text())
        stages = [StageConfig(**s) for s in spec.pop("stages")]
        model_src, data_src, out = spec.get("model", "tiny"), spec.get("data", "builtin"), spec.get("out", args.out)
    else:
        if args.stage is None:
            raise SystemExit("cocoa train: give --stage (1, 2 or 3) or --config FILE")
        lora = {"r": args.lora_r, "alpha": 2 * args.lora_r} if args.lora_r else None
        stages = [StageConfig(stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora=lora)]
        model_src, data_src, out = args.model, args.data, args.out
    if out is None:
        raise SystemExit("cocoa train: give --out DIR (or 'out' in the config)")
    from .train import train_from_sources

    results = train_from_sources(stages, model_src, data_src, out, init=args.init)
    for stage, result in results.items():
        print(f"stage {stage}: {result['steps']} steps, loss {result['loss'][0]:.4f} -> {result['loss'][-1]:.4f}")
    return 0


def embed(args) -> int:
    from .data import load_jsonl
    from .embed import Embedder

    embedder = Embedder.from_pretrained(args.model)
    samples = load_jsonl(args.data)
    items = [{k: v for k, v in (("image", s.image), ("text", s.text)) if v is not None} for s in samples]
    vectors = embedder.encode(items, instruction=args.instruction, batch_size=args.batch_size, show_progress=True)
    torch.save(vectors, args.out)
    print(f"{vectors.shape[0]} embeddings of dim {vectors.shape[1]} -> {args.out}")
    return 0


def bench(args) -> int:
    """``python -m bench`` from a checkout (the harness lives in the repository's bench/, not in
    the installed package)."""
    import sys

    root = Path(args.repo).resolve()
    if not (root / "bench" / "__main__.py").is_file():
        raise SystemExit(f"cocoa bench: no bench/ harness under {root}; run it from the repository (or pass --repo)")
    sys.path.insert(0, str(root))
    from bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cocoa", description="CoCoA kernels and training layer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a tiny model with CoCoA and contrastive-only, compare recall")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, nargs=3, default=[100, 100, 300], metavar=("S1", "S2", "S3"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)

    p = sub.add_parser("train", help="run one CoCoA stage, or a chain of stages from --config")
    p.add_argument("--stage", type=int, choices=[1, 2, 3])
    p.add_argument("--model", default="tiny", help="'tiny' (built-in, random weights) or a local model folder")
    p.add_argument("--data", default="builtin", help="a JSONL file, or 'builtin' (synthetic shapes)")
    p.add_argument("--out", default=None)
    p.add_argument("--init", default=None, help="a previous stage's output folder (DIR/final) to start from")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (needs peft)")
    p.add_argument("--config", default=None, help='JSON: {"model", "data", "out", "stages": [{"stage": 1, ...}]}')
    p.set_defaults(fn=train)

    p = sub.add_parser("embed", help="embed the samples of a JSONL file with a trained model folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="a .pt file for the (N, dim) tensor")
    p.add_argument("--instruction", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(fn=embed)

    p = sub.add_parser("kernels-demo", help="run the EOS-bridge attention on an example packed batch")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="samples packed per row")
    p.add_argument("--a-len", type=int, default=96, help="block A tokens per sample, EOS included")
    p.add_argument("--b-len", type=int, default=32, help="block B (target) tokens per sample")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--impl", choices=["triton", "torch"], default=None)
    p.set_defaults(fn=kernels_demo)

    p = sub.add_parser("bench", help="the benchmark harness (python -m bench); options after -- go to it")
    p.add_argument("--repo", default=".", help="the repository checkout holding bench/ (default: here)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench)

    args = parser.parse_args(argv)
    if args.command == "bench" and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    return args.fn(args)
