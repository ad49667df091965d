"""The vision tower under cocoa_triton: one attention call per block for all the images of a batch
(``one_call_vision_attention``), the same outputs and gradients as transformers' own eager tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cocoa.integration
from cocoa import load_model, one_call_vision_attention
from cocoa.embed import default_image_processor
from cocoa.tiny import tiny_config


def _pixels(sizes):
    processor = default_image_processor()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _config(kind: str):
    """A fresh config object each call (loading sets its attention implementation in place)."""
    base = tiny_config()
    if kind == "qwen2_vl":
        return base
    from transformers import Qwen2_5_VLConfig

    # Qwen2.5-VL's tower: windowed attention in block 0 (cu_window_seqlens), full in block 1.
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3, window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=base.text_config.to_dict(), vision_config=vision,
                            image_token_id=base.image_token_id, video_token_id=base.video_token_id,
                            vision_start_token_id=base.vision_start_token_id,
                            vision_end_token_id=base.vision_end_token_id)


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def towers(request):
    torch.manual_seed(0)
    ours = load_model(_config(request.param), dtype=torch.float32)
    eager = load_model(_config(request.param), attn_impl="eager", dtype=torch.float32)
    eager.load_state_dict(ours.state_dict())
    assert ours.config.vision_config._attn_implementation == "cocoa_triton"
    return ours.model.visual, eager.model.visual


def test_one_call_per_block_same_as_eager(towers, monkeypatch):
    ours, eager = towers
    calls = []
    real = cocoa.integration.attention
    monkeypatch.setattr(cocoa.integration, "attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    pixels, grid = _pixels([(56, 84), (112, 56), (28, 28), (84, 84)])
    x = pixels.clone().requires_grad_(True)
    y = pixels.clone().requires_grad_(True)
    out = ours(x, grid_thw=grid)
    ref = eager(y, grid_thw=grid)
    out = getattr(out, "pooler_output", out)
    ref = getattr(ref, "pooler_output", ref)
    blocks = len(ours.blocks)
    assert len(calls) == blocks  # one call per block, not one per image (or window) per block
    assert all(shape[2] == pixels.shape[0] for shape in calls)  # every patch in the one call
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_idempotent_and_off_for_other_implementations(towers, monkeypatch):
    ours, eager = towers
    assert one_call_vision_attention(ours) == one_call_vision_attention(ours) == len(ours.blocks)
    hooked = one_call_vision_attention(eager)  # hooked, but its config says "eager": the hook stands aside
    assert hooked == len(eager.blocks)
    pixels, grid = _pixels([(56, 84), (28, 28)])
    calls = []
    monkeypatch.setattr(cocoa.integration, "attention", lambda *a, **k: calls.append(1))
    eager(pixels, grid_thw=grid)
    assert calls == []
