"""MMEB-train rows (VLM2Vec's training format) -> Samples.

    {"qry": "<|image_1|>\\nRepresent the given image for classification\\n", "qry_image_path": "ImageNet_1K/0.jpg",
     "pos_text": "Italian greyhound", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}

A row is a query, its positive and an optional hard negative (``neg_*`` both empty: none). An empty
image path means no image. An image placeholder (``<|image_1|>``) in a text marks where the image
goes: the text after it is the input's ``text``, the text before it (usually none) goes before the
image, so it becomes the input's ``instruction`` (an input is ``[instruction][image][text]<EOS>``).
A text without a placeholder but with an image path follows the image. Texts are kept as they are
(newlines included); a text that is only whitespace counts as none.

Optional per-row instructions: ``qry_inst`` for the query, ``pos_inst`` (or ``tgt_inst``) for the
positive and the negative; each goes before any text-before-the-placeholder. Other fields are ignored.
"""

from __future__ import annotations

import re

from .images import BadSampleError
from .sample import Sample

FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
INSTRUCTION_FIELDS = ("qry_inst", "pos_inst", "tgt_inst")
PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


def split_placeholder(text: str, instruction: str | None = None) -> tuple[str | None, str | None]:
    """``(instruction, text)`` of an MMEB input whose text may hold one image placeholder: the text
    before it goes after ``instruction`` (a row's ``*_inst``), since an input encodes as
    ``[instruction][image][text]<EOS>``; texts are kept as they are (newlines included), parts that
    are only whitespace are None. Training (this module) and ``cocoa eval`` (``mmeb_eval``) share it,
    so both encode an input alike. Raises ``ValueError`` for more than one placeholder."""
    parts = PLACEHOLDER.split(text)
    if len(parts) > 2:
        raise ValueError(f"{len(parts) - 1} image placeholders; one image per input is supported")
    before, after = parts if len(parts) == 2 else ("", text)
    if before.strip():
        instruction = (instruction or "") + before
    return instruction or None, after if after.strip() else None


def is_mmeb(fields) -> bool:
    """MMEB-train rows have a ``qry`` and a ``pos_text``."""
    return {"qry", "pos_text"} <= set(fields)


def mmeb_sample(row: dict, where: str, images, instruction: str | None = None) -> Sample:
    """The query of ``row`` with its positive and hard negative. ``images(path, where)`` resolves
    (and checks) an image path; ``instruction`` is the query's when the row has no ``qry_inst``."""
    for name in FIELDS + INSTRUCTION_FIELDS:
        if row.get(name) is not None and not isinstance(row[name], str):
            raise ValueError(f"{where}: MMEB field '{name}' must be a string, got {type(row[name]).__name__}")
    target_inst = row.get("pos_inst") or row.get("tgt_inst")
    query = _input(row, "qry", "qry_image_path", row.get("qry_inst") or instruction, f"{where} (query)", images)
    positive = _input(row, "pos_text", "pos_image_path", target_inst, f"{where} (positive)", images)
    negative = _input(row, "neg_text", "neg_image_path", target_inst, f"{where} (negative)", images)
    for name, part in (("query", query), ("positive", positive)):
        if part is None:
            raise BadSampleError(f"{where}: the {name} has neither text nor image")
    query.positive = positive
    query.negatives = [negative] if negative is not None else []
    return query


def _input(row: dict, text_field: str, image_field: str, instruction, where: str, images) -> Sample | None:
    text, path = row.get(text_field) or "", row.get(image_field) or ""
    placeholders = PLACEHOLDER.findall(text)
    if len(placeholders) > 1:
        raise BadSampleError(f"{where}: '{text_field}' has {len(placeholders)} image placeholders; "
                             "one image per input is supported")
    if placeholders and not path:
        raise BadSampleError(f"{where}: '{text_field}' has an image placeholder but '{image_field}' is empty")
    instruction, text = split_placeholder(text, instruction)
    image = images(path, where) if path else None
    if image is None and text is None:
        return None
    return Sample(image=image, text=text, instruction=instruction)
