"""Tiny transformers backbones built from config objects (nothing downloaded) and example batches."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers import Qwen2Config, Qwen2VLConfig

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, EOS = 290, 291, 292, 293, 294


def qwen2vl_config(**text_overrides) -> Qwen2VLConfig:
    text = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=EOS,
        pad_token_id=0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    text.update(text_overrides)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )


def qwen25vl_config(**text_overrides):
    """Qwen2.5-VL: same text stack, a vision tower with windowed and full-attention blocks."""
    from transformers import Qwen2_5_VLConfig

    base = qwen2vl_config(**text_overrides)
    return Qwen2_5_VLConfig(
        text_config=base.text_config.to_dict(),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                       bos_token_id=None, eos_token_id=EOS, pad_token_id=0)


def same_weights(model_cls, config, impls, dtype=torch.float32, seed=0):
    """One model per attention implementation, all with the same random weights. Each model gets
    its own copy of ``config``: transformers writes the implementation into the config object it
    is given, so models built from one object all run the last one's."""
    torch.manual_seed(seed)
    models = [model_cls._from_config(copy.deepcopy(config), attn_implementation=impl, dtype=dtype) for impl in impls]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    return models


def image_grid(images: int = 1, t: int = 1, h: int = 4, w: int = 4, seed: int = 0):
    """pixel_values and image_grid_thw for ``images`` images of h x w patches (h*w/4 merged tokens)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[t, h, w]] * images)
    pixels = torch.randn(images * t * h * w, 3 * 2 * 14 * 14, generator=gen)
    return pixels, grid


@contextmanager
def attention_implementations():
    """The attention implementation asked for by every attention call made while active (a list
    of names, one per call, vision towers included), read where transformers dispatches."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    used = []
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def spy(attn_implementation, default):
        used.append(attn_implementation)
        return original(attn_implementation, default)

    ALL_ATTENTION_FUNCTIONS.get_interface = spy  # on the instance, removed below
    try:
        yield used
    finally:
        del ALL_ATTENTION_FUNCTIONS.get_interface


def run_as(model, impl: str, **inputs):
    """``model(**inputs)``, asserting that every attention call it made ran ``impl`` (and that
    it made some): a comparison of two implementations then really compares two."""
    with attention_implementations() as used:
        out = model(**inputs)
    assert used and set(used) == {impl}, f"expected every attention call to run {impl!r}, got {sorted(set(used))}"
    return out
