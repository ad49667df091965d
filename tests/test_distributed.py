"""Stage 3 across two CPU processes (gloo): in-batch negatives gathered from both ranks give the
same loss and gradients as one process on the union batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocoa.data import ShapesDataset
from cocoa.data.collators import Stage3Collator
from cocoa.data.encoding import InputEncoder
from cocoa.embed import default_image_processor
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config


def _model_and_batches(world: int):
    import cocoa

    torch.manual_seed(0)
    model = CocoaModel(cocoa.load_model(tiny_config()))
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    data = ShapesDataset(6, seed=5, task="retrieval")
    samples = [data[i] for i in range(6)]
    collate = Stage3Collator(encoder)
    per_rank = len(samples) // world
    return model, collate(samples), [collate(samples[r * per_rank:(r + 1) * per_rank]) for r in range(world)]


def _worker(rank: int, world: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, _, parts = _model_and_batches(world)
        loss = model.contrastive_loss(parts[rank])
        loss.backward()
        # DDP averages gradients over ranks; do the same by hand.
        grads = []
        for p in model.parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads.append(g / world)
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            out["loss"] = torch.stack(losses).mean()
            out["grads"] = grads
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_union(tmp_path):
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), out), nprocs=world, join=True)

    model, union, _ = _model_and_batches(world)
    loss = model.contrastive_loss(union)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), g in zip(model.named_parameters(), out["grads"]):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=name)
