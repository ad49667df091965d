"""Image files named by data rows: resolve them, check them when the data loads, and a policy for bad ones.

Readers call :func:`check_image` on every image path when they read the data, so a missing or
corrupt file is reported with the data file and row (``file:line``) before any training or
embedding starts, never as a raw PIL error from inside a collator mid-run. The check is cheap:
PIL's ``verify()`` (header and, for PNG, every chunk's CRC), plus a reduced-size decode for JPEG
(``draft``: 1/8 scale), whose ``verify()`` does not read the entropy-coded data.

``on_bad_sample``: ``"error"`` (the default) raises :class:`BadSampleError` naming the row;
``"skip"`` drops the row and counts it (:class:`BadSamples`), and the caller logs the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BAD_SAMPLE_POLICIES = ("error", "skip")


class BadSampleError(ValueError):
    """A data row that cannot be used (missing or undecodable image, malformed fields); the message
    names the file and row."""


def check_policy(on_bad_sample: str) -> str:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    return on_bad_sample


def resolve_image(path: str, *, base: Path, image_dir: str | Path | None = None) -> Path:
    """A row's image path: absolute as given; else under ``image_dir`` when one is set (MMEB's
    ``--image-dir``), else relative to the data file's folder ``base`` (the project's JSONL)."""
    p = Path(path)
    if p.is_absolute():
        return p
    return (Path(image_dir) if image_dir is not None else base) / p


def check_image(path: Path, where: str) -> Path:
    """Raise :class:`BadSampleError` ("<where>: ...") unless ``path`` is a decodable image file."""
    if not path.is_file():
        raise BadSampleError(f"{where}: image file not found: {path}")
    _check_decodes(lambda: path, f"image file {path}", where)
    return path


def check_image_bytes(data: bytes, where: str) -> bytes:
    """:func:`check_image` for an encoded image held in memory (a Hugging Face image cell's ``bytes``)."""
    import io

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadSampleError(f"{where}: image bytes are empty or not bytes ({type(data).__name__})")
    _check_decodes(lambda: io.BytesIO(data), "image bytes", where)
    return data


def _check_decodes(open_source, what: str, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(open_source()) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":  # verify() reads only the headers of a JPEG: decode it at 1/8 scale
            with Image.open(open_source()) as im:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise BadSampleError(f"{where}: {what} cannot be decoded ({type(e).__name__}: {e})") from None


class CheckedImages:
    """:func:`check_image` with memory: a file several rows name (a class's image, a shared
    positive) is opened once per load; later rows get the first check's result (same message)."""

    def __init__(self):
        self._seen: dict[Path, str | None] = {}

    def __call__(self, path: Path, where: str) -> Path:
        if path not in self._seen:
            try:
                check_image(path, where)
                self._seen[path] = None
            except BadSampleError as e:
                self._seen[path] = str(e)[len(where):]  # ": <reason>", without the first row's place
        if self._seen[path] is not None:
            raise BadSampleError(where + self._seen[path])
        return path


@dataclass
class BadSamples:
    """Rows skipped under ``on_bad_sample="skip"``: how many, and the first few reasons (for the log)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, error: Exception) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def summary(self, what: str = "rows") -> str:
        if not self.count:
            return f"0 bad {what} skipped"
        return f"{self.count} bad {what} skipped (on_bad_sample='skip'), e.g. " + "; ".join(self.examples)
