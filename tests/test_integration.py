"""attn_implementation="cocoa_triton" inside transformers models (tiny, built from configs, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM, Qwen2VLForConditionalGeneration

import cocoa
from cocoa_kernels import KeyRanges
from tiny_models import (
    EOS, IMAGE_TOKEN, VISION_END, VISION_START, image_grid, qwen2_config, qwen25vl_config, qwen2vl_config, run_as,
    same_weights,
)

IMPL = cocoa.ATTN_IMPLEMENTATION


def _padded_text_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 280, (3, 13), generator=gen)
    am = torch.ones(3, 13, dtype=torch.long)
    am[1, :4] = 0  # left padding
    am[2, 9:] = 0  # right padding
    return ids, am


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_without_key_ranges_matches_sdpa_with_padding(causal):
    sdpa, ours = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(is_causal=causal), ["sdpa", IMPL])
    ids, am = _padded_text_batch()
    with torch.no_grad():
        a = run_as(sdpa, "sdpa", input_ids=ids, attention_mask=am).logits
        b = run_as(ours, IMPL, input_ids=ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(b[valid], a[valid], rtol=1e-5, atol=1e-5)


def test_qwen25vl_with_an_image_matches_sdpa():
    from transformers import Qwen2_5_VLForConditionalGeneration

    sdpa, ours = same_weights(Qwen2_5_VLForConditionalGeneration, qwen25vl_config(), ["sdpa", IMPL])
    ids, am, mm, pixels, grid, _ = _bridge_batch()
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm)
    with torch.no_grad():
        a = run_as(sdpa, "sdpa", **inputs).logits
        b = run_as(ours, IMPL, **inputs).logits
    torch.testing.assert_close(b[am.bool()], a[am.bool()], rtol=1e-5, atol=1e-5)


def test_plain_qwen2_text_model_matches_sdpa():
    sdpa, ours = same_weights(Qwen2ForCausalLM, qwen2_config(), ["sdpa", IMPL])
    ids, am = _padded_text_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(
            run_as(ours, IMPL, input_ids=ids, attention_mask=am).logits[am.bool()],
            run_as(sdpa, "sdpa", input_ids=ids, attention_mask=am).logits[am.bool()], rtol=1e-5, atol=1e-5,
        )


def test_composite_mask_functions_become_key_ranges():
    """Masks transformers composes (here: causal AND same packed sequence) take the dense
    fallback of the mask interface and come out as the equivalent key intervals."""
    from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function

    from cocoa.integration import cocoa_mask

    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    got = cocoa_mask(batch_size=1, q_length=9, kv_length=9,
                     mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(seq)),
                     attention_mask=None, allow_is_causal_skip=True, dtype=torch.float32, use_vmap=False,
                     device="cpu")
    assert torch.equal(got.to_dense(), KeyRanges.from_segments(seq, causal=True).to_dense())


def test_set_attn_implementation_and_load_model():
    model = Qwen2ForCausalLM._from_config(qwen2_config(), attn_implementation="sdpa")
    model.set_attn_implementation(IMPL)
    assert model.config._attn_implementation == IMPL
    loaded = cocoa.load_model(qwen2vl_config())
    assert loaded.config._attn_implementation == IMPL
    assert loaded.config.text_config._attn_implementation == IMPL


def _bridge_batch():
    """Row 0: [image sample: <vs> 4 image tokens <ve> t t EOS | 5 targets] + 2 pads.
    Row 1: two text samples packed: [5 t EOS | 4 targets] [2 t EOS | 3 targets]."""
    row0 = [VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END, 10, 11, EOS] + [20, 21, 22, 23, 24] + [0, 0]
    row1 = [30, 31, 32, 33, 34, EOS, 40, 41, 42, 43, 50, 51, EOS, 60, 61, 62]
    ids = torch.tensor([row0, row1])
    seg = torch.tensor([[0] * 14 + [-1] * 2, [0] * 10 + [1] * 6])
    target = torch.zeros(2, 16, dtype=torch.bool)
    target[0, 9:14] = True
    target[1, 6:10] = True
    target[1, 13:16] = True
    am = (seg >= 0).long()
    mm = (ids == IMAGE_TOKEN).int()
    pixels, grid = image_grid(1)
    return ids, am, mm, pixels, grid, KeyRanges.eos_bridge(seg, target)


def test_key_ranges_bridge_with_image_matches_sdpa_with_the_dense_mask():
    """EOS bridge + image + padded row: logits and every parameter gradient equal the "sdpa" model
    given the equivalent dense 4-D mask, in float64 ("eager" softmaxes in float32 whatever the
    model's dtype, so it is no float64 oracle)."""
    sdpa, ours = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(), ["sdpa", IMPL], dtype=torch.float64)
    ids, am, mm, pixels, grid, mask = _bridge_batch()
    pixels = pixels.double()
    pos, _ = ours.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=am)
    dense = mask.to_dense()[:, None]
    # padding rows see nothing (ours: zero output); for sdpa they see themselves, which keeps them
    # finite (an all-masked softmax row is NaN, and NaN values reach valid rows as 0 * NaN)
    dense = dense | (~dense.any(-1, keepdim=True) & torch.eye(16, dtype=torch.bool))
    additive = torch.zeros(dense.shape, dtype=torch.float64).masked_fill(~dense, torch.finfo(torch.float64).min)
    weights = torch.randn(2, 16, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    valid = am.bool()
    common = dict(input_ids=ids, position_ids=pos, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm)

    out_s = run_as(sdpa, "sdpa", attention_mask=additive, **common).logits
    out_o = run_as(ours, IMPL, attention_mask=am, key_ranges=mask, **common).logits
    torch.testing.assert_close(out_o[valid], out_s[valid], rtol=1e-10, atol=1e-10)
    (out_s * weights)[valid].sum().backward()
    (out_o * weights)[valid].sum().backward()
    for (name, ps), po in zip(sdpa.named_parameters(), ours.parameters()):
        assert po.grad is not None, name
        torch.testing.assert_close(po.grad, ps.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_vision_tower_ignores_key_ranges():
    (model,) = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(), [IMPL])
    pixels, grid = image_grid(2, seed=3)
    with torch.no_grad():
        plain = model.get_image_features(pixels, grid).pooler_output
        bogus = KeyRanges(torch.zeros(1, 7, dtype=torch.int32), torch.ones(1, 7, dtype=torch.int32))
        with_ranges = model.get_image_features(pixels, grid, key_ranges=bogus).pooler_output
    for a, b in zip(plain, with_ranges):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_rows_give_the_same_per_sample_states_as_unpacked():
    """Two samples packed in one row (bidirectional per sample, positions restarting per sample)
    give the same EOS states as each sample alone."""
    (model,) = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(), [IMPL])
    a = [5, 6, 7, 8, EOS]
    b = [9, 10, 11, EOS]

    def eos_state(ids, segments, positions):
        mask = KeyRanges.from_segments(torch.tensor([segments]))
        pos = torch.tensor([positions]).expand(3, 1, -1)
        with torch.no_grad():
            out = model.model(input_ids=torch.tensor([ids]), position_ids=pos, key_ranges=mask)
        return out.last_hidden_state[0]

    packed = eos_state(a + b, [0] * 5 + [1] * 4, list(range(5)) + list(range(4)))
    alone_a = eos_state(a, [0] * 5, list(range(5)))
    alone_b = eos_state(b, [0] * 4, list(range(4)))
    torch.testing.assert_close(packed[4], alone_a[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[8], alone_b[3], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(), [IMPL, IMPL])
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one warns there
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, am, mm, pixels, grid, mask = _bridge_batch()
    for model in (plain, ckpt):
        model.train()
        out = model(input_ids=ids, attention_mask=am, pixel_values=pixels, image_grid_thw=grid,
                    mm_token_type_ids=mm, key_ranges=mask, use_cache=False).logits
        out[am.bool()].square().mean().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=name)


def _cache_kwarg(model, output) -> dict:
    """The KV cache of ``output`` under the forward's name for it: ``cache`` from transformers 5.2x
    on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: output.past_key_values}


def test_bad_key_ranges_and_cache_are_refused():
    (model,) = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(), [IMPL])
    ids, am = _padded_text_batch()
    wrong = KeyRanges.from_segments(torch.zeros(3, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_ranges has shape \(3, 12\) but the batch is \(B, N\) = \(3, 13\)"):
        model(input_ids=ids, attention_mask=am, key_ranges=wrong)
    with pytest.raises(TypeError, match="key_ranges must be a cocoa_kernels.KeyRanges"):
        model(input_ids=ids, attention_mask=am, key_ranges=torch.zeros(3, 13))
    first = model(input_ids=ids, attention_mask=am, use_cache=True)
    nxt = torch.ones(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="KV cache"):
        model(input_ids=nxt, attention_mask=torch.ones(3, 14, dtype=torch.long), **_cache_kwarg(model, first),
              key_ranges=KeyRanges.from_segments(torch.zeros(3, 1, dtype=torch.long)))


def test_attention_dropout_is_refused_in_training():
    (model,) = same_weights(Qwen2VLForConditionalGeneration, qwen2vl_config(attention_dropout=0.1), [IMPL])
    model.train()
    ids, am = _padded_text_batch()
    with pytest.raises(ValueError, match="attention dropout 0.1 is not supported"):
        model(input_ids=ids, attention_mask=am)
