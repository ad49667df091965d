"""``Embedder``: texts, images and image+text pairs -> L2-normalised EOS embeddings.

Each input becomes ``[instruction] [<vision_start> image tokens <vision_end>] [text] <EOS>``;
attention is bidirectional inside each input (``KeyRanges.from_segments``, the stage-3 mask),
and the hidden state of the bridge ``<EOS>`` is the embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cocoa_kernels import KeyRanges

from .loading import load_model


@dataclass
class _Sample:
    ids: list[int]
    image: object | None  # PIL image


class Embedder:
    """Embeds inputs with a (Qwen2-VL-shaped or text-only) backbone.

    Args:
        model: a transformers model (e.g. from :func:`cocoa.load_model`); its base model (``.model``)
            produces the hidden states.
        tokenizer: its tokenizer; ``eos_token_id`` (default: the tokenizer's) is the bridge token.
        image_processor: a Qwen2-VL image processor; needed only for images.
        max_length: text tokens kept per input (instruction and image tokens not counted).

    ``encode`` items: a ``str`` is a text; a ``PIL.Image.Image`` or ``pathlib.Path`` is an image;
    a dict ``{"image": PIL image or path, "text": str}`` is a pair (either key may be left out).
    """

    def __init__(self, model, tokenizer, image_processor=None, *, eos_token_id: int | None = None, max_length: int = 512):
        self.model = model.eval()
        self.backbone = getattr(model, "model", model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if not isinstance(self.eos_token_id, int):
            raise ValueError("eos_token_id: the tokenizer has no eos token; pass eos_token_id=")
        self.max_length = max_length
        cfg = model.config
        self.vision = getattr(cfg, "vision_config", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    @classmethod
    def from_pretrained(cls, path_or_config, tokenizer=None, image_processor=None, **load_kwargs) -> "Embedder":
        """Load a backbone with ``cocoa_triton`` attention; from a local path, the tokenizer and image
        processor load from the same folder; with a config they must be given (see ``cocoa.tiny``)."""
        model = load_model(path_or_config, **load_kwargs)
        is_path = isinstance(path_or_config, (str, os.PathLike))
        if tokenizer is None:
            if not is_path:
                raise ValueError("tokenizer: required when the backbone is built from a config")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path_or_config)
        if image_processor is None and getattr(model.config, "vision_config", None) is not None:
            if is_path:
                from transformers import AutoImageProcessor

                image_processor = AutoImageProcessor.from_pretrained(path_or_config)
            else:
                image_processor = default_image_processor()
        return cls(model, tokenizer, image_processor)

    # ------------------------------------------------------------------ inputs
    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _sample(self, item, prefix: list[int]) -> _Sample:
        if isinstance(item, dict):
            unknown = set(item) - {"image", "text"}
            if unknown:
                raise ValueError(f"inputs: unknown keys {sorted(unknown)} (expected 'image' and/or 'text')")
            image, text = item.get("image"), item.get("text")
        elif isinstance(item, str):
            image, text = None, item
        else:
            image, text = item, None
        if image is None and text is None:
            raise ValueError("inputs: an item has neither image nor text")
        ids = list(prefix)
        pil = None
        if image is not None:
            pil = _load_image(image)
            if self.vision is None or self.image_processor is None:
                raise ValueError("inputs: an image was given but the backbone or Embedder has no image processor")
            cfg = self.model.config
            ids.append(cfg.vision_start_token_id)
            ids.append(-1)  # placeholder: expanded to the image's token count in _batch
            ids.append(cfg.vision_end_token_id)
        if text:
            ids += self._text_ids(text)[: self.max_length]
        ids.append(self.eos_token_id)
        return _Sample(ids, pil)

    def _batch(self, samples: list[_Sample], device):
        pixels, grids = None, None
        images = [s.image for s in samples if s.image is not None]
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            pixels, grids = processed["pixel_values"], processed["image_grid_thw"]
            merge = self.vision.spatial_merge_size
            counts = iter((grids.prod(-1) // merge**2).tolist())
            image_id = self.model.config.image_token_id
        rows = []
        for s in samples:
            row = []
            for t in s.ids:
                row += [image_id] * next(counts) if t == -1 else [t]
            rows.append(row)
        N = max(len(r) for r in rows)
        ids = torch.full((len(rows), N), self.pad_id, dtype=torch.long)
        seg = torch.full((len(rows), N), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            seg[i, : len(r)] = 0
        batch = {
            "input_ids": ids.to(device),
            "attention_mask": (seg >= 0).long().to(device),
            "key_ranges": KeyRanges.from_segments(seg).to(device),
        }
        if images:
            batch["pixel_values"] = pixels.to(device, self.model.dtype)
            batch["image_grid_thw"] = grids.to(device)
            batch["mm_token_type_ids"] = (ids == self.model.config.image_token_id).int().to(device)
        eos_pos = torch.tensor([len(r) - 1 for r in rows], device=device)
        return batch, eos_pos

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, inputs, *, instruction: str | None = None, batch_size: int = 32, show_progress: bool = False):
        """Embed ``inputs`` (a list, or one item); returns float32 (len(inputs), hidden), unit rows."""
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prefix = self._text_ids(instruction) if instruction else []
        device = next(self.model.parameters()).device
        chunks = range(0, len(inputs), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="embedding", unit="batch")
        out = []
        for start in chunks:
            samples = [self._sample(item, prefix) for item in inputs[start : start + batch_size]]
            batch, eos_pos = self._batch(samples, device)
            hidden = self.backbone(**batch, use_cache=False).last_hidden_state
            eos = hidden[torch.arange(len(samples), device=device), eos_pos]
            out.append(F.normalize(eos.float(), dim=-1).cpu())
        if not out:
            return torch.empty(0, self.model.config.get_text_config().hidden_size)
        return torch.cat(out)


def default_image_processor(max_pixels: int = 448 * 448):
    """Qwen2-VL's image processor with its defaults (no download), capped at ``max_pixels``."""
    try:
        from transformers import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as Processor
    return Processor(max_pixels=max_pixels)


def _load_image(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"inputs: image file not found: {image}")
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"inputs: an image must be a PIL image or a path, got {type(image).__name__}")
