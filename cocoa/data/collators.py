"""Collators for the three CoCoA stages: Samples -> model batches with ``key_ranges``.

Stage 1 (joint reconstruction): each input attends bidirectionally within itself; 40% of its text
tokens become ``<mask>`` (labels hold the originals), and 50% of its merged visual tokens have
their patches zeroed before the vision tower (``pixel_targets`` keep the originals).
Stage 2 (EOS-bridged reconstruction): block A = image and/or leading text + ``<EOS>``; block B =
the target text (or the rest of the text) with 70% masked; ``KeyRanges.eos_bridge``.
Stage 3 (contrastive): queries, positives and optional hard negatives, each ending in ``<EOS>``.

Labels sit at the masked token's own position; with ``shift=1`` (the default, LLM2Vec style) the
loss scores the hidden state just before it, so the first token of an input is never masked then
(nothing of the same input precedes it in a packed row).
"""

from __future__ import annotations

import torch

from cocoa_kernels import KeyRanges

from .encoding import IGNORE, InputEncoder, batch_rows, embedding_batch, pack_rows
from .sample import Sample


def _choose(gen: torch.Generator | None, candidates: list[int], rate: float) -> list[int]:
    if not candidates or rate <= 0:
        return []
    k = min(len(candidates), max(1, round(rate * len(candidates))))
    picked = torch.randperm(len(candidates), generator=gen)[:k].tolist()
    return sorted(candidates[i] for i in picked)


def _mask_token(encoder: InputEncoder, mask_token_id: int | None) -> int:
    mask_id = encoder.tokenizer.mask_token_id if mask_token_id is None else mask_token_id
    if not isinstance(mask_id, int):
        raise ValueError("mask_token_id: the tokenizer has no mask token; add one or pass mask_token_id=")
    return mask_id


class _Base:
    """``seed=None`` draws from torch's global RNG, which the Trainer seeds and restores on resume
    (so a resumed run masks exactly as the uninterrupted one); a seed gives a private generator."""

    def __init__(self, encoder: InputEncoder, *, seed: int | None = None):
        self.encoder = encoder
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)


class Stage1Collator(_Base):
    """Joint text/image reconstruction with bidirectional attention inside each input."""

    def __init__(self, encoder, *, text_mask_rate=0.4, image_mask_rate=0.5, shift=1, mask_token_id=None,
                 pack_budget=None, seed=None):
        super().__init__(encoder, seed=seed)
        self.text_rate, self.image_rate, self.shift = text_mask_rate, image_mask_rate, shift
        self.mask_id = _mask_token(encoder, mask_token_id)
        self.pack_budget = pack_budget

    def __call__(self, samples: list[Sample]) -> dict:
        enc_cfg = self.encoder.config
        encoded, labels, pix_masks, targets = [], [], [], []
        merge2 = self.encoder.merge**2
        for s in samples:
            text_ids = self.encoder.text_ids(s.text)
            enc = self.encoder.encode(s.image, text_ids=text_ids)
            image_id = getattr(enc_cfg, "image_token_id", None)
            text_start = len(enc.ids) - 1 - len(text_ids)
            text_pos = list(range(text_start, len(enc.ids) - 1))  # text tokens, EOS excluded
            if self.shift:
                text_pos = [p for p in text_pos if p > 0]
            lab = [IGNORE] * len(enc.ids)
            for p in _choose(self.gen, text_pos, self.text_rate):
                lab[p], enc.ids[p] = enc.ids[p], self.mask_id
            pix = [0] * len(enc.ids)
            sample_targets = None
            if enc.pixels is not None:
                img_pos = [p for p, t in enumerate(enc.ids) if t == image_id]
                chosen = _choose(self.gen, list(range(len(img_pos))), self.image_rate)
                groups = enc.pixels.view(len(img_pos), merge2 * enc.pixels.shape[-1])
                sample_targets = groups[chosen].clone()
                groups[chosen] = 0  # the vision tower sees blanked patches
                for j in chosen:
                    pix[img_pos[j]] = 1
            encoded.append(enc)
            labels.append(lab)
            pix_masks.append(pix)
            targets.append(sample_targets)
        rows = pack_rows(encoded, self.pack_budget)
        batch, seg, extras = batch_rows(self.encoder, encoded, rows, {"labels": labels, "pixel_mask": pix_masks})
        batch["labels"] = extras["labels"]
        batch["key_ranges"] = KeyRanges.from_segments(seg)
        batch["pixel_mask"] = extras["pixel_mask"] == 1
        order = [i for row in rows for i in row]  # the order images (and their tokens) take in the batch
        chosen = [targets[i] for i in order if targets[i] is not None]
        if chosen:
            batch["pixel_targets"] = torch.cat(chosen)
        return batch


class Stage2Collator(_Base):
    """EOS-bridged reconstruction: block B sees only itself and block A's ``<EOS>``."""

    def __init__(self, encoder, *, target_mask_rate=0.7, mask_token_id=None, pack_budget=None, seed=None):
        super().__init__(encoder, seed=seed)
        self.rate = target_mask_rate
        self.mask_id = _mask_token(encoder, mask_token_id)
        self.pack_budget = pack_budget

    def split(self, s: Sample) -> tuple[list[int], list[int]]:
        """(block-A text ids, block-B ids): the ``target`` field, or the text cut at a random token.
        An image alone can be block A: an image sample without target reconstructs its whole text."""
        ids = self.encoder.text_ids(s.text)
        if s.target is not None:
            return ids, self.encoder.text_ids(s.target)
        if s.image is not None:
            return [], ids
        if len(ids) < 2:
            return ids, []
        cut = int(torch.randint(1, len(ids), (1,), generator=self.gen))
        return ids[:cut], ids[cut:]

    def __call__(self, samples: list[Sample]) -> dict:
        encoded, labels, is_target = [], [], []
        for s in samples:
            a_ids, b_ids = self.split(s)
            enc = self.encoder.encode(s.image, text_ids=a_ids)  # block A, ending in <EOS>
            a_len = len(enc.ids)
            chosen = set(_choose(self.gen, list(range(len(b_ids))), self.rate))
            lab = [IGNORE] * a_len + [t if j in chosen else IGNORE for j, t in enumerate(b_ids)]
            enc.ids = enc.ids + [self.mask_id if j in chosen else t for j, t in enumerate(b_ids)]
            encoded.append(enc)
            labels.append(lab)
            is_target.append([0] * a_len + [1] * len(b_ids))
        rows = pack_rows(encoded, self.pack_budget)
        batch, seg, extras = batch_rows(self.encoder, encoded, rows, {"labels": labels, "is_target": is_target})
        batch["labels"] = extras["labels"]
        batch["key_ranges"] = KeyRanges.eos_bridge(seg, extras["is_target"] == 1)
        return batch


class Stage3Collator(_Base):
    """Contrastive batches: ``query``, ``positive`` and (if any sample has them) ``negative``
    sub-batches, each with ``key_ranges`` (bidirectional per input) and ``eos_index`` (B,)."""

    def __init__(self, encoder, *, instruction: str | None = None, seed=None):
        super().__init__(encoder, seed=seed)
        self.prefix = encoder.text_ids(instruction) if instruction else []

    def _group(self, items: list[Sample], prefix) -> dict:
        return embedding_batch(self.encoder, [(s.image, s.text) for s in items], prefix)

    def __call__(self, samples: list[Sample]) -> dict:
        for s in samples:
            if s.positive is None:
                raise ValueError("stage 3 needs a 'positive' for every sample")
        out = {
            "query": self._group(samples, self.prefix),
            "positive": self._group([s.positive for s in samples], []),
        }
        negatives = [n for s in samples for n in s.negatives]
        if negatives:
            out["negative"] = self._group(negatives, [])
        return out
