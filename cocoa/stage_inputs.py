"""What a stage reads, checked before any training step: the model folder, the data, and the
per-stage image and text limits.

Each check fails with one :class:`SettingError` (a ``ValueError``) naming the setting at fault
(``model``, ``data``, ``max_pixels``, ...), so a bad run stops before the Trainer is built rather
than mid-epoch.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

class SettingError(ValueError):
    """A setting or source a run cannot start with; the message names it. ``cocoa train`` prints
    it as one line instead of a traceback."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")


def check_model_folder(folder: str | Path, *, vision: bool) -> None:
    """A model folder must hold a config, a tokenizer and (for a vision-language model) an image
    processor, as a downloaded checkpoint does."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SettingError(f"model: {str(folder)!r} is neither 'tiny' nor a model folder (no config.json there)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SettingError(f"model: the folder {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer into it (tokenizer.save_pretrained)")
    if vision and not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        raise SettingError(f"model: the folder {str(folder)!r} holds a vision-language model but no image processor "
                         "(preprocessor_config.json); save the checkpoint's image processor into it")


def merged_patch_pixels(image_processor) -> int:
    """Pixels of one merged visual token: (patch_size * merge_size)^2, 28 * 28 for Qwen2-VL."""
    side = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)
    return side * side


def stage_encoder(encoder, *, max_pixels: int | None = None, min_pixels: int | None = None,
                  max_length: int | None = None):
    """``encoder`` itself, or a copy with the stage's limits: its image processor copied with
    ``max_pixels``/``min_pixels`` (pixels per image, after resizing) and ``max_length`` (text tokens
    per input). The tokenizer stays shared, so a mask token added for one stage serves the next."""
    if max_pixels is None and min_pixels is None and max_length is None:
        return encoder
    out = copy.copy(encoder)
    if max_length is not None:
        out.max_length = max_length
    if max_pixels is not None or min_pixels is not None:
        processor = encoder.image_processor
        if processor is None:
            setting = "max_pixels" if max_pixels is not None else "min_pixels"
            raise SettingError(f"{setting}: the model has no image processor (a text-only model); leave it unset")
        floor = merged_patch_pixels(processor)
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and value < floor:
                raise SettingError(f"{name} must be at least one merged patch ({floor} pixels, e.g. 28*28 for "
                                 f"Qwen2-VL), got {value}")
        size = dict(processor.size) if processor.size is not None else {}
        low = min_pixels if min_pixels is not None else size.get("shortest_edge")
        high = max_pixels if max_pixels is not None else size.get("longest_edge")
        if low is not None and high is not None and low > high:
            raise SettingError(f"min_pixels ({low}) must not exceed max_pixels ({high})")
        processor = copy.deepcopy(processor)
        processor.size = {"shortest_edge": low, "longest_edge": high}
        out.image_processor = processor
    return out


def check_data_fits(encoder, dataset, *, probe: int = 64) -> None:
    """A text-only model cannot take images: look at the first ``probe`` samples (and their
    positives and negatives) and fail if any has one."""
    if encoder.vision is not None and encoder.image_processor is not None:
        return
    for i, sample in enumerate(itertools.islice(_samples(dataset), probe)):
        for s in (sample, _field(sample, "positive"), *(_field(sample, "negatives") or [])):
            if _field(s, "image") is not None:
                what = "a text-only model" if encoder.vision is None else "a model without an image processor"
                raise SettingError(f"data: sample {i} has an image, but {what} cannot read it; use a "
                                 "vision-language model (e.g. Qwen2-VL) or text-only data")


def _field(sample, name):
    return sample.get(name) if isinstance(sample, dict) else getattr(sample, name, None)


def _samples(dataset):
    try:
        n = len(dataset)
    except TypeError:  # an iterable dataset
        yield from dataset
        return
    for i in range(n):
        yield dataset[i]
