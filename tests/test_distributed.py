"""Two CPU processes (gloo) against one process: stage 3 with DDP-style averaging (in-batch
negatives gathered from both ranks give the union batch's loss and gradients), and stages 2 and 3
under FSDP2 (fully_shard per decoder layer and at the root)."""

from __future__ import annotations

import pytest
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


# ---------------------------------------------------------------- FSDP2 (fully_shard)


def _stage_batches(stage: int, world: int):
    from cocoa.data.collators import Stage2Collator

    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    if stage == 2:
        data = ShapesDataset(4, seed=3, task="caption")
        collate = Stage2Collator(encoder, seed=0)
    else:
        data = ShapesDataset(6, seed=5, task="retrieval")
        collate = Stage3Collator(encoder)
    samples = [data[i] for i in range(len(data))]
    per_rank = len(samples) // world
    return collate(samples), [collate(samples[r * per_rank:(r + 1) * per_rank]) for r in range(world)]


def _fsdp_worker(rank: int, world: int, init_file: str, stage: int, out: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import cocoa

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = CocoaModel(cocoa.load_model(tiny_config()))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base.language_model.layers:  # one FSDP unit per decoder layer, as
            fully_shard(layer, mesh=mesh)  # accelerate's transformer-layer wrap policy does
        fully_shard(model, mesh=mesh)  # the root: embeddings (tied LM head), vision tower, heads
        _, parts = _stage_batches(stage, world)
        loss = model(stage=stage, **parts[rank])  # through forward(), so FSDP's hooks unshard
        loss.backward()  # gradients are reduce-scattered (averaged over ranks)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            out["loss"] = torch.stack(losses).mean()
            out["grads"] = grads
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3], ids=["stage2", "stage3"])
def test_fsdp2_fully_shard_matches_one_process(tmp_path, stage):
    """FSDP2 with each decoder layer and the root sharded over two ranks, each rank its own half of
    the batch: the averaged loss and every (unsharded) gradient equal one process's. Stage 2:
    the mean of the two halves' reconstruction losses (EOS-bridge masks and the fused loss under
    sharded, tied weights). Stage 3: the union batch's InfoNCE (negatives gathered across ranks)."""
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "init"), stage, out), nprocs=world, join=True)

    model, _, _ = _model_and_batches(world)
    union, parts = _stage_batches(stage, world)
    if stage == 2:
        loss = sum(model(stage=2, **part) for part in parts) / world
    else:
        loss = model(stage=3, **union)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    params = dict(model.named_parameters())
    assert set(out["grads"]) == {n for n, p in params.items() if p.grad is not None}
    for name, g in out["grads"].items():
        torch.testing.assert_close(g, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
