"""A stage's export, ``DIR/final/backbone``: a folder plain transformers reads as CoCoA embeds.

``complete_export`` finishes the ``backbone/`` folder that ``CocoaModel.save`` wrote with
``save_pretrained`` (the weights) by adding what a user needs to embed without cocoa:

- the run's tokenizer (with the mask token the run may have added) and image processor;
- ``config.json`` with ``is_causal=False`` on the text config (stages 1-3): transformers 5 reads it
  (``merge_with_config_defaults``) and builds a bidirectional mask, and passes
  ``is_causal=False`` to every decoder attention call, so ``attn_implementation="sdpa"`` computes
  the hidden states cocoa's per-input bidirectional mask gives one unpadded input. Stage 0 (the
  causal captioner) keeps its causal config;
- ``cocoa_embedding.json`` (stages 1-3): how to build an input and pool it (see
  :func:`embedding_spec`).

The live model's config is never changed: the next stage of a pipeline trains the same object.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

EMBEDDING_FILE = "cocoa_embedding.json"


def embedding_spec(encoder, *, instruction: str | None = None) -> dict:
    """What ``cocoa_embedding.json`` holds: the recipe ``Embedder`` follows, as data.

    An input is ``[instruction tokens] [<vision_start> image tokens <vision_end>] [text tokens]
    <EOS>`` (each part tokenized on its own, without special tokens; text cut to ``max_length``
    tokens); its embedding is the last layer's (after the final norm) hidden state at that one
    appended ``<EOS>``, L2-normalised. ``instruction`` is the one the stage trained queries with.
    """
    tokenizer = encoder.tokenizer
    spec = {
        "format": "cocoa-embedding/1",
        "eos_token_id": int(encoder.eos_token_id),
        "eos_token": tokenizer.convert_ids_to_tokens(int(encoder.eos_token_id)),
        "pooling": "eos",  # the hidden state at the appended EOS, i.e. the input's last token
        "layer": -1,  # last layer, after the final norm (the base model's last_hidden_state)
        "normalize": True,  # L2
        "attention": "bidirectional",  # inside each input; the config says is_causal=False
        "add_special_tokens": False,
        "max_length": int(encoder.max_length),  # text tokens kept (instruction and image not counted)
        "input_template": "{instruction}{image}{text}{eos}",
        "instruction": instruction,  # queries only; documents and positives get none
    }
    if encoder.vision is not None:
        cfg = encoder.config
        spec["image"] = {  # {image} = start, n x image token, end; n from the image processor's grid
            "vision_start_token_id": int(cfg.vision_start_token_id),
            "image_token_id": int(cfg.image_token_id),
            "vision_end_token_id": int(cfg.vision_end_token_id),
            "image_tokens": "prod(image_grid_thw) // spatial_merge_size**2",
            "spatial_merge_size": int(encoder.merge),
        }
    return spec


def export_config(config, *, bidirectional: bool):
    """A copy of ``config`` whose text config says ``is_causal`` = not ``bidirectional``."""
    config = copy.deepcopy(config)
    config.get_text_config().is_causal = not bidirectional
    return config


def complete_export(backbone_dir, config, encoder, *, stage: int, instruction: str | None = None) -> Path:
    """Add the tokenizer, image processor, attention flag and (stages 1-3) the pooling recipe to
    a ``save_pretrained`` folder. ``config`` is the trained backbone's (not modified);
    ``encoder`` the run's ``InputEncoder``. Returns the folder."""
    backbone_dir = Path(backbone_dir)
    if not (backbone_dir / "config.json").is_file():
        raise ValueError(f"backbone_dir: {backbone_dir} holds no save_pretrained export (no config.json)")
    bidirectional = stage != 0
    export_config(config, bidirectional=bidirectional).save_pretrained(backbone_dir)
    encoder.tokenizer.save_pretrained(backbone_dir)
    if encoder.image_processor is not None:
        encoder.image_processor.save_pretrained(backbone_dir)
    spec_path = backbone_dir / EMBEDDING_FILE
    if bidirectional:
        spec_path.write_text(json.dumps(embedding_spec(encoder, instruction=instruction), indent=2) + "\n")
    elif spec_path.exists():  # a causal captioner is not an embedding model
        spec_path.unlink()
    return backbone_dir


def read_embedding_spec(folder) -> dict | None:
    """The ``cocoa_embedding.json`` of an exported folder, or None when it has none."""
    path = Path(folder) / EMBEDDING_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
