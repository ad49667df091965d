"""``Embedder``: texts, images and image+text pairs -> L2-normalised EOS embeddings.

Each input becomes ``[instruction] [<vision_start> image tokens <vision_end>] [text] <EOS>``;
attention is bidirectional inside each input (the stage-3 mask), and the hidden state of the
bridge ``<EOS>`` is the embedding.

Inference packs: inputs are encoded a window at a time, sorted by length (longest first) and
packed into rows of up to ``pack_tokens`` tokens (one input longer than that gets a row of its
own), each input its own segment with its own positions under a per-input bidirectional
``KeyRanges``. No token is padding except the tail of a row, and a packed row computes exactly
what each input would alone; results come back in the caller's order.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from .data.encoding import MODEL_INPUTS, InputEncoder, pack_rows, packed_embedding_batch
from .loading import load_model

logger = logging.getLogger(__name__)

# Inputs encoded (tokenized, images processed) at a time: sorting and packing happen inside a
# window, so pixel tensors of a large input list never sit in memory all at once.
_WINDOW_BATCHES = 16


class Embedder:
    """Embeds inputs with a (Qwen2-VL-shaped or text-only) backbone.

    Args:
        model: a transformers model (e.g. from :func:`cocoa.load_model`); its base model (``.model``)
            produces the hidden states.
        tokenizer: its tokenizer; ``eos_token_id`` (default: the tokenizer's) is the bridge token.
        image_processor: a Qwen2-VL image processor; needed only for images.
        max_length: text tokens kept per input (instruction and image tokens not counted).
        instruction: the default query instruction (``encode(..., instruction=None)`` uses none;
            a stage export's ``cocoa_embedding.json`` records the one its queries trained with).
        pack_tokens: tokens per packed row at inference.

    ``encode`` items: a ``str`` is a text; a ``PIL.Image.Image`` or ``pathlib.Path`` is an image;
    a dict ``{"image": PIL image or path, "text": str, "instruction": str}`` is a pair (any key may
    be left out; a per-item ``instruction`` replaces the call's).
    """

    def __init__(self, model, tokenizer, image_processor=None, *, eos_token_id: int | None = None,
                 max_length: int = 512, instruction: str | None = None, pack_tokens: int = 4096):
        if pack_tokens < 1:
            raise ValueError(f"pack_tokens must be >= 1, got {pack_tokens}")
        self.model = model.eval()
        self.backbone = getattr(model, "model", model)
        self.encoder = InputEncoder(tokenizer, model.config, image_processor, eos_token_id=eos_token_id,
                                    max_length=max_length)
        self.instruction = instruction
        self.pack_tokens = pack_tokens

    @classmethod
    def from_pretrained(cls, path_or_config, tokenizer=None, image_processor=None, **load_kwargs) -> "Embedder":
        """Load a backbone with ``cocoa_triton`` attention; from a local path, the tokenizer and image
        processor load from the same folder; with a config they must be given (see ``cocoa.tiny``).
        A stage export's ``cocoa_embedding.json`` sets the EOS token, the text length and the query
        instruction it trained with (``Embedder.instruction``: pass it to ``encode`` for queries)."""
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
        return cls(model, tokenizer, image_processor, eos_token_id=spec["eos_token_id"],
                   max_length=spec["max_length"], instruction=spec.get("instruction"))

    @staticmethod
    def _item(item) -> tuple:
        """(image or None, text or None, instruction or None); a bare ``str`` is always a text."""
        instruction = None
        if isinstance(item, dict):
            unknown = set(item) - {"image", "text", "instruction"}
            if unknown:
                raise ValueError(f"inputs: unknown keys {sorted(unknown)} (expected 'image', 'text', 'instruction')")
            image, text, instruction = item.get("image"), item.get("text"), item.get("instruction")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"inputs: 'text' must be a str, got {type(text).__name__}")
        elif isinstance(item, str):
            image, text = None, item
        else:
            image, text = item, None
        if image is None and not text:
            raise ValueError("inputs: an item has neither image nor text")
        return image, text, instruction

    @torch.no_grad()
    def encode(self, inputs, batch_size: int = 32, show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = True, instruction: str | None = None, device=None):
        """Embed ``inputs``, sentence-transformers style.

        Args:
            inputs: a list of items, or one item (then the result is one vector, not a matrix).
            batch_size: inputs per forward pass (packed into as few rows as ``pack_tokens`` allows).
            show_progress_bar: a tqdm bar; None shows it when this module logs at INFO or DEBUG.
            convert_to_numpy: a float32 ``numpy.ndarray`` (the default); False gives a list of tensors.
            convert_to_tensor: one float32 tensor on the model's device (takes precedence).
            normalize_embeddings: L2-normalise (the trained geometry); False returns the raw EOS states.
            instruction: put before every item that has no ``instruction`` of its own (queries).
            device: move the model there first (``"cuda"``, ``"cpu"``, ...).
        Returns:
            (len(inputs), hidden) in the caller's order; (hidden,) for a single item.
        """
        single = not isinstance(inputs, (list, tuple))
        if single:
            inputs = [inputs]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if device is not None:
            self.model.to(device)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        items = [self._item(item) for item in inputs]
        prefixes = {}  # instruction -> token ids, tokenized once per call
        model_device = next(self.model.parameters()).device
        out = torch.empty(len(items), self.model.config.get_text_config().hidden_size, device=model_device)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc="embedding", unit="input")
        window = batch_size * _WINDOW_BATCHES
        for w0 in range(0, len(items), window):
            idx = list(range(w0, min(len(items), w0 + window)))
            encoded = []
            for i in idx:
                image, text, own = items[i]
                words = own if own is not None else instruction
                if words not in prefixes:
                    prefixes[words] = self.encoder.text_ids(words) if words else []
                encoded.append(self.encoder.encode(image, text, prefix=prefixes[words]))
            order = sorted(range(len(idx)), key=lambda j: -len(encoded[j].ids))  # longest first
            for b0 in range(0, len(order), batch_size):
                chunk = order[b0:b0 + batch_size]
                group = [encoded[j] for j in chunk]
                states = self._forward(group, model_device)
                out[torch.tensor([idx[j] for j in chunk], device=model_device)] = states
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if normalize_embeddings:
            out = F.normalize(out, dim=-1)
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.cpu().numpy().astype(np.float32, copy=False)
        return list(out.cpu())

    def _forward(self, encoded: list, device) -> torch.Tensor:
        """Raw EOS states (len(encoded), hidden), float32, of inputs packed into rows."""
        budget = max(self.pack_tokens, max(len(e.ids) for e in encoded))
        batch = packed_embedding_batch(self.encoder, encoded, pack_rows(encoded, budget))
        return eos_states(self.backbone, batch, device)


def eos_states(backbone, batch: dict, device) -> torch.Tensor:
    """Run the base model on a ``packed_embedding_batch``; the EOS states (inputs, hidden), float32."""
    eos_at = batch["eos_at"].to(device)
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(backbone.dtype)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return hidden[eos_at[0], eos_at[1]].float()


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
