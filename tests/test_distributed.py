"""Two CPU processes (gloo) against one process: stage 3 with DDP-style averaging (in-batch
negatives gathered from both ranks give the union batch's loss and gradients), and stages 2 and 3
under FSDP2 (fully_shard per decoder layer and at the root)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocoa.data import ShapesDataset
from cocoa.data.collators import Stage2Collator, Stage3Collator
from cocoa.data.encoding import InputEncoder
from cocoa.embed import default_image_processor
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config

WORLD = 2


def _model() -> CocoaModel:
    import cocoa

    torch.manual_seed(0)
    return CocoaModel(cocoa.load_model(tiny_config()))


def _batches(stage: int):
    """The union batch and one half of it per rank."""
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    if stage == 2:
        data, collate = ShapesDataset(4, seed=3, task="caption"), Stage2Collator(encoder, seed=0)
    else:
        data, collate = ShapesDataset(6, seed=5, task="retrieval"), Stage3Collator(encoder)
    samples = [data[i] for i in range(len(data))]
    per_rank = len(samples) // WORLD
    return collate(samples), [collate(samples[r * per_rank:(r + 1) * per_rank]) for r in range(WORLD)]


def _spawn(worker, tmp_path, *args) -> dict:
    """Run ``worker(rank, init_file, out, *args)`` on WORLD gloo ranks; rank 0 fills ``out``."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "init"), out, *args), nprocs=WORLD, join=True)
    return out


def _report(rank: int, loss: torch.Tensor, grads, out: dict) -> None:
    losses = [torch.zeros(()) for _ in range(WORLD)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        out["loss"] = torch.stack(losses).mean()
        out["grads"] = grads


def _ddp_worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        loss = model.contrastive_loss(_batches(3)[1][rank])
        loss.backward()
        # DDP averages gradients over ranks; do the same by hand.
        grads = []
        for p in model.parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads.append(g / WORLD)
        _report(rank, loss, grads, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_union(tmp_path):
    out = _spawn(_ddp_worker, tmp_path)
    model = _model()
    loss = model.contrastive_loss(_batches(3)[0])
    loss.backward()
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), g in zip(model.named_parameters(), out["grads"]):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=name)


def _fsdp_worker(rank: int, init_file: str, out: dict, stage: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.base.language_model.layers:  # one FSDP unit per decoder layer, as
            fully_shard(layer, mesh=mesh)  # accelerate's transformer-layer wrap policy does
        fully_shard(model, mesh=mesh)  # the root: embeddings (tied LM head), vision tower, heads
        loss = model(stage=stage, **_batches(stage)[1][rank])  # through forward(): FSDP unshards
        loss.backward()  # gradients are reduce-scattered (averaged over ranks)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        _report(rank, loss, grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3], ids=["stage2", "stage3"])
def test_fsdp2_fully_shard_matches_one_process(tmp_path, stage):
    """FSDP2 with each decoder layer and the root sharded over two ranks, each rank its own half of
    the batch: the averaged loss and every (unsharded) gradient equal one process's. Stage 2:
    the mean of the two halves' reconstruction losses (EOS-bridge masks and the fused loss under
    sharded, tied weights). Stage 3: the union batch's InfoNCE (negatives gathered across ranks)."""
    out = _spawn(_fsdp_worker, tmp_path, stage)
    model = _model()
    union, parts = _batches(stage)
    if stage == 2:
        loss = sum(model(stage=2, **part) for part in parts) / WORLD
    else:
        loss = model(stage=3, **union)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    params = dict(model.named_parameters())
    assert set(out["grads"]) == {n for n, p in params.items() if p.grad is not None}
    for name, g in out["grads"].items():
        torch.testing.assert_close(g, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
