"""The mask token stages 1 and 2 write over the tokens they hide.

Real tokenizers (Qwen2, Qwen2-VL) have none. :func:`ensure_mask_token` then adds ``<|mask|>`` as
a special token, grows the embedding (and the tied or untied output head) to cover its id unless
the checkpoint already has spare rows past the tokenizer (Qwen2-VL-2B: 151936 rows for 151657
tokens), and sets the token's row to the mean of the rows before it (deterministic, so every rank
of a distributed run gets the same row). The tokenizer is changed in place: whatever saves it with
the stage's export carries the token. A second call finds the token and changes nothing.
"""

from __future__ import annotations

import logging

import torch

from .stage_inputs import SettingError

MASK_TOKEN = "<|mask|>"

logger = logging.getLogger(__name__)


def ensure_mask_token(tokenizer, backbone, mask_token: str | None = None) -> int:
    """The id of the mask token, after making sure ``tokenizer`` and ``backbone`` have one.

    ``mask_token``: an existing token of the vocabulary to use as the mask (it becomes the
    tokenizer's ``mask_token``; nothing is added); ``None``: the tokenizer's own mask token, or
    ``<|mask|>`` added as a new special token when it has none.
    """
    if mask_token is not None:
        token_id = tokenizer.get_vocab().get(mask_token)
        if token_id is None:
            raise SettingError(f"mask_token: {mask_token!r} is not in the tokenizer's vocabulary; give an existing "
                             f"token, or leave mask_token unset to add {MASK_TOKEN!r}")
        tokenizer.mask_token = mask_token
        grow_embeddings(backbone, token_id + 1)
        return token_id
    if tokenizer.mask_token_id is not None:
        grow_embeddings(backbone, tokenizer.mask_token_id + 1)
        return tokenizer.mask_token_id
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    token_id = tokenizer.mask_token_id
    rows = _rows(backbone)
    resized = grow_embeddings(backbone, len(tokenizer))
    if not resized:  # a spare row past the tokenizer (real checkpoints pad the vocabulary): untrained
        _mean_rows(backbone, token_id, token_id + 1, mean_of=token_id)
    logger.warning(
        "the tokenizer has no mask token: added %r as a special token (id %d); %s", MASK_TOKEN, token_id,
        f"embeddings resized from {rows} to {_rows(backbone)} rows" if resized
        else f"the embedding's {rows} rows already cover it (no resize)",
    )
    return token_id


def grow_embeddings(backbone, rows: int) -> bool:
    """Resize ``backbone``'s token embeddings (and output head) to ``rows`` if it has fewer; the new
    rows take the mean of the old ones. Never shrinks (real checkpoints keep spare rows past the
    tokenizer's length). Returns whether it resized."""
    old = _rows(backbone)
    if rows <= old:
        return False
    backbone.resize_token_embeddings(rows, mean_resizing=False)
    _mean_rows(backbone, old, rows, mean_of=old)
    return True


@torch.no_grad()
def _mean_rows(backbone, start: int, stop: int, *, mean_of: int) -> None:
    """Rows ``start:stop`` of the embedding (and of an untied output head) := the mean of the
    first ``mean_of`` rows."""
    tables = [backbone.get_input_embeddings().weight]
    head = backbone.get_output_embeddings()
    if head is not None and head.weight is not tables[0]:
        tables.append(head.weight)
    for table in tables:
        table[start:stop] = table[:mean_of].float().mean(0).to(table.dtype)


def _rows(backbone) -> int:
    return backbone.get_input_embeddings().weight.shape[0]
