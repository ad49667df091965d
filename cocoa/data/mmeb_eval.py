r"""Evaluation files for ``cocoa eval``: MMEB-eval ranking rows and paired caption rows.

Two kinds, told apart by the first row's keys (a JSONL or parquet file, or a ``datasets`` folder:
:func:`cocoa.data.tables.read_rows`):

- **ranking** (MMEB-eval; the first row has ``qry_text`` or ``qry_img_path``)::

      {"qry_text": "<|image_1|> Find the caption.", "qry_img_path": "imgs/q.png",
       "tgt_text": ["the positive", "a negative", ...], "tgt_img_path": ["", "", ...],
       "qry_inst": "...", "tgt_inst": "..."}          # the two *_inst keys are optional

  The first candidate is the positive; a row needs at least two candidates (one positive alone
  ranks first by definition, so it would only inflate hit@1) and as many ``tgt_img_path`` as
  ``tgt_text`` entries. An empty path means no image.
- **paired** (the first row has ``image`` and ``text``): ``{"image": "imgs/0.png", "text": "a caption"}``;
  row i's caption matches row i's image (Recall@k both ways, :func:`cocoa.evaluate.paired_recall`).

Other keys are ignored (MMEB files carry metadata columns; a project JSONL reads as a paired file).

**Image placeholders**, read as MMEB-train rows are (:mod:`cocoa.data.mmeb_train`, so training
and evaluation encode alike). An input is encoded ``[instruction] [image] [text] <EOS>``, so in
``"Find the caption: <|image_1|>\nof this photo"`` the text after the placeholder
(``"\nof this photo"``) is the input's text and the text before it goes before the image, as
(the end of) its instruction, after ``qry_inst``/``tgt_inst`` when the row has them. Texts are kept
as they are (newlines included); a part that is only whitespace counts as none. One placeholder
per input at most, and only with an image path (else the row is bad); a text without one but with
an image follows the image.

Images resolve under ``image_dir`` when given, else the data file's folder, and each is checked
once when the file is read (:func:`cocoa.data.images.check_image`). A bad row (missing or
undecodable image, missing or malformed field) raises :class:`BadSampleError` naming ``file:line``
under ``on_bad_sample="error"``, or is dropped and counted in ``EvalData.skipped`` under ``"skip"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .images import BadSampleError, BadSamples, CheckedImages, check_policy, resolve_image
from .mmeb_train import PLACEHOLDER, split_placeholder
from .tables import read_rows

RANKING_KEYS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")  # required; qry_inst/tgt_inst optional
PAIRED_KEYS = ("image", "text")


class EvalInput(NamedTuple):
    """One input to embed. Hashable: equal inputs (same image path, text and instruction) are
    embedded once per file."""

    image: Path | None = None
    text: str | None = None
    instruction: str | None = None

    def item(self) -> dict:
        """The ``Embedder.encode`` item: ``{"image", "text", "instruction"}`` without the unset keys."""
        return {k: v for k, v in zip(self._fields, self) if v is not None}


@dataclass
class RankingRow:
    where: str  # "file:line"
    number: int  # the line (JSONL) or row (parquet) number
    query: EvalInput
    candidates: list[EvalInput]  # candidates[0] is the positive


@dataclass
class PairedRow:
    where: str
    number: int
    image: Path
    text: str


@dataclass
class EvalData:
    path: Path
    kind: str  # "ranking" or "paired"
    rows: list = field(default_factory=list)
    skipped: BadSamples = field(default_factory=BadSamples)


def read_eval_file(path: str | Path, *, image_dir: str | Path | None = None, on_bad_sample: str = "error") -> EvalData:
    """Read a ranking or paired evaluation file (see the module doc)."""
    check_policy(on_bad_sample)
    rows = open_rows(path, "evaluation file")
    images = ImageChecker(base=rows.path.parent, image_dir=image_dir)
    data = None
    for i, row in enumerate(rows):
        where = rows.where(i)
        if data is None:
            data = EvalData(rows.path, _kind(row, where))
        parse = _ranking_row if data.kind == "ranking" else _paired_row
        try:
            data.rows.append(parse(row, where, row_number(where), images))
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            data.skipped.add(e)
    if data is None:
        raise ValueError(f"evaluation file {rows.path}: no rows")
    if not data.rows:
        raise ValueError(f"evaluation file {rows.path}: no rows left to evaluate ({data.skipped.summary()})")
    return data


def open_rows(path: str | Path, what: str):
    """:func:`read_rows` of ``path``, with a missing file or an unknown suffix named as ``what``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_file() and path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{what} {path}: expected a .jsonl or .parquet file (or a datasets folder), "
                         f"got suffix {path.suffix!r}")
    return read_rows(path)


def row_number(where: str) -> int:
    """The N of ``Rows.where``'s ``"file:N"``: a JSONL file's line, a table's row counted from 1."""
    return int(where.rsplit(":", 1)[1])


def _kind(row: dict, where: str) -> str:
    if "qry_text" in row or "qry_img_path" in row:
        return "ranking"
    if all(k in row for k in PAIRED_KEYS):
        return "paired"
    raise ValueError(f"{where}: cannot tell the file's kind from its first row (keys {sorted(row)}): expected "
                     f"MMEB-eval keys {list(RANKING_KEYS)} or paired keys {list(PAIRED_KEYS)}")


class ImageChecker:
    """A row's image cell -> a checked path under ``image_dir`` or ``base``; None for an empty cell.
    Each distinct file is checked once (MMEB rows share candidate images)."""

    def __init__(self, base: Path, image_dir):
        self.base, self.image_dir, self.checked = base, image_dir, CheckedImages()

    def __call__(self, value, where: str) -> Path | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise BadSampleError(f"{where}: an image path must be a string, got {type(value).__name__}")
        return self.checked(resolve_image(value, base=self.base, image_dir=self.image_dir), where)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadSampleError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _input(text: str, image: Path | None, instruction: str | None, where: str) -> EvalInput:
    if image is None and PLACEHOLDER.search(text):
        raise BadSampleError(f"{where}: the text has an image placeholder but the image path is empty")
    try:
        instruction, text = split_placeholder(text, instruction)
    except ValueError as e:
        raise BadSampleError(f"{where}: {e}") from None
    if image is None and text is None:
        raise BadSampleError(f"{where}: has neither an image nor a text")
    return EvalInput(image, text, instruction)


def _ranking_row(row: dict, where: str, number: int, images: ImageChecker) -> RankingRow:
    missing = [k for k in RANKING_KEYS if k not in row]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {missing}; an MMEB-eval row needs {list(RANKING_KEYS)}")
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    for key, value in (("tgt_text", texts), ("tgt_img_path", paths)):
        if not isinstance(value, list):
            raise BadSampleError(f"{where}: '{key}' must be a list (one entry per candidate), "
                                 f"got {type(value).__name__}")
    if len(texts) != len(paths):
        raise BadSampleError(f"{where}: 'tgt_text' has {len(texts)} entries but 'tgt_img_path' {len(paths)}; "
                             "expected one of each per candidate")
    if len(texts) < 2:
        raise BadSampleError(f"{where}: {len(texts)} candidate(s); expected the positive and at least one negative")
    at = f"{where} (query)"
    query = _input(_text(row, "qry_text", where), images(row["qry_img_path"], at),
                   _text(row, "qry_inst", where) or None, at)
    tgt_inst = _text(row, "tgt_inst", where) or None
    candidates = []
    for j, (text, image) in enumerate(zip(texts, paths)):
        at = f"{where} (candidate {j})"
        if text is not None and not isinstance(text, str):
            raise BadSampleError(f"{at}: text must be a string, got {type(text).__name__}")
        candidates.append(_input(text or "", images(image, at), tgt_inst, at))
    return RankingRow(where, number, query, candidates)


def _paired_row(row: dict, where: str, number: int, images: ImageChecker) -> PairedRow:
    missing = [k for k in PAIRED_KEYS if not row.get(k)]
    if missing:
        raise BadSampleError(f"{where}: missing or empty field(s) {missing}; a paired row needs "
                             f"{list(PAIRED_KEYS)}")
    return PairedRow(where, number, images(row["image"], where), _text(row, "text", where))
