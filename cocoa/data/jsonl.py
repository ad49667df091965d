"""JSONL loader: one sample a line.

    {"image": "imgs/0.png", "text": "...", "target": "...", "positive": {...}, "negatives": [{...}]}

Every key is optional, but each sample (and each positive/negative) needs an image or a text.
Image paths are relative to the file. Errors name the file and the line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from .sample import Sample

_KEYS = {"image", "text", "target", "positive", "negatives"}
_NESTED_KEYS = {"image", "text"}


def load_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            samples.append(_sample(record, path.parent, where, _KEYS))
    return samples


def _sample(record, root: Path, where: str, keys: set[str]) -> Sample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - keys
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
    for key in ("text", "target"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: '{key}' must be a string")
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a path string")
        image = root / image
        if not image.is_file():
            raise ValueError(f"{where}: image file not found: {image}")
    if image is None and not record.get("text"):
        raise ValueError(f"{where}: a sample needs an 'image' or a non-empty 'text'")
    positive = record.get("positive")
    if positive is not None:
        positive = _sample(positive, root, f"{where} (positive)", _NESTED_KEYS)
    negatives = record.get("negatives", [])
    if not isinstance(negatives, list):
        raise ValueError(f"{where}: 'negatives' must be a list")
    negatives = [_sample(n, root, f"{where} (negative {i})", _NESTED_KEYS) for i, n in enumerate(negatives)]
    return Sample(image=image, text=record.get("text"), target=record.get("target"),
                  positive=positive, negatives=negatives)
