"""Rows of a data file, by index, whatever holds them: JSONL lines, a parquet file, or a local
Hugging Face ``datasets`` folder (what ``Dataset.save_to_disk`` writes: ``*.arrow`` files in Arrow
IPC stream format beside ``state.json``/``dataset_info.json``), read with pyarrow alone.

Also the image cells such rows hold: a path string, or Hugging Face's image struct
``{"bytes": ..., "path": ...}`` (bytes win when both are set).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .images import BadSampleError, CheckedImages, check_image_bytes, resolve_image


class Rows:
    """``len(rows)``, ``rows[i]`` (a dict: field -> value), ``rows.where(i)`` (``file:N``: the line
    of a JSONL file, the row of a table counted from 1), ``rows.fields`` (the field names), ``rows.path``."""

    path: Path
    fields: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.path}:{i + 1}"

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class JsonlRows(Rows):
    """Every non-empty line parsed once (a line that is not a JSON object is an error naming it)."""

    def __init__(self, path: Path):
        self.path = path
        self._records, self._lines = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._records.append(_record(line, f"{path}:{lineno}"))
                    self._lines.append(lineno)
        self.fields = list(self._records[0]) if self._records else []

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]

    def where(self, i):
        return f"{self.path}:{self._lines[i]}"


class TableRows(Rows):
    """A pyarrow table; a row becomes a dict only when asked for (image bytes stay in Arrow memory)."""

    def __init__(self, path: Path, table):
        self.path, self.table = path, table
        self.fields = list(table.column_names)

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        return self.table.slice(i, 1).to_pylist()[0]

    def __iter__(self):  # batch by batch: one to_pylist call per batch, not per row
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()


def first_fields(path: Path) -> list[str]:
    """The field names of a data file without reading all of it: a JSONL file's first object's keys
    (a first line that is not a JSON object is an error naming it), a parquet file's or a datasets
    folder's schema."""
    if path.is_dir():
        return list(_arrow_schema(_arrow_files(path)[0]).names)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                return list(_record(line, f"{path}:{lineno}"))
    return []


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_rows(path: Path, columns: list[str] | None = None) -> Rows:
    """The rows of ``path`` (``.jsonl``, ``.parquet`` or a datasets folder); ``columns``: for tables,
    read only these (they must exist)."""
    if path.is_dir():
        import pyarrow as pa

        files = _arrow_files(path)
        table = pa.concat_tables([_read_arrow(f) for f in files])
        return TableRows(path, _select(table, columns, path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return TableRows(path, _select(pq.read_table(path), columns, path))
    return JsonlRows(path)


def _select(table, columns, path):
    if columns is None:
        return table
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the file has {table.column_names}")
    return table.select(list(dict.fromkeys(columns)))


def _arrow_files(folder: Path) -> list[Path]:
    """The ``.arrow`` files of a ``save_to_disk`` folder, in the order ``state.json`` lists them."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ValueError(f"{folder}: a DatasetDict folder (several splits); give one split's folder, "
                         f"e.g. {folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{state}: not a datasets state.json (no '_data_files' list of filenames: {e})") from None
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise ValueError(f"{folder}: a folder, but no *.arrow files (expected what datasets' save_to_disk writes)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{folder}: state.json lists {f.name}, which is not there")
    return files


def _read_arrow(file: Path):
    import pyarrow as pa

    try:  # save_to_disk writes the IPC stream format; memory-mapped, so columns are not copied
        return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
    except pa.ArrowInvalid as e:
        raise ValueError(f"{file}: not an Arrow IPC stream ({e})") from None


def _arrow_schema(file: Path):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(file))).schema
    except pa.ArrowInvalid as e:
        raise ValueError(f"{file}: not an Arrow IPC stream ({e})") from None


class ImageCells:
    """An image cell -> what ``Sample.image`` holds: None (no image), a path, or a PIL image opened
    (not decoded) from the cell's bytes. ``check=True`` (when the data loads) also checks that the
    image decodes, raising :class:`BadSampleError` naming the row; ``check=False`` (when a training
    batch asks for a row that was checked already) does not open files."""

    def __init__(self, base: Path, image_dir=None, *, check: bool):
        self.base, self.image_dir = base, image_dir
        self.checked = CheckedImages() if check else None

    def __call__(self, cell, where: str):
        if cell is None or cell == "":
            return None
        if isinstance(cell, dict) and set(cell) <= {"bytes", "path"}:
            if cell.get("bytes"):
                return self._from_bytes(cell["bytes"], where)
            cell = cell.get("path")
            if not cell:
                raise BadSampleError(f"{where}: image cell has neither bytes nor a path")
        if not isinstance(cell, str):
            raise ValueError(f"{where}: an image cell must be a path string or {{'bytes', 'path'}}, "
                             f"got {type(cell).__name__}")
        path = resolve_image(cell, base=self.base, image_dir=self.image_dir)
        return self.checked(path, where) if self.checked is not None else path

    def _from_bytes(self, data: bytes, where: str):
        from PIL import Image

        if self.checked is not None:
            check_image_bytes(data, where)
        return Image.open(io.BytesIO(data))  # decoded only when the encoder converts it
