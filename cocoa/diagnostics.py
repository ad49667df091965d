"""What a model's EOS state carries, measured on held-out items (the demo's diagnostics).

- ``caption_swap_gap``: stage-0 caption loss (next token, causal) with each caption's own image
  and with another item's image; a captioner that reads the image has a large gap. The demo's
  gate before the arms run.
- ``bridge_swap_gap``: stage-2 loss (block B's masked words, read through block A's EOS) with
  own and with swapped images, identical masks; ~0 means the bridge carried nothing.
- ``linear_probe``: each object attribute predicted by a linear classifier from the EOS states
  of images alone (the stage-3 query), fitted on training items, scored on held-out ones.
- ``mean_pairwise_cosine``: how alike the EOS states of different images are (1.0: collapsed).
- ``pixel_reconstruction``: stage-1 pixel-head MSE on blanked visual tokens against the best
  constant guess (the targets' mean).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .data.collators import Stage0Collator, Stage1Collator, Stage2Collator
from .data.encoding import embedding_batch
from .data.sample import Sample


@contextlib.contextmanager
def _evaluating(model, shift: int):
    """No gradients, eval mode, and the loss ``shift`` a stage scores with; restored afterwards."""
    saved, was_training = model.loss_config, model.training
    model.loss_config = dataclasses.replace(saved, shift=shift)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.loss_config = saved
        model.train(was_training)


def _swapped(samples: list[Sample]) -> list[Sample]:
    """Each sample with the next one's image (a derangement for two or more samples)."""
    if len(samples) < 2:
        raise ValueError(f"samples: a swap needs at least 2 samples, got {len(samples)}")
    images = [s.image for s in samples]
    images = images[1:] + images[:1]
    return [Sample(image=im, text=s.text, target=s.target) for s, im in zip(samples, images)]


def _mean_text_loss(model, collate, samples, batch_size: int) -> float:
    """Mean over batches of the text loss (each batch's mean over its scored tokens)."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        _, parts = model.reconstruction_loss(collate(chunk))
        total += float(parts["text"]) * len(chunk)
        count += len(chunk)
    return total / count


def _swap_gap(model, make_collator, samples: list[Sample], shift: int, batch_size: int) -> dict:
    """Mean text loss with own images and with swapped ones (a fresh collator for each pass, so
    seeded masks are the same in both): ``{"own", "swapped", "gap"}``."""
    with _evaluating(model, shift=shift):
        own = _mean_text_loss(model, make_collator(), samples, batch_size)
        swapped = _mean_text_loss(model, make_collator(), _swapped(samples), batch_size)
    return {"own": own, "swapped": swapped, "gap": swapped - own}


def caption_swap_gap(model, encoder, samples: list[Sample], batch_size: int = 64) -> dict:
    """Held-out causal caption loss (nats per caption token) with own images and with swapped
    ones: ``{"own", "swapped", "gap"}``."""
    return _swap_gap(model, lambda: Stage0Collator(encoder), samples, 1, batch_size)


def bridge_swap_gap(model, encoder, samples: list[Sample], *, mask_rate: float = 0.7, seed: int = 0,
                    batch_size: int = 64) -> dict:
    """Held-out stage-2 loss (nats per masked word of block B, scored in place) with own and with
    swapped images; both passes mask the same words (same collator seed). ``samples`` carry
    ``text`` (block A's words) and ``target`` (block B). Returns ``{"own", "swapped", "gap"}``."""
    return _swap_gap(model, lambda: Stage2Collator(encoder, target_mask_rate=mask_rate, seed=seed), samples, 0,
                     batch_size)


def eos_states(model, encoder, images: list, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised EOS states (N, hidden) of images alone, embedded as stage 3 embeds them."""
    out = []
    with _evaluating(model, shift=model.loss_config.shift):
        for start in range(0, len(images), batch_size):
            batch = embedding_batch(encoder, [(im, None) for im in images[start:start + batch_size]])
            out.append(model.embed(batch).cpu())
    return torch.cat(out)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows of ``x`` (N >= 2)."""
    if x.shape[0] < 2:
        raise ValueError(f"x: need at least 2 rows, got {x.shape[0]}")
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 *, weight_decay: float = 1e-3, iters: int = 200) -> dict:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS), fitted on
    ``train`` and scored on ``test``: ``{"accuracy", "chance"}`` where chance is the test
    accuracy of always answering the training majority class."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xtr), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        accuracy = float((linear(xte).argmax(-1) == test_y).float().mean())
    majority = int(torch.bincount(train_y, minlength=classes).argmax())
    return {"accuracy": accuracy, "chance": float((test_y == majority).float().mean())}


def probe_attributes(train_x: torch.Tensor, train_attrs: list[dict], test_x: torch.Tensor,
                     test_attrs: list[dict]) -> dict:
    """``linear_probe`` for every attribute key of the ``*_attrs`` dicts (name -> class index);
    adds ``"mean"``: the mean accuracy and mean chance over attributes."""
    out = {}
    for name in train_attrs[0]:
        ytr = torch.tensor([a[name] for a in train_attrs])
        yte = torch.tensor([a[name] for a in test_attrs])
        out[name] = linear_probe(train_x, ytr, test_x, yte)
    out["mean"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("accuracy", "chance")}
    return out


def pixel_reconstruction(model, encoder, samples: list[Sample], *, mask_rate: float = 0.5, seed: int = 0,
                         batch_size: int = 64) -> dict:
    """Stage-1 pixel-head MSE on the blanked visual tokens of ``samples`` (text left unmasked)
    against the MSE of the best constant guess (the targets' own mean): ``{"mse", "constant"}``;
    None where the model has no pixel head."""
    if model.pixel_head is None:
        return None
    collate = Stage1Collator(encoder, text_mask_rate=0.0, image_mask_rate=mask_rate, seed=seed)
    preds, targets = [], []
    with _evaluating(model, shift=1):
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start:start + batch_size])
            hidden = model._hidden(batch)
            preds.append(model.pixel_head(hidden[batch["pixel_mask"].to(hidden.device)]).float().cpu())
            targets.append(batch["pixel_targets"].float())
    pred, target = torch.cat(preds), torch.cat(targets)
    constant = target.mean(0).expand_as(target)
    return {"mse": float(F.mse_loss(pred, target)), "constant": float(F.mse_loss(constant, target))}
