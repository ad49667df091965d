"""The built-in tiny backbone: a Qwen2-VL-shaped config and two tiny tokenizers.

Nothing is downloaded: the demo, the tests and quick experiments build random-weight models from
``tiny_config()`` and tokenize with ``char_tokenizer()`` (printable ASCII, tab and newline, one
id per character) or ``word_tokenizer(words)`` (one id per word of a closed vocabulary, for the
demo's data, where a character model could guess a caption from its visible letters). Both carry
the special tokens CoCoA needs, at the same ids: pad, eos (the bridge ``<EOS>``), mask and the
vision ones.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

SPECIAL = ["<pad>", "<unk>", "<eos>", "<mask>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Printable ASCII, then tab and newline (MMEB rows put "\n" around every instruction), appended
# after the printable ones so that those keep the ids they had before.
_CHARS = [chr(c) for c in range(32, 127)] + ["\t", "\n"]
VOCAB_SIZE = 128  # len(SPECIAL) + 97 characters, rounded up


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in _CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # every character its own piece; "." alone would leave a run of newlines as one piece (<unk>)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", mask_token="<mask>",
        additional_special_tokens=SPECIAL[4:],
    )


def tiny_config(hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, **text_overrides):
    """A Qwen2-VL config small enough to train on a CPU, with the char tokenizer's special ids."""
    ids = {tok: i for i, tok in enumerate(SPECIAL)}
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
    )
    text.update(text_overrides)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    """One id per word of ``words`` (split on whitespace), after the special tokens; an unknown
    word is ``<unk>``. Decoding joins words with single spaces.

    Vocabulary strings carry SentencePiece's word-start marker (``"▁red"``), so code that finds
    words from token strings (``cocoa.data.collators.word_spans``) sees one word per token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = list(dict.fromkeys(words))  # keep order, drop repeats
    bad = [w for w in words if not w or any(c.isspace() for c in w) or w in SPECIAL]
    if bad:
        raise ValueError(f"words: each must be a non-empty word without spaces and not a special token, got {bad}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in words:
        vocab["\u2581" + w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", mask_token="<mask>",
        additional_special_tokens=SPECIAL[4:],
    )


def word_config(tokenizer, hidden_size: int = 64, layers: int = 4, **text_overrides):
    """``tiny_config`` with the vocabulary sized for ``tokenizer`` (rounded up to a multiple of 8)
    and, by default, the demo's depth: 4 layers of width 64 (about 0.5M parameters with the
    vision tower and the pixel head)."""
    vocab = -(-len(tokenizer) // 8) * 8
    return tiny_config(hidden_size=hidden_size, layers=layers, vocab_size=vocab, **text_overrides)
