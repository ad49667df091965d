"""Command line: ``cocoa demo``, ``cocoa experiment``, ``cocoa train``, ``cocoa embed``, ``cocoa eval``,
``cocoa data export-eval``, ``cocoa bench``, ``cocoa kernels-demo``."""

from __future__ import annotations

import argparse
import contextlib
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


def _demo_config(args):
    """A DemoConfig from the demo/experiment flags; ``--set KEY=VALUE`` reaches every field."""
    import dataclasses

    from .demo import DemoConfig

    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    values = {}
    if args.seeds is not None:
        values["seeds"] = args.seeds
    elif getattr(args, "seed", None) is not None:
        values["seeds"] = [args.seed]
    if args.steps is not None:
        values.update(stage0_steps=args.steps[0], stage1_steps=args.steps[1], stage2_steps=args.steps[2],
                      stage3_steps=args.steps[3])
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "seeds":
            raise SystemExit(f"cocoa {args.command}: --set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k for k in fields if k != 'seeds')}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise SystemExit(f"cocoa {args.command}: --set {item!r}: the value must be a number, true/false "
                             "or a quoted string") from None
    try:
        return DemoConfig(**values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cocoa {args.command}: {e}") from None


@contextlib.contextmanager
def _threads(args):
    """torch's CPU threads as ``--threads`` says while the command runs (restored afterwards)."""
    before = torch.get_num_threads()
    if args.threads is not None and not torch.cuda.is_available():
        if args.threads < 1:
            raise SystemExit(f"cocoa {args.command}: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def demo(args) -> int:
    from .demo import format_table, run_demo

    cfg = _demo_config(args)
    with _threads(args):
        report = run_demo(args.out, cfg, progress=lambda msg: print(f"cocoa demo: {msg}", flush=True))
    print()
    print(f"cocoa demo on {report['device']} ({report['attn_implementation']}, {report['torch_threads']} threads), "
          f"{report['wall_s']} s; seeds {cfg.seeds}; stage 0 {cfg.stage0_steps} steps, stages 1/2 "
          f"{cfg.stage1_steps}/{cfg.stage2_steps} (control: {cfg.stage1_steps + cfg.stage2_steps} more captioning), "
          f"stage 3 {cfg.stage3_steps} steps on {cfg.labelled} labelled pairs")
    for seed, s0 in report["stage0"].items():
        gate = s0["gate"]
        print(f"stage-0 gate, seed {seed}: held-out caption loss {gate['own']:.2f} own image vs "
              f"{gate['swapped']:.2f} swapped ({'passed' if gate['passed'] else 'FAILED'})")
    if report["arms"]:
        print(format_table(report))
    print(f"verdict: {report['verdict']}")
    print(f"report: {Path(args.out) / 'report.json'}" + (f", plot: {report['plot']}" if report.get("plot") else ""))
    return 0


def experiment(args) -> int:
    from .experiment import format_experiment, run_experiment

    cfg = _demo_config(args)
    with _threads(args):
        report = run_experiment(args.out, cfg, pools=args.pools, lrs=args.lrs, workers=args.workers)
    print()
    print(f"cocoa experiment on {report['device']}, {report['wall_s']} s; seeds {cfg.seeds}, labelled pools "
          f"{report['config']['pools']}")
    print(format_experiment(report))
    print(f"verdict: {report['verdict']}")
    print(f"report: {Path(args.out) / 'report.json'}; plots: {', '.join(report['plots'])}")
    return 0


# ``cocoa train`` flags that map one to one onto StageConfig fields (unset flags keep its defaults)
STAGE_FLAGS = ("precision", "gradient_checkpointing", "grad_accum", "max_grad_norm", "max_pixels", "min_pixels",
               "max_length", "mask_token", "pack_budget", "save_steps", "on_bad_sample", "seed")
# a --config file's top-level keys
RUN_KEYS = ("model", "data", "image_dir", "out", "init", "report_to", "stages")


def _stage_configs(entries: list, where: str) -> tuple[list, dict]:
    """StageConfigs from a config file's ``stages``, and the stages' own ``data`` (stage number ->
    data spec, replacing the run's ``data``); an unknown key or a bad value is one message."""
    import dataclasses

    from .train import StageConfig

    valid = [f.name for f in dataclasses.fields(StageConfig)] + ["data"]
    stages, stage_data = [], {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SystemExit(f"cocoa train: {where}: stages[{n}] must be an object like {{\"stage\": 1, ...}}")
        if "data" in entry:
            entry = dict(entry)
            stage_data[entry.get("stage")] = entry.pop("data")
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise SystemExit(f"cocoa train: {where}: stages[{n}] has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"valid keys: {', '.join(valid)}")
        if "stage" not in entry:
            raise SystemExit(f"cocoa train: {where}: stages[{n}] needs a 'stage' (0, 1, 2 or 3)")
        try:
            stages.append(StageConfig(**entry))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"cocoa train: {where}: stages[{n}]: {e}") from None
    return stages, stage_data


def train(args) -> int:
    from .stage_inputs import SettingError
    from .train import StageConfig

    if args.config:
        try:
            spec = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cocoa train: --config {args.config}: {e}") from None
        unknown = sorted(set(spec) - set(RUN_KEYS)) if isinstance(spec, dict) else None
        if unknown is None or unknown or not isinstance(spec.get("stages"), list):
            problem = (f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown
                       else "it must be an object with a 'stages' list")
            raise SystemExit(f"cocoa train: {args.config}: {problem}; valid keys: {', '.join(RUN_KEYS)}")
        stages, stage_data = _stage_configs(spec["stages"], args.config)
        model_src, data_src, out = spec.get("model", "tiny"), spec.get("data", "builtin"), spec.get("out", args.out)
        init, report_to = spec.get("init", args.init), spec.get("report_to", args.report_to)
        image_dir = spec.get("image_dir", args.image_dir)
    else:
        if args.stage is None:
            raise SystemExit("cocoa train: give --stage (0, 1, 2 or 3) or --config FILE")
        lora = {"r": args.lora_r, "alpha": 2 * args.lora_r} if args.lora_r else None
        flags = {k: getattr(args, k) for k in STAGE_FLAGS if getattr(args, k) is not None}
        try:
            stages = [StageConfig(stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  lora=lora, **flags)]
        except (TypeError, ValueError) as e:
            raise SystemExit(f"cocoa train: {e}") from None
        model_src, out, init, report_to = args.model, args.out, args.init, args.report_to
        data_src = args.data[0] if len(args.data) == 1 else args.data  # several: mixed, equal weights
        stage_data, image_dir = {}, args.image_dir
    if out is None:
        raise SystemExit("cocoa train: give --out DIR (or 'out' in the config)")
    from .train import train_from_sources

    try:
        results = train_from_sources(stages, model_src, data_src, out, init=init, report_to=report_to,
                                     stage_data=stage_data, image_dir=image_dir)
    except SettingError as e:  # a bad setting or source, found before training started
        raise SystemExit(f"cocoa train: {e}") from None
    for stage, result in results.items():
        print(f"stage {stage}: {result['steps']} steps, loss {result['loss'][0]:.4f} -> {result['loss'][-1]:.4f}")
    return 0


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise SystemExit(f"cocoa {args.command}: --batch-size must be >= 1, got {args.batch_size}")


def _load_embedder(args):
    """The Embedder of ``--model`` (a local folder: these commands never download)."""
    from .embed import Embedder

    if not Path(args.model).is_dir():
        raise SystemExit(f"cocoa {args.command}: --model {args.model}: no such folder "
                         "(expected a model folder, e.g. a stage's DIR/final/backbone)")
    return Embedder.from_pretrained(args.model)


def embed(args) -> int:
    from .data.images import BadSampleError
    from .embed_io import check_out, embed_inputs, read_embed_inputs, write_embeddings

    _check_batch_size(args)
    try:  # flags and data are checked before the model loads
        out = check_out(args.out)
        data = read_embed_inputs(args.data, side=args.side, image_dir=args.image_dir, on_bad_sample=args.on_bad_sample)
    except (BadSampleError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"cocoa embed: {e}") from None
    if data.skipped.count:
        print(f"cocoa embed: {data.skipped.summary()}")
    if not data.inputs:
        raise SystemExit(f"cocoa embed: {args.data}: no inputs left to embed")
    embedder = _load_embedder(args)
    vectors = embed_inputs(embedder, data.inputs, instruction=args.instruction, batch_size=args.batch_size,
                           show_progress_bar=True)
    written = write_embeddings(out, data.ids, vectors)
    print(f"{vectors.shape[0]} embeddings of dim {vectors.shape[1]} -> {', '.join(map(str, written))}")
    return 0


def eval_(args) -> int:
    from .data.images import BadSampleError
    from .evaluate import evaluate_tasks, read_eval_files

    start = time.perf_counter()
    _check_batch_size(args)
    try:  # flags and data are checked before the model loads
        tasks = read_eval_files(args.data, names=args.task_names, image_dir=args.image_dir,
                                on_bad_sample=args.on_bad_sample)
    except (BadSampleError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"cocoa eval: {e}") from None
    result = evaluate_tasks(_load_embedder(args), tasks, batch_size=args.batch_size, show_progress_bar=True,
                            log=lambda msg: print(f"cocoa eval: {msg}"))
    result.update(model=args.model, wall_s=round(time.perf_counter() - start, 3))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, metrics in result["tasks"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    if result["mean_hit@1"] is not None:
        print(f"mean hit@1 {result['mean_hit@1']:.4f}")
    print(f"results: {out}")
    return 0


def data_export_eval(args) -> int:
    from .export_eval import export_eval

    try:
        written = export_eval(args.out, dataset=args.dataset, split=args.split, length=args.size,
                              candidates=args.candidates, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"cocoa data export-eval: {e}") from None
    print(f"{written.pop('images')} images under {Path(args.out) / 'images'}; "
          + ", ".join(f"{kind}: {path}" for kind, path in written.items()))
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

    def claim_flags(p, out: str, seeds: list | None):
        p.add_argument("--out", default=out, help="run folder (results are cached there: a rerun resumes)")
        p.add_argument("--seeds", type=int, nargs="+", default=seeds, help="seeds (each: its own data and init)")
        p.add_argument("--steps", type=int, nargs=4, default=None, metavar=("S0", "S1", "S2", "S3"),
                       help="optimizer steps of stages 0-3 (the compute control gets S1+S2 more stage-0 steps)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any cocoa.demo.DemoConfig field, e.g. --set stage3_lr=3e-3 (repeatable)")
        # One thread by default: at the tiny model's sizes more threads gain little, and on a busy
        # CPU they wait on each other (measured: 4-6 s per step with 2 threads vs 0.1-0.25 s with 1)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads while it runs (default 1)")

    p = sub.add_parser("demo", help="is CoCoA more data-efficient than contrastive-only? one seed, three arms")
    claim_flags(p, "runs/demo", None)
    p.add_argument("--seed", type=int, default=None, help="one seed (default 0); --seeds for several")
    p.set_defaults(fn=demo)

    p = sub.add_parser("experiment", help="the demo over seeds x labelled-pool sizes, with a per-arm stage-3 lr")
    claim_flags(p, "runs/experiment", [0, 1, 2])
    p.add_argument("--pools", type=int, nargs="+", default=[128, 512], help="labelled-pool sizes for stage 3")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                   help="stage-3 learning rates; each arm takes the best on the validation split")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for independent pieces (seeds, stage-3 runs), one torch thread each")
    p.set_defaults(fn=experiment)

    p = sub.add_parser("train", help="run one CoCoA stage, or a chain of stages from --config")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="0: causal captioning (the demo's starting point)")
    p.add_argument("--model", default="tiny", help="'tiny' (built-in, random weights) or a local model folder")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="'builtin' (synthetic shapes), a .jsonl/.parquet file (the project's JSONL, MMEB-train "
                        "rows, or a table with our column names) or a datasets folder (save_to_disk); "
                        "several are mixed with equal weights (weights, column mappings: --config)")
    p.add_argument("--image-dir", default=None,
                   help="where relative image paths start (default: each data file's folder)")
    p.add_argument("--on-bad-sample", choices=["error", "skip"], default=None,
                   help="a row with a missing or undecodable image: stop naming it (error, the default) "
                        "or skip it (counted and logged)")
    p.add_argument("--out", default=None)
    p.add_argument("--init", default=None, help="a previous stage's output folder (DIR/final) to start from")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (needs peft)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the model's new weights, data order, masks and dropout (default 0): "
                        "the same command gives the same weights")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="mixed precision with fp32 master weights (bf16, fp16) or plain fp32; "
                        "default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute the backbone's activations in the backward (less memory, ~30%% more compute)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches of --batch-size per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (default 1.0; 0: none)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="resize images to at most this many pixels (at least 28*28 for Qwen2-VL)")
    p.add_argument("--min-pixels", type=int, default=None, help="resize images to at least this many pixels")
    p.add_argument("--max-length", type=int, default=None, help="text tokens kept per input")
    p.add_argument("--mask-token", default=None,
                   help="stages 1-2: an existing token to mask with (default: the tokenizer's, or <|mask|> added)")
    p.add_argument("--pack-budget", type=int, default=None, help="stages 1-2: pack inputs into rows of this many tokens")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every this many steps (0: only the end)")
    p.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="where the Trainer logs (loss and its text/image/contrastive parts)")
    p.add_argument("--config", default=None,
                   help='JSON: {"model", "data", "image_dir", "out", "init", "report_to", "stages": [{"stage": 1, '
                        '...}]}; a stage takes any StageConfig field and its own "data"')
    p.set_defaults(fn=train)

    def eval_data_flags(p):
        p.add_argument("--image-dir", default=None,
                       help="image paths are relative to this (default: the data file's folder)")
        p.add_argument("--on-bad-sample", choices=["error", "skip"], default="error",
                       help="a row with a missing/undecodable image or malformed fields: stop (default) "
                            "or skip and count")
        p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("embed", help="embed the rows of a JSONL/parquet file (or an MMEB-eval file's queries "
                                     "or candidates)")
    p.add_argument("--model", required=True, help="a model folder (a stage's DIR/final/backbone)")
    p.add_argument("--data", required=True,
                   help="JSONL/parquet rows {id?, image?, text?, instruction?} (the project JSONL too) "
                        "or an MMEB-eval file")
    p.add_argument("--out", required=True,
                   help="FILE.npy (+ FILE.ids.json), FILE.parquet (id, embedding columns) "
                        "or FILE.pt (the tensor alone)")
    p.add_argument("--side", choices=["qry", "tgt"], default=None,
                   help="MMEB-eval files: embed the queries (default) or the candidates (ids ROW:INDEX)")
    p.add_argument("--instruction", default=None, help="put before every input without its own instruction")
    eval_data_flags(p)
    p.set_defaults(fn=embed)

    p = sub.add_parser("eval", help="MMEB-eval hit@1 and paired-caption Recall@1/5/10 of a model folder")
    p.add_argument("--model", required=True, help="a model folder (a stage's DIR/final/backbone)")
    p.add_argument("--data", required=True, nargs="+", help="MMEB-eval files and/or paired {image, text} files")
    p.add_argument("--task-names", nargs="+", default=None, help="one name per --data file (default: the file stems)")
    p.add_argument("--out", required=True, help="RESULT.json")
    eval_data_flags(p)
    p.set_defaults(fn=eval_)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("export-eval", help="write the built-in eval data as PNGs + files `cocoa eval` reads")
    p.add_argument("--out", required=True, help="folder for images/ and the .jsonl files")
    p.add_argument("--dataset", choices=["objects", "shapes"], default="objects",
                   help="objects: the demo's data and settings (default); shapes: ShapesDataset")
    p.add_argument("--split", default="eval", help="objects: train, val or eval; shapes: train or eval")
    p.add_argument("--size", type=int, default=None, help="items (default: the demo's eval_size)")
    p.add_argument("--candidates", type=int, default=8,
                   help="candidates per query in the hit@1 files (positive included)")
    p.add_argument("--seed", type=int, default=0, help="the data seed (the demo's --seed) and the negatives' draw")
    p.set_defaults(fn=data_export_eval)

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
    from . import missing_extra

    try:
        return args.fn(args)
    except ModuleNotFoundError as e:  # a training-layer dependency not installed: say which extra
        message = missing_extra(e)
        if message is None:
            raise
        raise SystemExit(f"cocoa {args.command}: {message}") from None
