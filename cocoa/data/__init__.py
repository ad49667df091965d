"""Training data: one ``Sample`` type; readers for the project's JSONL, MMEB-train rows and any
table through a column mapping (JSONL, parquet, a local Hugging Face ``datasets`` folder); data
specs that mix sources by weight, per stage (``DataSources``); and the built-in synthetic
image-caption sets (``ShapesDataset``; ``ObjectsDataset``, the demo's: objects on a grid,
word-level captions)."""

from .images import BadSampleError, BadSamples
from .jsonl import load_jsonl
from .objects import ObjectsDataset
from .sample import Sample
from .sources import DataSources, Mixture, load_source, parse_data
from .synthetic import ShapesDataset

__all__ = ["Sample", "load_jsonl", "ShapesDataset", "ObjectsDataset", "DataSources", "Mixture", "load_source",
           "parse_data", "BadSampleError", "BadSamples"]
