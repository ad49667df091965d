"""Masks a user may hand a "cocoa_triton" model that have no key-interval form: refused with an
error naming what was given, never converted approximately; padding inside a row computed exactly
only when asked (``cocoa_dense_fallback=True``)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Qwen2ForCausalLM

import cocoa
from tiny_models import qwen2_config, run_as, same_weights

IMPL = cocoa.ATTN_IMPLEMENTATION
N = 11


def _models(causal=True):
    config = qwen2_config()
    config.is_causal = causal
    return same_weights(Qwen2ForCausalLM, config, ["sdpa", IMPL])


def _ids(batch=2):
    return torch.randint(1, 280, (batch, N), generator=torch.Generator().manual_seed(0))


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _causal_allowed(batch=2) -> torch.Tensor:
    return torch.ones(N, N, dtype=torch.bool).tril().expand(batch, 1, N, N).clone()


def test_an_additive_bias_is_refused_naming_it():
    """An ALiBi-like bias (finite, non-zero values) was read as 'mask == 0', dropping every biased key."""
    _, ours = _models()
    bias = _additive(_causal_allowed())
    bias = bias + torch.where(bias == 0, -0.5 * torch.arange(N).float(), 0.0)  # a finite penalty per key
    with pytest.raises(ValueError, match=r"additive mask with values other than 0 and -inf \(a bias.*holds -0\.5"):
        ours(input_ids=_ids(), attention_mask=bias)


def test_a_per_head_mask_is_refused_naming_its_shape():
    """A (B, H, N, N) mask kept only head 0."""
    _, ours = _models()
    per_head = _causal_allowed().expand(2, 4, N, N).clone()
    per_head[:, 1:, :, 0] = False
    with pytest.raises(ValueError, match=r"per-head mask of shape \(2, 4, 11, 11\)"):
        ours(input_ids=_ids(), attention_mask=per_head)


@pytest.mark.parametrize("form", ["bool", "additive -inf", "additive finfo.min"])
def test_exact_4d_masks_match_sdpa(form):
    sdpa, ours = _models()
    allowed = _causal_allowed()
    allowed[1, 0, :, :3] = False  # row 1: left padding
    allowed[1, 0, :3, :3] = torch.eye(3, dtype=torch.bool)  # (its padded queries see themselves, finite for sdpa)
    allowed[1, 0, :3, 3:] = False
    ours_mask = allowed.clone()
    ours_mask[1, 0, :3] = False  # ours: padded queries see nothing
    if form == "bool":
        a, b = allowed, ours_mask
    elif form == "additive -inf":
        a, b = _additive(allowed), _additive(ours_mask)
    else:
        low = torch.finfo(torch.float32).min
        a = torch.zeros(allowed.shape).masked_fill(~allowed, low)
        b = torch.zeros(ours_mask.shape).masked_fill(~ours_mask, low)
    with torch.no_grad():
        want = run_as(sdpa, "sdpa", input_ids=_ids(), attention_mask=a).logits
        got = run_as(ours, IMPL, input_ids=_ids(), attention_mask=b).logits
    torch.testing.assert_close(got[:, 3:], want[:, 3:], rtol=1e-5, atol=1e-5)


def _mid_row_padding():
    am = torch.ones(2, N, dtype=torch.long)
    am[1, 4:6] = 0  # pad ids inside row 1, as transformers' classification tests build masks
    return am


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_inside_a_row_is_an_error_unless_the_dense_fallback_is_asked_for(causal, caplog):
    sdpa, ours = _models(causal)
    am = _mid_row_padding()
    with pytest.raises(ValueError, match="padding inside a row.*cocoa_dense_fallback=True"):
        ours(input_ids=_ids(), attention_mask=am)
    with torch.no_grad():
        want = run_as(sdpa, "sdpa", input_ids=_ids(), attention_mask=am).logits
        with caplog.at_level(logging.WARNING, logger="cocoa.integration"):
            cocoa.integration._warned_dense = False
            got = run_as(ours, IMPL, input_ids=_ids(), attention_mask=am, cocoa_dense_fallback=True).logits
            run_as(ours, IMPL, input_ids=_ids(), attention_mask=am, cocoa_dense_fallback=True)
    valid = am.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    said = [r.getMessage() for r in caplog.records if "dense SDPA" in r.getMessage()]
    assert len(said) == 1, said  # said once, not per layer or per call


def test_dense_fallback_gives_zero_output_and_finite_gradients_for_rows_that_see_nothing():
    from cocoa.integration import cocoa_attention_forward

    q = torch.randn(1, 4, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, requires_grad=True)
    v = torch.randn(1, 2, 5, 8, requires_grad=True)
    allowed = torch.tensor([[1, 0, 1, 0, 0]] * 4 + [[0] * 5], dtype=torch.bool)[None, None]  # gaps; last row empty
    module = torch.nn.Module()
    module.layer_idx = 0
    out, _ = cocoa_attention_forward(module, q, k, v, allowed, scaling=0.5, cocoa_dense_fallback=True)
    assert torch.equal(out[0, 4], torch.zeros(4, 8))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :, 4], torch.zeros(4, 8))
