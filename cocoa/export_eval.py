"""``cocoa data export-eval``: the built-in data as files ``cocoa eval`` reads.

So the demo's held-out evaluation and ``cocoa eval`` are the same code on the same items:
``dataset="objects"`` is the demo's data with the demo's settings (``DemoConfig``: objects per
image, image size; ``Setup.dataset``), ``"shapes"`` the older ``ShapesDataset``. Item ``i`` of the
split (its ``caption`` task: an image and its caption) becomes, under ``out``:

- ``images/<dataset>_<split>_<i>.png`` (PNG: lossless, so the file embeds as the in-memory image does);
- ``<dataset>_<split>_paired.jsonl``: ``{"id": i, "image", "text"}``, caption i matches image i
  (Recall@1/5/10 both ways; the demo's ``retrieval_recall`` on the same items gives the same numbers);
- ``<dataset>_<split>_i2t.jsonl``: MMEB-eval rows, the image as query and ``candidates`` captions
  (its own first, then others drawn from the split);
- ``<dataset>_<split>_t2i.jsonl``: the caption as query and ``candidates`` images.

Negatives are drawn per item from the split's other items whose caption differs from the item's
(an identical caption would tie with the positive and count as a miss), by a seeded generator.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

DATASETS = ("objects", "shapes")
IMAGE = "<|image_1|>"  # the MMEB placeholder: an image candidate's text is the placeholder alone


def builtin_split(dataset: str, split: str, length: int | None, seed: int):
    """The built-in ``dataset``'s ``split`` (``length`` items; default: the demo's ``eval_size``)."""
    from .demo import DemoConfig

    cfg = DemoConfig()
    length = cfg.eval_size if length is None else length
    if dataset == "objects":
        from .data.objects import ObjectsDataset

        # as the demo's Setup.dataset builds every split
        return ObjectsDataset(length, split, objects=cfg.objects, size=cfg.image_size, seed=seed)
    if dataset == "shapes":
        from .data.synthetic import ShapesDataset

        return ShapesDataset(length, split, size=cfg.image_size, seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def export_eval(out: str | Path, *, dataset: str = "objects", split: str = "eval", length: int | None = None,
                candidates: int = 8, seed: int = 0) -> dict:
    """Write the files (see the module doc); returns ``{"images": n, "paired"|"i2t"|"t2i": path}``."""
    data = builtin_split(dataset, split, length, seed)
    n = len(data)
    if not 2 <= candidates <= n:
        raise ValueError(f"candidates must be between 2 and the split's {n} items, got {candidates}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem = f"{dataset}_{split}"
    images, captions = [], []
    for i in range(n):
        sample = data[i]
        name = f"images/{stem}_{i:05d}.png"
        sample.image.save(out / name)
        images.append(name)
        captions.append(sample.text)
    paired = [{"id": i, "image": images[i], "text": captions[i]} for i in range(n)]
    counts = Counter(captions)
    i2t, t2i = [], []
    for i in range(n):
        rng = random.Random(f"{seed}/{split}/{i}/negatives")
        picks = [i, *_negatives(captions, counts, i, candidates - 1, rng)]
        i2t.append({"qry_text": IMAGE, "qry_img_path": images[i],
                    "tgt_text": [captions[j] for j in picks], "tgt_img_path": [""] * len(picks)})
        t2i.append({"qry_text": captions[i], "qry_img_path": "",
                    "tgt_text": [IMAGE] * len(picks), "tgt_img_path": [images[j] for j in picks]})
    written = {"images": n}
    for kind, rows in (("paired", paired), ("i2t", i2t), ("t2i", t2i)):
        path = out / f"{stem}_{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[kind] = path
    return written


def _negatives(captions: list[str], counts: Counter, i: int, k: int, rng: random.Random) -> list[int]:
    """``k`` distinct items whose caption differs from item ``i``'s (rejection sampling: O(k), not O(n))."""
    if len(captions) - counts[captions[i]] < k:
        raise ValueError(f"item {i}: only {len(captions) - counts[captions[i]]} items with another caption, "
                         f"{k} negatives wanted (fewer candidates, or a longer split)")
    picks: list[int] = []
    while len(picks) < k:
        j = rng.randrange(len(captions))
        if captions[j] != captions[i] and j not in picks:
            picks.append(j)
    return picks
