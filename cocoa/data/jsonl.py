"""The project's JSONL: one sample a line.

    {"image": "imgs/0.png", "text": "...", "target": "...", "instruction": "...",
     "positive": {"image": ..., "text": ..., "instruction": ...}, "negatives": [{...}]}

Every key is optional, but each sample (and each positive/negative) needs an image or a text.
Image paths are relative to ``image_dir`` when given, else to the file's folder. Errors name the
file and the line number.

Every image is checked when the file loads (:func:`cocoa.data.images.check_image`). A missing or
undecodable image, or a sample with neither image nor text, is a bad row: ``on_bad_sample="error"``
raises :class:`~cocoa.data.images.BadSampleError`, ``"skip"`` drops the line and counts it in
``bad``. A line that is not this schema (not JSON, unknown keys, wrong types) always raises: it
means the file is something else, not that one row is damaged.
"""

from __future__ import annotations

import json
from pathlib import Path

from .images import BadSampleError, BadSamples, CheckedImages, check_policy, resolve_image
from .sample import Sample

KEYS = ("image", "text", "target", "instruction", "positive", "negatives")
_NESTED_KEYS = ("image", "text", "instruction")


def load_jsonl(path: str | Path, *, image_dir: str | Path | None = None, on_bad_sample: str = "error",
               bad: BadSamples | None = None) -> list[Sample]:
    """The file's samples; ``bad`` (if given) counts the lines skipped under ``on_bad_sample="skip"``."""
    check_policy(on_bad_sample)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    reader = _Reader(path.parent, image_dir, CheckedImages())
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
            try:
                samples.append(reader.sample(record, where, KEYS))
            except BadSampleError as e:
                if on_bad_sample == "error":
                    raise
                if bad is not None:
                    bad.add(e)
    return samples


class _Reader:
    def __init__(self, root: Path, image_dir, check: CheckedImages):
        self.root, self.image_dir, self.check = root, image_dir, check

    def sample(self, record, where: str, keys: tuple[str, ...]) -> Sample:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        unknown = set(record) - set(keys)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
        for key in ("text", "target", "instruction"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ValueError(f"{where}: '{key}' must be a string")
        image = record.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise ValueError(f"{where}: 'image' must be a path string")
            image = self.check(resolve_image(image, base=self.root, image_dir=self.image_dir), where)
        negatives = record.get("negatives", [])
        if not isinstance(negatives, list):
            raise ValueError(f"{where}: 'negatives' must be a list")
        positive = record.get("positive")
        if positive is not None:
            positive = self.sample(positive, f"{where} (positive)", _NESTED_KEYS)
        negatives = [self.sample(n, f"{where} (negative {i})", _NESTED_KEYS) for i, n in enumerate(negatives)]
        if image is None and not record.get("text"):
            raise BadSampleError(f"{where}: a sample needs an 'image' or a non-empty 'text'")
        return Sample(image=image, text=record.get("text"), target=record.get("target"), positive=positive,
                      negatives=negatives, instruction=record.get("instruction"))
