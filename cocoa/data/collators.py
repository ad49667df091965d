"""Collators for the three CoCoA stages and the demo's stage 0: Samples -> batches with ``key_ranges``.

Stage 0 (causal captioning, the demo's generative starting point): ``[image] caption <EOS>``
under a causal mask, next-token labels on the caption.
Stage 1 (joint reconstruction): each input attends bidirectionally within itself; 40% of its text
tokens become ``<mask>`` (labels hold the originals), and 50% of its merged visual tokens have
their patches zeroed before the vision tower (``pixel_targets`` keep the originals).
Stage 2 (EOS-bridged reconstruction): block A = image and/or leading text + ``<EOS>``; block B =
the target text (or the rest of the text) with 70% of its words masked (every sub-token of a chosen
word; see ``word_spans`` for the word rule); ``KeyRanges.eos_bridge``.
Stage 3 (contrastive): queries, positives and optional hard negatives, each ending in ``<EOS>``.

Labels sit at the masked token's own position; with ``shift=1`` (stage 1's default, LLM2Vec style)
the loss scores the hidden state just before it, so the first token of an input is never masked
then (nothing of the same input precedes it in a packed row). Stage 2 scores in place (``shift=0``,
its default) so that no loss lands on the pooled ``<EOS>``.
"""

from __future__ import annotations

import torch

from cocoa_kernels import KeyRanges
from cocoa_kernels.mask import EOS_SEES

from .encoding import IGNORE, InputEncoder, batch_rows, encoded_embedding_batch, pack_rows
from .sample import Sample


def _choose(gen: torch.Generator | None, candidates: list[int], rate: float) -> list[int]:
    if not candidates or rate <= 0:
        return []
    k = min(len(candidates), max(1, round(rate * len(candidates))))
    picked = torch.randperm(len(candidates), generator=gen)[:k].tolist()
    return sorted(candidates[i] for i in picked)


# Byte-level BPE (GPT-2, Qwen2) spells the whitespace bytes as letters: space "Ġ", tab "ĉ",
# newline "Ċ", ... (byte b <= 32 becomes chr(256 + b)); SentencePiece spells a space "▁".
_SPACE_MARKERS = frozenset(chr(256 + b) for b in b"\t\n\x0b\x0c\r ") | {"\u2581"}


def _is_space(ch: str) -> bool:
    return ch.isspace() or ch in _SPACE_MARKERS


def word_spans(tokenizer, ids: list[int]) -> list[list[int]]:
    """The words of a token sequence: for each word, the positions (into ``ids``) of its tokens.

    Words are whitespace-delimited, read from each token's vocabulary string
    (``convert_ids_to_tokens``): a token whose string begins with whitespace or a space marker
    (byte-level BPE's ``Ġ``/``Ċ``/``ĉ``, SentencePiece's ``▁``) starts a new word, as does the
    first token and the first token after a separator; any other token continues the current
    word (punctuation and digits glued to a word belong to it). A token that is only whitespace
    (the built-in character tokenizer's ``" "``, a lone ``Ġ`` or ``ĊĊ``) is a separator: it
    belongs to no word, so it is never masked in word mode. For a byte-level BPE the space that
    leads a word sits inside the word's first token and is masked with it.
    """
    words: list[list[int]] = []
    current: list[int] | None = None
    for j, tok in enumerate(tokenizer.convert_ids_to_tokens(list(ids))):
        tok = tok or ""
        if tok and all(_is_space(c) for c in tok):
            current = None
            continue
        if current is None or (tok and _is_space(tok[0])):
            current = []
            words.append(current)
        current.append(j)
    return words


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
    """EOS-bridged reconstruction: block B sees only itself and block A's ``<EOS>``; the ``<EOS>``
    row sees block A (``eos_sees="block_a"``) or the whole sample (``"all"``, the authors' mask).

    ``target_mask_unit="word"`` (the default) masks ``round(target_mask_rate * words)`` of block
    B's words, every sub-token of a chosen word together, so a word is never half visible; words
    follow :func:`word_spans` (whitespace-delimited; with the built-in character tokenizer a word
    is a run of non-space characters and the space tokens between words are never masked).
    ``"token"`` masks ``round(target_mask_rate * tokens)`` of B's tokens, spaces included.
    Labels hold the originals at the masked tokens' own positions (stage 2 scores them in place by
    default, ``shift=0``).
    """

    def __init__(self, encoder, *, target_mask_rate=0.7, target_mask_unit="word", mask_token_id=None,
                 pack_budget=None, seed=None, eos_sees="block_a"):
        super().__init__(encoder, seed=seed)
        if target_mask_unit not in ("word", "token"):
            raise ValueError(f"target_mask_unit must be 'word' or 'token', got {target_mask_unit!r}")
        if eos_sees not in EOS_SEES:
            raise ValueError(f"eos_sees must be one of {EOS_SEES}, got {eos_sees!r}")
        self.rate, self.unit, self.eos_sees = target_mask_rate, target_mask_unit, eos_sees
        self.mask_id = _mask_token(encoder, mask_token_id)
        self.pack_budget = pack_budget

    def masked_positions(self, b_ids: list[int]) -> set[int]:
        """Positions (into ``b_ids``) to mask: whole words, or single tokens in token mode."""
        if self.unit == "token":
            return set(_choose(self.gen, list(range(len(b_ids))), self.rate))
        words = word_spans(self.encoder.tokenizer, b_ids)
        return {j for w in _choose(self.gen, list(range(len(words))), self.rate) for j in words[w]}

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
            chosen = self.masked_positions(b_ids)
            lab = [IGNORE] * a_len + [t if j in chosen else IGNORE for j, t in enumerate(b_ids)]
            enc.ids = enc.ids + [self.mask_id if j in chosen else t for j, t in enumerate(b_ids)]
            encoded.append(enc)
            labels.append(lab)
            is_target.append([0] * a_len + [1] * len(b_ids))
        rows = pack_rows(encoded, self.pack_budget)
        batch, seg, extras = batch_rows(self.encoder, encoded, rows, {"labels": labels, "is_target": is_target})
        batch["labels"] = extras["labels"]
        batch["key_ranges"] = KeyRanges.eos_bridge(seg, extras["is_target"] == 1, eos_sees=self.eos_sees)
        return batch


class Stage3Collator(_Base):
    """Contrastive batches: ``query``, ``positive`` and (if any sample has them) ``negative``
    sub-batches, each with ``key_ranges`` (bidirectional per input) and ``eos_index`` (B,).

    An input is ``[instruction][image][text]<EOS>``: a sample's own ``instruction`` when it has one
    (an empty string: none), else, for queries, the stage's ``instruction``; positives and negatives
    get none unless they carry their own."""

    def __init__(self, encoder, *, instruction: str | None = None, seed=None):
        super().__init__(encoder, seed=seed)
        self.instruction = instruction
        self._prefixes: dict[str, list[int]] = {}  # instruction -> ids, tokenized once

    def _prefix(self, instruction: str | None) -> list[int]:
        if not instruction:
            return []
        if instruction not in self._prefixes:
            self._prefixes[instruction] = self.encoder.text_ids(instruction)
        return self._prefixes[instruction]

    def _group(self, items: list[Sample], default: str | None) -> dict:
        encoded = [self.encoder.encode(s.image, s.text, prefix=self._prefix(
            s.instruction if s.instruction is not None else default)) for s in items]
        return encoded_embedding_batch(self.encoder, encoded)

    def __call__(self, samples: list[Sample]) -> dict:
        for s in samples:
            if s.positive is None:
                raise ValueError("stage 3 needs a 'positive' for every sample")
        out = {
            "query": self._group(samples, self.instruction),
            "positive": self._group([s.positive for s in samples], None),
        }
        negatives = [n for s in samples for n in s.negatives]
        if negatives:
            out["negative"] = self._group(negatives, None)
        return out


class Stage0Collator(_Base):
    """Causal captioning (the demo's "stage 0": it makes the tiny model a captioner, the generative
    starting point the method converts): ``[image] caption <EOS>`` under a causal mask, with
    labels on the caption tokens only, at their own positions (the loss's ``shift=1`` scores each
    from the state before it: the first caption token from the image block's last token)."""

    def __init__(self, encoder, *, pack_budget=None, seed=None):
        super().__init__(encoder, seed=seed)
        self.pack_budget = pack_budget

    def __call__(self, samples: list[Sample]) -> dict:
        encoded, labels = [], []
        for s in samples:
            if not s.text:
                raise ValueError("stage 0 needs a caption ('text') for every sample")
            text_ids = self.encoder.text_ids(s.text)
            enc = self.encoder.encode(s.image, text_ids=text_ids)
            start = len(enc.ids) - 1 - len(text_ids)  # the caption sits just before the EOS
            lab = [IGNORE] * len(enc.ids)
            lab[start:start + len(text_ids)] = text_ids
            encoded.append(enc)
            labels.append(lab)
        rows = pack_rows(encoded, self.pack_budget)
        batch, seg, extras = batch_rows(self.encoder, encoded, rows, {"labels": labels})
        batch["labels"] = extras["labels"]
        batch["key_ranges"] = KeyRanges.from_segments(seg, causal=True)
        return batch
