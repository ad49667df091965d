"""``Embedder``: texts, images and image+text pairs -> L2-normalised EOS embeddings.

Each input becomes ``[instruction] [<vision_start> image tokens <vision_end>] [text] <EOS>``;
attention is bidirectional inside each input (the stage-3 mask), and the hidden state of the
bridge ``<EOS>`` is the embedding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .data.encoding import MODEL_INPUTS, InputEncoder, embedding_batch
from .loading import load_model


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
        self.encoder = InputEncoder(tokenizer, model.config, image_processor, eos_token_id=eos_token_id,
                                    max_length=max_length)

    @classmethod
    def from_pretrained(cls, path_or_config, tokenizer=None, image_processor=None, **load_kwargs) -> "Embedder":
        """Load a backbone with ``cocoa_triton`` attention; from a local path, the tokenizer and image
        processor load from the same folder; with a config they must be given (see ``cocoa.tiny``).
        A stage export's ``cocoa_embedding.json`` sets the EOS token and the text length."""
        model = load_model(path_or_config, **load_kwargs)
        is_path = isinstance(path_or_config, (str, os.PathLike))
        if tokenizer is None:
            if not is_path:
                raise ValueError("tokenizer: required when the backbone is built from a config")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path_or_config)
        if image_processor is None and getattr(model.config, "vision_config", None) is not None:
            if is_path:
                image_processor = load_image_processor(path_or_config)
            else:
                image_processor = default_image_processor()
        from .export import read_embedding_spec

        spec = read_embedding_spec(path_or_config) if is_path else None
        if spec is None:
            return cls(model, tokenizer, image_processor)
        return cls(model, tokenizer, image_processor, eos_token_id=spec["eos_token_id"], max_length=spec["max_length"])

    @staticmethod
    def _item(item) -> tuple:
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
        return image, text

    @torch.no_grad()
    def encode(self, inputs, *, instruction: str | None = None, batch_size: int = 32, show_progress: bool = False):
        """Embed ``inputs`` (a list, or one item); returns float32 (len(inputs), hidden), unit rows, on CPU."""
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = [self._item(item) for item in inputs]
        prefix = self.encoder.text_ids(instruction) if instruction else []
        device = next(self.model.parameters()).device
        chunks = range(0, len(items), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="embedding", unit="batch")
        out = []
        for start in chunks:
            batch = embedding_batch(self.encoder, items[start : start + batch_size], prefix)
            out.append(pool_eos(self.backbone, batch, device).cpu())
        if not out:
            return torch.empty(0, self.model.config.get_text_config().hidden_size)
        return torch.cat(out)


def pool_eos(backbone, batch: dict, device) -> torch.Tensor:
    """Run the base model on an ``embedding_batch`` and return the L2-normalised EOS states (float32)."""
    eos_index = batch["eos_index"].to(device)
    batch = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(backbone.dtype)
    hidden = backbone(**batch, use_cache=False).last_hidden_state
    eos = hidden[torch.arange(hidden.shape[0], device=device), eos_index]
    return F.normalize(eos.float(), dim=-1)


def load_image_processor(path):
    """The image processor saved in ``path``; without torchvision, the PIL-based Qwen2-VL one."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError:  # the default backend wants torchvision
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path)


def default_image_processor(max_pixels: int = 448 * 448):
    """Qwen2-VL's image processor with its defaults (no download), capped at ``max_pixels``."""
    try:
        from transformers import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as Processor
    return Processor(max_pixels=max_pixels)
