"""Training data as ``cocoa train`` takes it: one source or several mixed by weight, per stage.

A data spec is ``"builtin"``, a path, a dict or a list of those::

    {"path": "mmeb/train.parquet", "format": "mmeb", "image_dir": "mmeb/images", "weight": 3}
    {"path": "captions/", "columns": {"text": "caption", "image": "image"}, "weight": 1,
     "instruction": "Find the caption: ", "on_bad_sample": "skip"}

- ``path``: ``"builtin"`` (synthetic shapes), a ``.jsonl`` or ``.parquet`` file, or a datasets
  folder (``save_to_disk``).
- ``format``: ``"cocoa"`` (the project's JSONL, :mod:`cocoa.data.jsonl`), ``"mmeb"`` (MMEB-train
  rows, :mod:`cocoa.data.mmeb_train`) or ``"columns"`` (a column mapping, :mod:`cocoa.data.columns`).
  When absent it is read from the fields: ``qry`` and ``pos_text`` mean MMEB; a parquet file, a
  datasets folder and JSONL with flat ``positive_*``/``negative_*`` fields go through ``columns``
  (by default the identity over our field names); other JSONL is the project's.
- ``image_dir``: where relative image paths start (default: the data file's folder).
- ``instruction``: the query instruction of the source's rows that carry none (stage 3).
- ``on_bad_sample``: ``"error"`` or ``"skip"``, over the stage's.
- ``weight``: the share of a mixture's items drawn from this source (default 1).

What a stage reads of a row: stage 3 the query with its positive and hard negatives (rows without
a positive are left out). Stages 0-2: for MMEB and column-mapped rows, the query and, when the row
has one, its positive, as two separate inputs (hard negatives are not used there; stage 2
reconstructs an image input's whole text); for the project's JSONL, each line as it is (one input;
its ``text``/``target`` are written for those stages, its positive for stage 3). ``builtin`` gives
captions to stages 0-2 and (image, caption) pairs to stage 3.

Every row is read and its images checked when the source loads; the data a batch asks for later
is built from the row again, without opening files, and image bytes are decoded only then.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from .columns import FIELDS as COLUMN_FIELDS
from .columns import check_columns, column_sample
from .images import BadSampleError, BadSamples, check_policy
from .jsonl import KEYS as PROJECT_KEYS
from .jsonl import load_jsonl
from .mmeb_train import FIELDS as MMEB_FIELDS
from .mmeb_train import INSTRUCTION_FIELDS as MMEB_INSTRUCTIONS
from .mmeb_train import is_mmeb, mmeb_sample
from .sample import Sample
from .tables import ImageCells, first_fields, read_rows

FORMATS = ("cocoa", "mmeb", "columns")
SPEC_KEYS = ("path", "format", "columns", "image_dir", "weight", "instruction", "on_bad_sample")
BUILTIN = "builtin"


@dataclass(frozen=True)
class DataSpec:
    path: str
    format: str | None = None
    columns: tuple | None = None  # (field, column) pairs: hashable, so equal specs load once
    image_dir: str | None = None
    weight: float = 1.0
    instruction: str | None = None
    on_bad_sample: str | None = None  # None: the stage's


def parse_data(spec, where: str = "data") -> list[DataSpec]:
    """A data spec (string, dict or list of those) -> DataSpecs; errors name ``where`` and the item."""
    if isinstance(spec, (str, Path)):
        return [DataSpec(path=str(spec))]
    if isinstance(spec, dict):
        return [_spec_from_dict(spec, where)]
    if isinstance(spec, (list, tuple)) and spec:
        specs = []
        for n, item in enumerate(spec):
            if isinstance(item, (list, tuple)):
                raise ValueError(f"{where}[{n}]: a list inside a list; give one flat list of sources")
            specs += parse_data(item, f"{where}[{n}]")
        return specs
    raise ValueError(f"{where}: expected 'builtin', a path, a dict like {{\"path\": ..., \"weight\": ...}} or a "
                     f"non-empty list of those, got {spec!r}")


def _spec_from_dict(d: dict, where: str) -> DataSpec:
    unknown = sorted(set(d) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a source takes {', '.join(SPEC_KEYS)}")
    if not isinstance(d.get("path"), (str, Path)):
        raise ValueError(f"{where}: needs a 'path' ('builtin', a .jsonl/.parquet file or a datasets folder)")
    if str(d["path"]) == BUILTIN and set(d) - {"path", "weight"}:
        raise ValueError(f"{where}: 'builtin' takes only a 'weight', got {sorted(set(d) - {'path', 'weight'})}")
    fmt = d.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"{where}: 'format' must be one of {', '.join(FORMATS)} (or absent: detected), got {fmt!r}")
    columns = d.get("columns")
    if columns is not None:
        if fmt not in (None, "columns"):
            raise ValueError(f"{where}: 'columns' goes with format 'columns', not {fmt!r}")
        if not isinstance(columns, dict):
            raise ValueError(f"{where}: 'columns' must be a dict from our field names to the file's columns")
        columns = tuple(sorted(columns.items()))
    weight = d.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}: 'weight' must be a positive number, got {weight!r}")
    for key in ("image_dir", "instruction"):
        if d.get(key) is not None and not isinstance(d[key], (str, Path)):
            raise ValueError(f"{where}: '{key}' must be a string")
    policy = d.get("on_bad_sample")
    if policy is not None:
        try:
            check_policy(policy)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    image_dir = d.get("image_dir")
    return DataSpec(path=str(d["path"]), format=fmt, columns=columns,
                    image_dir=None if image_dir is None else str(image_dir),
                    weight=float(weight), instruction=d.get("instruction"), on_bad_sample=policy)


# --------------------------------------------------------------------------- one loaded source
class LoadedSource:
    """The usable rows of one file: ``get(k)`` builds the k-th as a Sample; ``paired[k]`` says
    whether it has a positive. ``bad`` counts the rows skipped when it loaded.
    ``positives_as_inputs``: stages 0-2 also read each row's positive (pair formats)."""

    def __init__(self, name: str, n: int, get, paired: list[bool], bad: BadSamples, positives_as_inputs: bool):
        self.name, self.n, self.get, self.paired, self.bad = name, n, get, paired, bad
        self.positives_as_inputs = positives_as_inputs

    def for_stage(self, stage: int):
        if stage == 3:
            rows = [k for k in range(self.n) if self.paired[k]]
            if not rows:
                raise ValueError(f"data: {self.name}: stage 3 needs rows with a positive; this source has none")
            return _View(self.get, array("q", rows), pairs=False)
        both = (0, 1) if self.positives_as_inputs else (0,)
        inputs = [2 * k + part for k in range(self.n) for part in (both if self.paired[k] else (0,))]
        return _View(self.get, array("q", inputs), pairs=True)


class _View:
    """An indexable stage dataset over a source: stage 3 rows, or (pairs=True) stage 0-2 inputs
    numbered ``2 * row + part`` (part 1: the row's positive)."""

    def __init__(self, get, index: array, pairs: bool):
        self.get, self.index, self.pairs = get, index, pairs

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self.index):
            raise IndexError(i)
        if not self.pairs:
            return self.get(self.index[i])
        row, part = divmod(self.index[i], 2)
        sample = self.get(row)
        return sample.positive if part else sample


def load_source(spec: DataSpec, *, on_bad_sample: str = "error", image_dir=None) -> LoadedSource:
    """Read one file source, checking every row and image; ``image_dir``: the default for a spec
    without its own."""
    policy = check_policy(spec.on_bad_sample or on_bad_sample)
    path = Path(spec.path)
    image_dir = spec.image_dir if spec.image_dir is not None else image_dir
    if not path.exists():
        raise FileNotFoundError(f"data: file or folder not found: {path}")
    if not (_table(path) or path.suffix in (".jsonl", ".json")):
        raise ValueError(f"data: cannot read {path}: expected a .jsonl or .parquet file or a datasets folder "
                         "(Dataset.save_to_disk)")
    fields = first_fields(path)  # read only what the format needs: a table's columns in use
    fmt = spec.format or _detect(path, fields, spec.columns)
    if fmt == "cocoa":
        if _table(path):
            raise ValueError(f"data: {path}: format 'cocoa' is the project's JSONL; read a table with format 'columns'")
        return _project_jsonl(path, spec, image_dir, policy)
    if fmt == "mmeb":
        missing = [f for f in ("qry", "pos_text") if f not in fields]
        if missing:
            raise ValueError(f"data: {path}: format 'mmeb' needs fields {missing}; the file has {fields}")
        used = [f for f in MMEB_FIELDS + MMEB_INSTRUCTIONS if f in fields]

        def convert(row, where, images):
            return mmeb_sample(row, where, images, spec.instruction)
    else:
        columns = check_columns(dict(spec.columns) if spec.columns else None, fields, f"data: {path}")
        used = list(columns.values())

        def convert(row, where, images):
            return column_sample(row, columns, where, images, spec.instruction)
    rows = read_rows(path, used if _table(path) else None)
    return _checked_rows(rows, convert, path if path.is_dir() else path.parent, image_dir, policy)


def _project_jsonl(path: Path, spec: DataSpec, image_dir, policy: str) -> LoadedSource:
    bad = BadSamples()
    samples = load_jsonl(path, image_dir=image_dir, on_bad_sample=policy, bad=bad)
    if spec.instruction is not None:
        for s in samples:
            s.instruction = s.instruction if s.instruction is not None else spec.instruction
    # a line is one input for stages 0-2 (its text/target are written for them), as before pair formats
    return _finish(str(path), len(samples), samples.__getitem__, [s.positive is not None for s in samples], bad,
                   positives_as_inputs=False)


def _checked_rows(rows, convert, base: Path, image_dir, policy: str) -> LoadedSource:
    """Convert every row once, checking its images; keep the good rows' indices. A Sample is built
    again from its row whenever a batch asks for it, then without opening any file."""
    bad = BadSamples()
    checking = ImageCells(base, image_dir, check=True)
    keep, paired = [], []
    for i, row in enumerate(rows):
        try:
            sample = convert(row, rows.where(i), checking)
        except BadSampleError as e:
            if policy == "error":
                raise
            bad.add(e)
            continue
        keep.append(i)
        paired.append(sample.positive is not None)
    plain = ImageCells(base, image_dir, check=False)
    keep = array("q", keep)
    return _finish(str(rows.path), len(keep), lambda k: convert(rows[keep[k]], rows.where(keep[k]), plain), paired,
                   bad, positives_as_inputs=True)


def _finish(name, n, get, paired, bad, *, positives_as_inputs: bool) -> LoadedSource:
    if n == 0:
        why = f" ({bad.summary()})" if bad.count else ""
        raise ValueError(f"data: {name}: no usable rows{why}")
    return LoadedSource(name, n, get, paired, bad, positives_as_inputs)


def _table(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".parquet"


def _detect(path: Path, fields: list[str], columns) -> str:
    if columns is not None:
        return "columns"
    if is_mmeb(fields):
        return "mmeb"
    if _table(path):
        return "columns"
    # JSONL: flat positive_*/negative_* fields are a table's; anything else is the project's schema
    # (whose reader names a misspelt key)
    return "columns" if set(fields) & (set(COLUMN_FIELDS) - set(PROJECT_KEYS)) else "cocoa"


# --------------------------------------------------------------------------- mixing
class Mixture:
    """Several stage datasets as one: item ``i`` draws its source with probability proportional
    to ``weights`` and an item of that source uniformly, both from a generator seeded with
    ``(seed, i)``. So the mixture is a pure function of the index (the Trainer's sampler and an
    exact resume need nothing else), and its length is the sources' total."""

    def __init__(self, parts: list, weights: list[float], seed: int = 0):
        if len(parts) != len(weights) or not parts:
            raise ValueError("Mixture: one weight per source, at least one source")
        self.parts, self.weights, self.seed = parts, [float(w) for w in weights], int(seed)
        self._cum = [sum(self.weights[: j + 1]) for j in range(len(parts))]

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def source_of(self, i: int) -> tuple[int, int]:
        """(source, index within it) of item ``i``."""
        digest = blake2b(f"{self.seed}:{i}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        j = rng.choices(range(len(self.parts)), cum_weights=self._cum)[0]
        return j, rng.randrange(len(self.parts[j]))

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        j, k = self.source_of(i)
        return self.parts[j][k]


# --------------------------------------------------------------------------- per stage
class DataSources:
    """Builds each stage's dataset from a data spec; a file that several stages read with the same
    settings loads (and is checked) once. ``image_dir``: the default for specs without their own
    (``cocoa train --image-dir``). ``skipped()``: what each loaded source skipped."""

    def __init__(self, image_dir=None):
        self.image_dir = None if image_dir is None else str(image_dir)
        self._loaded: dict[tuple, LoadedSource] = {}

    def stage_dataset(self, data, stage: int, *, on_bad_sample: str = "error", seed: int = 0, where: str = "data"):
        specs = parse_data(data, where)
        parts = [self._part(spec, stage, on_bad_sample) for spec in specs]
        if len(parts) == 1:
            return parts[0]
        return Mixture(parts, [s.weight for s in specs], seed=seed)

    def _part(self, spec: DataSpec, stage: int, on_bad_sample: str):
        if spec.path == BUILTIN:
            from .synthetic import ShapesDataset

            return ShapesDataset(4096, task="retrieval" if stage == 3 else "caption")
        policy = spec.on_bad_sample or on_bad_sample
        key = (spec.path, spec.format, spec.columns, spec.image_dir or self.image_dir, spec.instruction, policy)
        if key not in self._loaded:
            self._loaded[key] = load_source(spec, on_bad_sample=policy, image_dir=self.image_dir)
        return self._loaded[key].for_stage(stage)

    def skipped(self) -> list[tuple[str, BadSamples]]:
        return [(source.name, source.bad) for source in self._loaded.values() if source.bad.count]
