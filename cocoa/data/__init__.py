"""Training data: one ``Sample`` type, a JSONL loader, and a built-in synthetic image-caption set."""

from .jsonl import load_jsonl
from .sample import Sample
from .synthetic import ShapesDataset

__all__ = ["Sample", "load_jsonl", "ShapesDataset"]
