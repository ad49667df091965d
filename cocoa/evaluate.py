"""Retrieval metrics: Recall@k on paired images and captions, and MMEB-eval hit@1 (``cocoa eval``).

``embedder`` is anything with ``Embedder.encode``'s signature (``cocoa.Embedder``, or a test's fake).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.mmeb_eval import EvalData, read_eval_file

PAIRED_KS = (1, 5, 10)  # what `cocoa eval` reports for a paired file


def paired_recall(embedder, images: list, texts: list, ks=(1, 5), batch_size: int = 64,
                  show_progress_bar: bool | None = None) -> dict:
    """Caption i's match is image i. Returns ``{"t2i@k": ..., "i2t@k": ...}`` as fractions.

    A query hits at k when its match is among the k best by ``argsort`` (so among equal scores
    the order argsort gives decides). Images and texts are embedded as given, duplicates included.
    """
    if len(images) != len(texts):
        raise ValueError(f"images ({len(images)}) and texts ({len(texts)}) must pair up one to one")
    encode = dict(batch_size=batch_size, show_progress_bar=show_progress_bar)
    image_vecs = torch.as_tensor(embedder.encode(list(images), **encode))
    text_vecs = torch.as_tensor(embedder.encode(list(texts), **encode))
    sim = text_vecs @ image_vecs.T  # (captions, images)
    target = torch.arange(len(images))
    out = {}
    for name, scores in (("t2i", sim), ("i2t", sim.T)):
        ranked = scores.argsort(dim=1, descending=True)
        for k in ks:
            hit = (ranked[:, :k] == target[:, None]).any(1)
            out[f"{name}@{k}"] = hit.float().mean().item()
    return out


def retrieval_recall(embedder, samples, ks=(1, 5), batch_size: int = 64) -> dict:
    """``samples`` hold an image and its caption (``text``): :func:`paired_recall` on them (the demo's metric)."""
    return paired_recall(embedder, [s.image for s in samples], [s.text for s in samples], ks, batch_size,
                         show_progress_bar=False)


def embed_unique(embedder, inputs: list, **encode) -> tuple[dict, np.ndarray]:
    """Embed each distinct input (hashable, with ``.item()``: :class:`cocoa.data.mmeb_eval.EvalInput`)
    once: ``(index, vectors)``, ``vectors[index[x]]`` being ``x``'s float32 vector. ``encode``: the
    keywords of ``Embedder.encode``."""
    index: dict = {}
    for x in inputs:
        index.setdefault(x, len(index))
    vectors = np.asarray(embedder.encode([x.item() for x in index], **encode), dtype=np.float32)
    return index, vectors


def hit_at_1(embedder, rows: list, batch_size: int = 32, show_progress_bar: bool | None = None) -> dict:
    """MMEB-eval hit@1 over ranking rows (:class:`cocoa.data.mmeb_eval.RankingRow`).

    A row hits when its positive (``candidates[0]``) scores *strictly* higher than every other
    candidate: a tie counts as a miss, so a model that maps everything to one vector scores 0,
    not 1. Every distinct input (same image path, text and instruction) is embedded once, and a
    candidate identical to the positive gets the very same score (a tie, so a miss).
    Returns ``{"hit@1": fraction, "n": rows}``.
    """
    if not rows:
        raise ValueError("hit_at_1: no rows to evaluate")
    index, vectors = embed_unique(embedder, [x for row in rows for x in (row.query, *row.candidates)],
                                  batch_size=batch_size, show_progress_bar=show_progress_bar)
    vectors = vectors.astype(np.float64)
    hits = 0
    for row in rows:
        ids = np.array([index[c] for c in row.candidates])
        unique, back = np.unique(ids, return_inverse=True)  # score each distinct candidate once
        scores = (vectors[unique] @ vectors[index[row.query]])[back]
        hits += bool(scores[0] > scores[1:].max())
    return {"hit@1": hits / len(rows), "n": len(rows)}


def evaluate_data(embedder, data: EvalData, batch_size: int = 32, show_progress_bar: bool | None = None) -> dict:
    """One read file's metrics: ``{"hit@1", "n"}`` (ranking) or ``{"t2i@1", ..., "i2t@10", "n"}`` (paired)."""
    if data.kind == "ranking":
        return hit_at_1(embedder, data.rows, batch_size, show_progress_bar)
    recall = paired_recall(embedder, [r.image for r in data.rows], [r.text for r in data.rows], PAIRED_KS,
                           batch_size, show_progress_bar)
    return {**recall, "n": len(data.rows)}


def task_names(paths: list, names: list | None = None) -> list[str]:
    """``names`` (one per file) or the files' stems; two tasks with one name are an error."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--task-names: got {len(names)} name(s) for {len(paths)} --data file(s); give one per file")
    names = list(names) if names is not None else [Path(p).stem for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task names must be distinct, {repeated} repeat (name the tasks with --task-names)")
    return names


def read_eval_files(paths: list, *, names: list | None = None, image_dir=None,
                    on_bad_sample: str = "error") -> dict[str, EvalData]:
    """``{task name: EvalData}``: every file read (and every image checked) before any embedding."""
    names = task_names(paths, names)
    return {name: read_eval_file(p, image_dir=image_dir, on_bad_sample=on_bad_sample) for name, p in zip(names, paths)}


def evaluate_tasks(embedder, tasks: dict[str, EvalData], *, batch_size: int = 32,
                   show_progress_bar: bool | None = None, log=print) -> dict:
    """``{"tasks": {name: {...metrics, "n", "skipped"}}, "mean_hit@1"}``. ``mean_hit@1`` averages the
    ranking tasks only (a paired file's recall is another metric); None when there is none."""
    results = {}
    for name, data in tasks.items():
        if data.skipped.count:
            log(f"{name}: {data.skipped.summary()}")
        results[name] = {**evaluate_data(embedder, data, batch_size, show_progress_bar),
                         "skipped": data.skipped.count}
    ranking = [results[name]["hit@1"] for name, data in tasks.items() if data.kind == "ranking"]
    return {"tasks": results, "mean_hit@1": sum(ranking) / len(ranking) if ranking else None}
