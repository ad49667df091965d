"""A tiny checkpoint folder laid out like a downloaded Qwen2-VL (or Qwen2) one, built offline.

``write_checkpoint(folder)`` writes what ``huggingface-cli download Qwen/Qwen2-VL-2B-Instruct``
leaves on disk, only tiny: ``config.json`` + ``model.safetensors`` saved in **bf16**, a byte-level
BPE tokenizer (``tokenizer.json``, and ``tokenizer_config.json`` naming ``Qwen2Tokenizer``)
carrying Qwen2-VL's special tokens and **no mask token**, and ``preprocessor_config.json`` of a
Qwen2-VL image processor with small ``min_pixels``/``max_pixels``. Like Qwen2-VL-2B-Instruct,
the tokenizer's eos is ``<|im_end|>`` and its pad ``<|endoftext|>``; the special tokens follow the
BPE vocabulary in Qwen2's order, and the config's vision token ids point at them.

``write_text_data(path)`` writes text-only JSONL training data for the text-only folder.

Tests take the session-scoped fixtures ``real_vl_checkpoint`` / ``real_text_checkpoint``::

    from real_checkpoint import real_vl_checkpoint, real_text_checkpoint  # noqa: F401
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

# Qwen2's added tokens, in the order (and so with the relative ids) of the real tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
BPE_VOCAB = 400  # byte alphabet (256) + merges learnt from the corpus
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # 4 .. 16 merged visual tokens per image


def _corpus() -> list[str]:
    """Captions in the built-in shapes set's words, and some plain English (no drawing needed)."""
    from cocoa.data.synthetic import COLORS, COLS, NUMBERS, ROWS, SHAPES

    lines = [
        f"{n} {size} {c} {s} at the {r} {col}"
        for n, size, c, s, r, col in itertools.product(NUMBERS, ("small", "large"), COLORS, SHAPES, ROWS, COLS)
    ]
    lines += [
        "A photo of a dog running on the beach.", "Represent the given text for retrieval.",
        "What is shown in this image? Find the caption that matches the picture.",
        "The quick brown fox jumps over the lazy dog 0123456789 times!",
    ]
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer trained offline on :func:`_corpus`, with Qwen2's pre-tokenizer
    (regex split, then bytes), NFC normalizer and byte-level decoder; eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no bos, no mask token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # after the BPE vocabulary, as in Qwen2's tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def _text_config(tokenizer) -> dict:
    # Like the real 2B model: tied embeddings, no bos, eos = <|im_end|>. Unlike it, the embedding has
    # no spare rows past the tokenizer's length, so adding a mask token must resize it.
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=None,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    )


def write_checkpoint(folder, *, vision: bool = True) -> Path:
    """Write a tiny Qwen2-VL (``vision=True``) or Qwen2 (text only) checkpoint into ``folder`` the
    way real ones are saved (bf16 weights, tokenizer, image processor); returns the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    folder = Path(folder)
    tokenizer = build_tokenizer()
    text = _text_config(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    if vision:
        config = Qwen2VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
            # transformers 5 names the channel count in_channels (older configs: in_chans)
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=True,
        )
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    else:
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**text), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _name_tokenizer_class(folder / "tokenizer_config.json", "Qwen2Tokenizer")  # as the real folder says
    if vision:
        from transformers import Qwen2VLImageProcessorPil

        Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    return folder


TEXT_SAMPLE_WORDS = ["one small red circle at the top left", "two large blue squares", "a photo of a dog", "x"]


def write_text_data(path, copies: int = 2) -> Path:
    """A JSONL file of text-only samples that serve every stage of a text-only model: ``text``
    (stage 1, stage 2's block A, the stage-3 query), ``target`` (stage 2's block B) and
    ``positive`` (stage 3); ``copies`` x 4 samples. Returns the path."""
    import json

    path = Path(path)
    records = [{"text": f"{t} number {i}", "target": f"the caption of {t}", "positive": {"text": f"about {t}"}}
               for i in range(copies) for t in TEXT_SAMPLE_WORDS]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def _name_tokenizer_class(path: Path, name: str) -> None:
    import json

    config = json.loads(path.read_text())
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def real_vl_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL checkpoint folder (bf16, BPE tokenizer without mask token, image processor)."""
    return write_checkpoint(tmp_path_factory.mktemp("real_vl"), vision=True)


@pytest.fixture(scope="session")
def real_text_checkpoint(tmp_path_factory) -> Path:
    """A tiny text-only Qwen2 checkpoint folder (bf16, BPE tokenizer without mask token)."""
    return write_checkpoint(tmp_path_factory.mktemp("real_text"), vision=False)
