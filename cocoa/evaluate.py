"""Retrieval evaluation: text->image and image->text Recall@k on paired samples."""

from __future__ import annotations

import torch


def retrieval_recall(embedder, samples, ks=(1, 5), batch_size: int = 64) -> dict:
    """``samples`` hold an image and its caption (``text``). Caption i's match is image i.

    Returns ``{"t2i@1": ..., "t2i@5": ..., "i2t@1": ..., "i2t@5": ...}`` as fractions.
    """
    images = embedder.encode([s.image for s in samples], batch_size=batch_size)
    texts = embedder.encode([s.text for s in samples], batch_size=batch_size)
    sim = texts @ images.T  # (captions, images)
    target = torch.arange(len(samples))
    out = {}
    for name, scores in (("t2i", sim), ("i2t", sim.T)):
        ranked = scores.argsort(dim=1, descending=True)
        for k in ks:
            hit = (ranked[:, :k] == target[:, None]).any(1)
            out[f"{name}@{k}"] = hit.float().mean().item()
    return out
