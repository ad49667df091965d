"""Samples -> token ids, image patches and positions; rows -> padded model batches.

One input is ``[prefix] [<vision_start> image tokens <vision_end>] [text] <EOS>``. Several inputs
may share a row (packing): each keeps its own segment id and its own positions (restarting at 0),
so a packed row computes exactly what the inputs would alone under a per-segment mask.

Positions take the shape the backbone's rotary embedding expects: three M-RoPE rows (3, B, N)
for a vision-language model (a config with a ``vision_config``, e.g. Qwen2-VL), plain (B, N)
for a text-only one (e.g. Qwen2), whose rotary embedding rejects the three rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
# What a backbone's forward takes from a batch; collators may add other keys (labels, layout).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "key_ranges")


@dataclass
class Encoded:
    """One input: ``ids`` (image tokens expanded), its image's patches (or None)."""

    ids: list[int]
    pixels: torch.Tensor | None = None  # (patches, patch_dim)
    grid: torch.Tensor | None = None  # (3,) = (t, h, w) in patches


class InputEncoder:
    """Tokenizes text and processes images for a Qwen2-VL-shaped (or text-only) backbone."""

    def __init__(self, tokenizer, config, image_processor=None, *, eos_token_id: int | None = None,
                 max_length: int = 512):
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = image_processor
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if not isinstance(self.eos_token_id, int):
            raise ValueError("eos_token_id: the tokenizer has no eos token; pass eos_token_id=")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.max_length = max_length
        self.vision = getattr(config, "vision_config", None)
        self.merge = self.vision.spatial_merge_size if self.vision is not None else 1
        # M-RoPE (three position rows) goes with the vision tower: Qwen2-VL's language model
        # takes them, a text-only Qwen2's rotary embedding wants one row per batch row.
        self.mrope = self.vision is not None

    def text_ids(self, text: str | None) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_length]

    def image(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """A PIL image or path -> (patches (P, patch_dim), grid (3,))."""
        if self.vision is None or self.image_processor is None:
            raise ValueError("an image was given but the backbone has no vision tower or no image processor is set")
        out = self.image_processor(images=[load_image(image)], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def image_block(self, grid: torch.Tensor) -> list[int]:
        n = int(grid.prod()) // self.merge**2
        cfg = self.config
        return [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]

    def encode(self, image=None, text=None, prefix: list[int] | None = None, eos: bool = True,
               text_ids: list[int] | None = None) -> Encoded:
        """``[prefix] [image block] [text] [<EOS>]``; ``text_ids`` stands in for an already tokenized text."""
        ids = list(prefix or [])
        pixels = grid = None
        if image is not None:
            pixels, grid = self.image(image)
            ids += self.image_block(grid)
        ids += self.text_ids(text) if text_ids is None else list(text_ids)
        if eos:
            ids.append(self.eos_token_id)
        return Encoded(ids, pixels, grid)

    def positions(self, enc: Encoded) -> torch.Tensor:
        """Positions of one input, starting at 0. Text-only backbone: ``(len(ids),)``, 0, 1, 2, ...
        Vision-language backbone: ``(3, len(ids))`` M-RoPE positions, as Qwen2-VL's get_rope_index
        gives them: text advances all three axes by 1; an image's tokens take (t, row, col) offsets
        from the current position, which then moves past the image by max(rows, cols)."""
        L = len(enc.ids)
        if not self.mrope:
            return torch.arange(L)
        out = torch.empty(3, L, dtype=torch.long)
        image_id = self.config.image_token_id
        cur, i = 0, 0
        while i < L:
            if enc.ids[i] == image_id:
                t, h, w = (int(x) for x in enc.grid)
                gh, gw = h // self.merge, w // self.merge
                n = t * gh * gw
                out[0, i:i + n] = torch.arange(t).repeat_interleave(gh * gw) + cur
                out[1, i:i + n] = torch.arange(gh).repeat_interleave(gw).repeat(t) + cur
                out[2, i:i + n] = torch.arange(gw).repeat(t * gh) + cur
                cur += max(gh, gw)
                i += n
            else:
                j = i
                while j < L and enc.ids[j] != image_id:
                    j += 1
                out[:, i:j] = torch.arange(cur, cur + j - i)
                cur += j - i
                i = j
        return out


def pack_rows(encoded: list[Encoded], budget: int | None) -> list[list[int]]:
    """Greedy first-fit packing of inputs (indices into ``encoded``) into rows of at most ``budget``
    tokens; ``budget=None`` gives one input per row."""
    if budget is None:
        return [[i] for i in range(len(encoded))]
    rows, sizes = [], []
    for i, enc in enumerate(encoded):
        n = len(enc.ids)
        for r, used in enumerate(sizes):
            if used + n <= budget:
                rows[r].append(i)
                sizes[r] += n
                break
        else:
            rows.append([i])
            sizes.append(n)
    return rows


def batch_rows(encoder: InputEncoder, encoded: list[Encoded], rows: list[list[int]], extras: dict | None = None):
    """Pad rows of inputs into model tensors.

    Returns the model inputs (``input_ids``, ``attention_mask``, ``position_ids`` (3, B, N) for
    M-RoPE or (B, N) for a text-only backbone, each input's restarting at 0,
    ``pixel_values``/``image_grid_thw`` in row order, ``image_rows``) and the layout:
    ``segment_ids`` (B, N) with -1 on padding. ``extras`` maps a name to per-input lists
    aligned with ``ids`` (e.g. labels), padded with IGNORE, returned as (B, N) tensors.
    """
    extras = extras or {}
    N = max(sum(len(encoded[i].ids) for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, N), encoder.pad_token_id, dtype=torch.long)
    segment_ids = torch.full((B, N), -1, dtype=torch.long)
    positions = torch.zeros((3, B, N) if encoder.mrope else (B, N), dtype=torch.long)
    out_extras = {k: torch.full((B, N), IGNORE, dtype=torch.long) for k in extras}
    pixels, grids, image_rows = [], [], []
    for b, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            enc = encoded[i]
            L = len(enc.ids)
            input_ids[b, at:at + L] = torch.tensor(enc.ids)
            segment_ids[b, at:at + L] = seg
            positions[..., b, at:at + L] = encoder.positions(enc)  # the row axis is second to last
            for k, values in extras.items():
                out_extras[k][b, at:at + L] = torch.tensor(values[i])
            if enc.pixels is not None:
                pixels.append(enc.pixels)
                grids.append(enc.grid)
                image_rows.append(b)
            at += L
    batch = {"input_ids": input_ids, "attention_mask": (segment_ids >= 0).long(), "position_ids": positions}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.stack(grids)
        batch["image_rows"] = torch.tensor(image_rows)  # the row each image's tokens sit in
    return batch, segment_ids, out_extras


def embedding_batch(encoder: InputEncoder, items: list[tuple], prefix: list[int] | None = None) -> dict:
    """Inputs to embed, one per row: ``items`` are (image or None, text or None) pairs, each after
    ``prefix``. See :func:`encoded_embedding_batch`."""
    return encoded_embedding_batch(encoder, [encoder.encode(image, text, prefix=prefix) for image, text in items])


def encoded_embedding_batch(encoder: InputEncoder, encoded: list[Encoded]) -> dict:
    """Encoded inputs to embed, one per row (the stage-3 batches): the model inputs, ``key_ranges``
    (bidirectional inside each input: the stage-3 and inference mask) and ``eos_index`` (B,), where
    each row's bridge ``<EOS>`` sits."""
    batch = packed_embedding_batch(encoder, encoded, [[i] for i in range(len(encoded))])
    batch["eos_index"] = batch.pop("eos_at")[1]  # one input a row: its EOS column
    return batch


def packed_embedding_batch(encoder: InputEncoder, encoded: list[Encoded], rows: list[list[int]]) -> dict:
    """Inputs to embed, several per row (``rows`` from :func:`pack_rows`): the model inputs, ``key_ranges``
    (bidirectional inside each input) and ``eos_at`` (2, len(encoded)): the (row, column) of each
    input's ``<EOS>``, in ``encoded`` order. A packed row computes what each input would alone."""
    from cocoa_kernels import KeyRanges

    batch, seg, _ = batch_rows(encoder, encoded, rows)
    batch["key_ranges"] = KeyRanges.from_segments(seg)
    eos_at = torch.empty(2, len(encoded), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            at += len(encoded[i].ids)
            eos_at[0, i], eos_at[1, i] = b, at - 1  # the EOS closes the input
    batch["eos_at"] = eos_at
    return batch


def load_image(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"an image must be a PIL image or a path, got {type(image).__name__}")
