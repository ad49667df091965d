"""CocoaModel: each stage's loss goes down on a tiny model; gradient caching is exact."""

from __future__ import annotations

import pytest
import torch

import cocoa
from cocoa.data import Sample, ShapesDataset
from cocoa.data.collators import Stage1Collator, Stage2Collator, Stage3Collator
from cocoa.data.encoding import MODEL_INPUTS, InputEncoder
from cocoa.embed import default_image_processor
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config
from tolerances import assert_close_at_scale

TOK = char_tokenizer()
ENC = InputEncoder(TOK, tiny_config(), default_image_processor())


def _model(seed=0):
    torch.manual_seed(seed)
    return CocoaModel(cocoa.load_model(tiny_config()))


def _samples(n=4, task="caption"):
    data = ShapesDataset(n, seed=3, task=task)
    return [data[i] for i in range(n)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_few_steps_lower_the_loss(stage):
    model = _model()
    collate = {1: Stage1Collator(ENC, seed=0), 2: Stage2Collator(ENC, seed=0), 3: Stage3Collator(ENC)}[stage]
    batch = collate(_samples(task="retrieval" if stage == 3 else "caption"))
    # InfoNCE at temperature 0.02 has sharp logits: it wants a smaller step
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4 if stage == 3 else 3e-3)
    losses = []
    for _ in range(6):
        loss = model(stage=stage, **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_stage1_loss_has_text_and_image_parts():
    model = _model()
    batch = Stage1Collator(ENC, seed=0)(_samples(2))
    loss, parts = model.reconstruction_loss(batch)
    assert set(parts) == {"text", "image"}
    torch.testing.assert_close(loss.detach(), parts["text"] + 0.1 * parts["image"])


def test_gradient_caching_matches_the_plain_loss():
    samples = _samples(5, task="retrieval")
    samples[0].negatives = [Sample(text="three small blue squares at the top left")]
    batch = Stage3Collator(ENC)(samples)
    plain, cached = _model(), _model()
    loss = plain.contrastive_loss(batch)
    loss.backward()
    loss_cached = cached.contrastive_step_cached(batch, chunk=2)
    assert_close_at_scale(loss_cached, loss.detach(), "loss")
    for (name, a), b in zip(plain.named_parameters(), cached.parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        assert_close_at_scale(b.grad, a.grad, name)  # chunks sum in another order: tests/tolerances.py


def test_info_nce_uses_temperature_and_hard_negatives():
    model = _model()
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    logits = q @ torch.cat([p, n]).T / 0.02
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(model.info_nce(q, p, n), expected)


def test_save_and_load_round_trip(tmp_path):
    a, b = _model(0), _model(1)
    a.save(tmp_path)
    b.load(tmp_path)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, msg=name)


def test_stage3_embeddings_are_unit_norm_and_equal_the_embedders():
    """What stage 3 trains is what inference embeds: ``CocoaModel.embed`` of the collated queries
    (images) and positives (captions) has unit rows equal to ``Embedder.encode`` of the same items."""
    from cocoa import Embedder

    model = _model()
    samples = _samples(4, task="retrieval")
    batch = Stage3Collator(ENC)(samples)
    embedder = Embedder(model.backbone, TOK, default_image_processor())
    with torch.no_grad():
        for side, items in (("query", [s.image for s in samples]), ("positive", [s.positive.text for s in samples])):
            reps = model.embed(batch[side])
            torch.testing.assert_close(reps.norm(dim=-1), torch.ones(len(samples)), rtol=0, atol=1e-6)
            torch.testing.assert_close(reps, embedder.encode(items, convert_to_tensor=True), rtol=1e-5, atol=1e-5)


def test_contrastive_loss_is_cross_entropy_over_normalised_raw_eos_states():
    """The InfoNCE from the backbone's raw last-layer states at each input's EOS, normalised here:
    a model that dropped the normalisation (or pooled another token) gives another loss."""
    import torch.nn.functional as F

    model = _model()
    samples = _samples(5, task="retrieval")
    batch = Stage3Collator(ENC)(samples)

    def eos_states(group):
        hidden = model.backbone.model(**{k: group[k] for k in MODEL_INPUTS if k in group}).last_hidden_state
        return hidden[torch.arange(hidden.shape[0]), group["eos_index"]]

    with torch.no_grad():
        q, p = (F.normalize(eos_states(batch[side]), dim=-1) for side in ("query", "positive"))
        want = F.cross_entropy(q @ p.T / model.loss_config.temperature, torch.arange(len(samples)))
        assert float(eos_states(batch["query"]).norm(dim=-1).min()) > 1.5  # raw states are not unit already
        torch.testing.assert_close(model.contrastive_loss(batch), want, rtol=1e-5, atol=1e-6)
