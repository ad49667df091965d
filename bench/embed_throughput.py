"""Inference throughput of ``Embedder.encode``: packed rows against one padded row per input.

    python -m bench.embed_throughput --model small --out bench/results          # CPU
    python -m bench.embed_throughput --model 2b --device cuda --out $OUT          # a GPU

The input mix is length-skewed, as retrieval corpora are: mostly short texts (queries, titles),
some long passages, some images and image+text pairs (seeded, the same for every arm). Arms:

- ``packed``: ``Embedder.encode`` as shipped (sorted by length, packed into rows of
  ``pack_tokens``, one bidirectional segment per input);
- ``padded_sorted``: the same sorted batches, but one input per row, padded to the batch's longest;
- ``padded``: one input per row in the caller's order (what ``encode`` did before packing).

All arms run the same model, encoder and EOS pooling and give the same vectors (checked: the minimum
cosine against ``packed`` is recorded). Each arm is timed over ``--repeats`` full passes after one
warm-up pass; inputs/s is the median. Random weights: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

MODELS = ("tiny", "small", "2b")


def build(model: str, device: str):
    from cocoa import Embedder, load_model
    from cocoa.embed import default_image_processor
    from cocoa.tiny import char_tokenizer, tiny_config

    if model == "tiny":
        config = tiny_config()
    elif model == "small":  # wide enough that the matrix work, not Python, dominates on a CPU
        config = tiny_config(hidden_size=256, layers=4, heads=4, kv_heads=2, rope_scaling=_mrope(64))
    else:  # Qwen2-VL-2B's text shapes; the vision tower kept small (a few blocks, same structure)
        config = tiny_config(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960,
                             rope_scaling=_mrope(128))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backbone = load_model(config, dtype=dtype).to(device)
    return Embedder(backbone, char_tokenizer(), default_image_processor(), max_length=1024), config


def _mrope(head_dim: int) -> dict:
    """Qwen2-VL's M-RoPE split (16, 24, 24 of a 128 head dim's 64 frequencies), scaled to head_dim."""
    quarter = head_dim // 8
    return {"type": "mrope", "mrope_section": [quarter, (head_dim // 2 - quarter) // 2, (head_dim // 2 - quarter) // 2]}


def skewed_mix(n: int, seed: int = 0) -> list:
    """80% short texts (8-32 characters = tokens with the char tokenizer), 10% long passages
    (300-900), 5% images, 5% image + short text pairs; images 56-168 px per side."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    text = lambda lo, hi: "".join(rng.choice(letters, int(rng.integers(lo, hi)))).strip() or "a"
    image = lambda: Image.fromarray(rng.integers(0, 255, (int(rng.integers(2, 7)) * 28, int(rng.integers(2, 7)) * 28, 3),
                                                 dtype=np.uint8))
    items = []
    for kind in rng.choice(4, n, p=[0.8, 0.1, 0.05, 0.05]):
        items.append([lambda: text(8, 32), lambda: text(300, 900), image, lambda: {"image": image(), "text": text(8, 32)}][kind]())
    return items


def padded_encode(embedder, items, batch_size: int, sort: bool) -> np.ndarray:
    """One input per row (padding to the batch's longest), in caller order or sorted longest first."""
    from cocoa.data.encoding import packed_embedding_batch
    from cocoa.embed import eos_states

    device = next(embedder.model.parameters()).device
    encoded = [embedder.encoder.encode(*embedder._item(item)[:2]) for item in items]
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i].ids)) if sort else list(range(len(items)))
    out = torch.empty(len(items), embedder.model.config.get_text_config().hidden_size, device=device)
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            chunk = order[b0:b0 + batch_size]
            group = [encoded[i] for i in chunk]
            batch = packed_embedding_batch(embedder.encoder, group, [[j] for j in range(len(group))])
            out[torch.tensor(chunk, device=device)] = eos_states(embedder.backbone, batch, device)
    return torch.nn.functional.normalize(out, dim=-1).float().cpu().numpy()


def run(model: str, device: str, n: int, batch_size: int, repeats: int) -> dict:
    from .environment import device_info, today, versions

    embedder, config = build(model, device)
    items = skewed_mix(n)
    arms = {
        "packed": lambda: embedder.encode(items, batch_size=batch_size, show_progress_bar=False),
        "padded_sorted": lambda: padded_encode(embedder, items, batch_size, sort=True),
        "padded": lambda: padded_encode(embedder, items, batch_size, sort=False),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    reference = arms["packed"]()
    rows = []
    for name, fn in arms.items():
        vectors = fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        lengths = [len(embedder.encoder.encode(*embedder._item(i)[:2]).ids) for i in items] if name == "packed" else None
        rows.append({
            "arm": name, "inputs": n, "batch_size": batch_size, "seconds": statistics.median(times),
            "inputs_per_s": n / statistics.median(times), "all_seconds": times,
            "min_cosine_vs_packed": float((vectors * reference).sum(-1).min()),
            **({"tokens": int(sum(lengths)), "longest": int(max(lengths))} if lengths else {}),
        })
    text = config.get_text_config()
    return {
        "benchmark": "embed_throughput", "date": today(), "device": device_info(torch.device(device)),
        "versions": versions(), "torch_threads": torch.get_num_threads(),
        "model": {"name": model, "hidden": text.hidden_size, "layers": text.num_hidden_layers,
                  "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                  "dtype": str(next(embedder.model.parameters()).dtype)},
        "pack_tokens": embedder.pack_tokens, "rows": rows,
    }


def markdown(result: dict) -> str:
    """The README table: inputs/s per arm and the speed-up of packing."""
    packed = next(r for r in result["rows"] if r["arm"] == "packed")
    m, d = result["model"], result["device"]
    lines = [f"Embedding throughput, {result['rows'][0]['inputs']} length-skewed inputs, batch "
             f"{packed['batch_size']}, model `{m['name']}` (hidden {m['hidden']}, {m['layers']} layers, {m['dtype']}), "
             f"{d['name']} {d.get('processor', '')} ({result['torch_threads']} threads), {result['date']}:", "",
             "| arm | inputs/s | packed is | min cosine vs packed |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['inputs_per_s']:.1f} | {r['seconds'] / packed['seconds']:.2f}x faster "
                     f"| {r['min_cosine_vs_packed']:.6f} |" if r["arm"] != "packed" else
                     f"| packed | {r['inputs_per_s']:.1f} | - | 1 |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.embed_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="a folder: writes embed-<model>-<date>-<device>.json and .md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, args.device, args.inputs, args.batch_size, args.repeats)
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"embed-{args.model}-{result['date']}-{result['device']['slug']}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
