"""Rows of any table (parquet, a datasets folder, JSONL) -> Samples, through a column mapping.

``columns`` maps our fields to the file's column names, e.g. ``{"text": "caption", "image": "img"}``:

    text, image, target, instruction                 the input (query)
    positive_text, positive_image, positive_instruction   its positive (stage 3)
    negative_text, negative_image                    one hard negative (it takes positive_instruction)

An image column holds a path string or Hugging Face's image struct ``{"bytes", "path"}``. Without a
mapping, each of our fields that the file has as a column maps to itself (a datasets folder with
``image`` and ``text`` columns needs none). A row whose positive (or negative) columns are empty has
no positive (negative); a row whose input is empty is a bad row.
"""

from __future__ import annotations

from .images import BadSampleError
from .sample import Sample

FIELDS = ("text", "image", "target", "instruction", "positive_text", "positive_image", "positive_instruction",
          "negative_text", "negative_image")
_TEXTS = tuple(f for f in FIELDS if not f.endswith("image"))


def check_columns(columns, file_fields: list[str], where: str) -> dict[str, str]:
    """The mapping to use: ``columns`` validated against our fields and the file's, or (None) the
    identity over the fields the file has."""
    if columns is None:
        columns = {f: f for f in FIELDS if f in file_fields}
        if not columns:
            raise ValueError(f"{where}: cannot tell how to read this file: its fields are {file_fields}, none of "
                             f"ours ({', '.join(FIELDS)}) nor MMEB's (qry, pos_text); give 'columns', e.g. "
                             '{"text": "caption", "image": "image"}')
        return columns
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ValueError(f"{where}: 'columns' must map our field names to the file's column names (strings)")
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: 'columns' has unknown field(s) {unknown}; ours are {', '.join(FIELDS)}")
    missing = sorted(c for c in columns.values() if c not in file_fields)
    if missing:
        raise ValueError(f"{where}: 'columns' names column(s) {missing} the file does not have; it has {file_fields}")
    if not {"text", "image"} & set(columns):
        raise ValueError(f"{where}: 'columns' must map 'text' or 'image' (the input)")
    return dict(columns)


def column_sample(row: dict, columns: dict[str, str], where: str, images, instruction: str | None = None) -> Sample:
    """The Sample of ``row`` read through ``columns``; ``images(cell, where)`` turns an image cell into
    ``Sample.image``; ``instruction`` is the input's when the row has none of its own."""
    value = {f: row.get(c) for f, c in columns.items()}
    for f in _TEXTS:
        if value.get(f) is not None and not isinstance(value[f], str):
            raise ValueError(f"{where}: column '{columns[f]}' ({f}) must hold strings, got {type(value[f]).__name__}")
    query = _part(value, "", where, images)
    if query is None:
        raise BadSampleError(f"{where}: the input has neither text nor image "
                             f"(columns {[columns[f] for f in ('text', 'image') if f in columns]})")
    query.target = value.get("target")
    query.instruction = value.get("instruction") or instruction
    positive_inst = value.get("positive_instruction")
    query.positive = _part(value, "positive_", f"{where} (positive)", images, positive_inst)
    negative = _part(value, "negative_", f"{where} (negative)", images, positive_inst)
    query.negatives = [negative] if negative is not None else []
    return query


def _part(value: dict, prefix: str, where: str, images, instruction=None) -> Sample | None:
    text = value.get(prefix + "text")
    text = text if text and text.strip() else None
    image = images(value.get(prefix + "image"), where)
    if image is None and text is None:
        return None
    return Sample(image=image, text=text, instruction=instruction)
