"""Small evaluation/embedding input files for the tests: PNGs (a truncated one too), JSONL rows, MMEB-eval rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, seed: int = 0, size=(56, 56)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def truncated_png(path: Path) -> Path:
    png(path, seed=9)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmeb_row(query: str, texts: list, image: str = "", images: list | None = None, **extra) -> dict:
    return {"qry_text": query, "qry_img_path": image, "tgt_text": texts,
            "tgt_img_path": images if images is not None else [""] * len(texts), **extra}
