"""``cocoa embed``'s inputs and outputs: rows of a data file in, vectors with their ids out.

Inputs (a JSONL or parquet file, or a ``datasets`` folder: :func:`cocoa.data.tables.read_rows`):

- **rows** ``{"id"?, "image"?, "text"?, "instruction"?}``: one input per row (image and text
  together when both are given, after the row's instruction). The project's training JSONL reads
  as such rows: its ``target``/``positive``/``negatives`` are training fields and are not embedded.
  ``id`` (an int or a string; default: the line or row number) names the vector; ids must be distinct.
- **MMEB-eval files** (the first row has ``qry_text`` or ``qry_img_path``; read exactly as
  ``cocoa eval`` reads them, :mod:`cocoa.data.mmeb_eval`): ``side="qry"`` (the default) embeds
  each row's query, id = its row number; ``side="tgt"`` each row's candidates, id
  ``"<row>:<candidate index>"`` (0 is the positive).

Each distinct input is embedded once (MMEB candidate pools repeat across rows). Outputs, by the
suffix of ``out``: ``.npy`` (float32 (N, dim)) plus ``<stem>.ids.json`` beside it; ``.parquet``
with an ``id`` column and an ``embedding`` list<float32> column; ``.pt`` (the torch tensor alone,
as before). Ids stay ints when all are ints, else all become strings (one column type).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.images import BadSampleError, BadSamples, check_policy
from .data.mmeb_eval import EvalInput, ImageChecker, open_rows, read_eval_file, row_number
from .evaluate import embed_unique

ROW_KEYS = ("id", "image", "text", "instruction")
PROJECT_KEYS = ("target", "positive", "negatives")  # project JSONL training fields, not embedded
OUT_SUFFIXES = (".npy", ".parquet", ".pt")
SIDES = ("qry", "tgt")


@dataclass
class EmbedInputs:
    ids: list = field(default_factory=list)
    inputs: list[EvalInput] = field(default_factory=list)
    skipped: BadSamples = field(default_factory=BadSamples)


def check_out(path: str | Path) -> Path:
    """``--out``'s suffix must name a format we write (checked before any model is loaded)."""
    path = Path(path)
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {path}: expected a file ending in one of {', '.join(OUT_SUFFIXES)}")
    return path


def read_embed_inputs(path: str | Path, *, side: str | None = None, image_dir=None,
                      on_bad_sample: str = "error") -> EmbedInputs:
    """The inputs of ``path`` and their ids (see the module doc)."""
    check_policy(on_bad_sample)
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    rows = open_rows(path, "data file")
    if not len(rows):
        raise ValueError(f"data file {rows.path}: no rows")
    if "qry_text" in rows[0] or "qry_img_path" in rows[0]:
        return _mmeb_inputs(path, side or "qry", image_dir, on_bad_sample)
    if side is not None:
        raise ValueError(f"--side {side}: only for MMEB-eval files (rows with qry_text/tgt_text); "
                         f"{rows.where(0)} has keys {sorted(rows[0])}")
    return _row_inputs(rows, image_dir, on_bad_sample)


def _mmeb_inputs(path, side: str, image_dir, on_bad_sample: str) -> EmbedInputs:
    data = read_eval_file(path, image_dir=image_dir, on_bad_sample=on_bad_sample)
    out = EmbedInputs(skipped=data.skipped)
    for row in data.rows:
        if side == "qry":
            out.ids.append(row.number)
            out.inputs.append(row.query)
        else:
            out.ids.extend(f"{row.number}:{j}" for j in range(len(row.candidates)))
            out.inputs.extend(row.candidates)
    return out


def _row_inputs(rows, image_dir, on_bad_sample: str) -> EmbedInputs:
    images = ImageChecker(base=rows.path.parent, image_dir=image_dir)
    out = EmbedInputs()
    first_seen: dict = {}
    for i, row in enumerate(rows):
        where = rows.where(i)
        try:
            ident, item = _row_input(row, where, row_number(where), images)
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            out.skipped.add(e)
            continue
        if ident in first_seen:
            raise ValueError(f"{where}: id {ident!r} repeats that of {first_seen[ident]}; ids must be distinct")
        first_seen[ident] = where
        out.ids.append(ident)
        out.inputs.append(item)
    return out


def _row_input(row: dict, where: str, number: int, images: ImageChecker) -> tuple:
    unknown = sorted(set(row) - set(ROW_KEYS) - set(PROJECT_KEYS))
    if unknown:
        raise BadSampleError(f"{where}: unknown key(s) {unknown}; a row to embed has {list(ROW_KEYS)}")
    for key in ("text", "instruction"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise BadSampleError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    ident = row.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, (int, str)):
        raise BadSampleError(f"{where}: 'id' must be an int or a string, got {ident!r}")
    image = images(row.get("image"), where)
    if image is None and not row.get("text"):
        raise BadSampleError(f"{where}: a row to embed needs an 'image' or a non-empty 'text'")
    return ident, EvalInput(image, row.get("text") or None, row.get("instruction") or None)


def embed_inputs(embedder, inputs: list[EvalInput], *, instruction: str | None = None, batch_size: int = 32,
                 show_progress_bar: bool | None = None) -> np.ndarray:
    """float32 (len(inputs), dim); each distinct input is embedded once. ``instruction`` applies to
    the inputs without their own."""
    index, vectors = embed_unique(embedder, inputs, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                  instruction=instruction)
    return vectors[[index[x] for x in inputs]] if inputs else vectors


def write_embeddings(path: str | Path, ids: list, vectors: np.ndarray) -> list[Path]:
    """Write ``vectors`` (N, dim) with their ``ids`` by ``path``'s suffix; returns the files written."""
    path = check_out(path)
    if len(ids) != len(vectors):
        raise ValueError(f"ids ({len(ids)}) and vectors ({len(vectors)}) must match one to one")
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not all(isinstance(i, int) for i in ids):
        ids = [str(i) for i in ids]
    if path.suffix == ".pt":
        import torch

        torch.save(torch.from_numpy(vectors), path)
        return [path]
    if path.suffix == ".npy":
        np.save(path, vectors)
        ids_path = ids_file(path)
        ids_path.write_text(json.dumps(ids))
        return [path, ids_path]
    import pyarrow as pa
    import pyarrow.parquet as pq

    id_type = pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)), type=pa.list_(pa.float32()))
    table = pa.table({"id": pa.array(ids, type=id_type), "embedding": embedding})
    pq.write_table(table, path)
    return [path]


def ids_file(npy_path: Path) -> Path:
    """``vecs.npy`` -> ``vecs.ids.json``."""
    return npy_path.with_suffix(".ids.json")
