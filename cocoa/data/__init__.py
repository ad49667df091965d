"""Training data: one ``Sample`` type, a JSONL loader, and the built-in synthetic image-caption sets
(``ShapesDataset``; ``ObjectsDataset``, the demo's: objects on a grid, word-level captions)."""

from .jsonl import load_jsonl
from .objects import ObjectsDataset
from .sample import Sample
from .synthetic import ShapesDataset

__all__ = ["Sample", "load_jsonl", "ShapesDataset", "ObjectsDataset"]
