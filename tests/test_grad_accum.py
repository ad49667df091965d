"""Gradient accumulation gives the large batch's update, in one process and on two gloo ranks.

Stage 1 (text and pixel losses), fp32, no clipping. Each loss part is a mean over masked items
(tokens, pixel values); the micro-batches hold different numbers of them (texts of different
lengths, one image among four samples), so averaging the micro-batches' means would not match.
Masking every token and patch (rates 1.0) makes the masks the same however the samples are
batched. Compared: the gradients the optimizer is handed, not the weights after its step (AdamW's
first step is about lr * sign(g): blind to a wrong scale, noisy where g is ~0).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerCallback

import cocoa
from cocoa.data import Sample, ShapesDataset
from cocoa.data.encoding import InputEncoder
from cocoa.embed import default_image_processor
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config
from tolerances import assert_close_at_scale
from cocoa.train import StageConfig, run_stage

WORLD = 2


def _data() -> list:
    image = ShapesDataset(1)[0].image
    return [Sample(text="red"), Sample(image=image, text="one small red circle at the top left"),
            Sample(text="a much longer text about three large green triangles in the middle"),
            Sample(text="two blue squares")]


def _model() -> CocoaModel:
    torch.manual_seed(0)
    return CocoaModel(cocoa.load_model(tiny_config()))


def _encoder() -> InputEncoder:
    return InputEncoder(char_tokenizer(), tiny_config(), default_image_processor(max_pixels=56 * 56))


def _config(batch_size: int, grad_accum: int) -> StageConfig:
    return StageConfig(stage=1, steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_ratio=0,
                       max_grad_norm=0, precision="fp32", text_mask_rate=1.0, image_mask_rate=1.0)


class _Gradients(TrainerCallback):
    """The gradients the optimizer is about to apply (after accumulation and all-reduce)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class _Logs(TrainerCallback):
    """What the Trainer hands its reporters (tensorboard, wandb) at each log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(batch_size: int, grad_accum: int, out_dir) -> tuple[dict, list]:
    grads, logs = _Gradients(), _Logs()
    result = run_stage(_config(batch_size, grad_accum), _model(), _encoder(), _data(), out_dir, resume=False,
                       callbacks=[grads, logs])
    step_log = next(entry for entry in logs.logs if "loss" in entry)
    assert {"loss_text", "loss_image"} <= set(step_log)  # the loss parts reach report_to's integrations
    return {k.removeprefix("module."): v for k, v in grads.grads.items()}, result["loss"]


def _assert_same(got: tuple[dict, list], want: tuple[dict, list]) -> None:
    assert got[0].keys() == want[0].keys() and len(want[0]) > 10
    for name, grad in want[0].items():
        assert_close_at_scale(got[0][name], grad, name)  # other batch splits: tests/tolerances.py
    assert got[1] == pytest.approx(want[1], rel=1e-4)  # the logged loss is the large batch's too


def test_accumulated_micro_batches_give_the_large_batch_update(tmp_path, monkeypatch):
    counts = []
    original = CocoaModel.reconstruction_loss

    def spy(self, batch, num_items=None):
        counts.append((int(batch["labels"][:, 1:].ne(-100).sum()), "pixel_targets" in batch))
        return original(self, batch, num_items)

    monkeypatch.setattr(CocoaModel, "reconstruction_loss", spy)
    large = _train(4, 1, tmp_path / "large")
    accumulated = _train(2, 2, tmp_path / "accumulated")
    (whole, _), (a, a_image), (b, b_image) = counts
    assert whole == a + b and a != b and a_image != b_image  # the test can tell the two rules apart
    _assert_same(accumulated, large)


def _ddp_worker(rank: int, init_file: str, out: dict, out_dir: str):
    # accelerate reads the layout from the environment (MULTI_CPU over the gloo group below)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        grads, loss = _train(1, 2, out_dir)
        if rank == 0:
            out["result"] = (grads, loss)
    finally:
        dist.destroy_process_group()


def test_two_ranks_accumulating_give_the_large_batch_update(tmp_path):
    """DDP on two gloo ranks, each 2 micro-batches of 1 sample: the masked-item counts are summed
    over micro-batches and ranks, so the all-reduced gradient is one process's on all 4."""
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out, str(tmp_path / "ddp")), nprocs=WORLD, join=True)
    _assert_same(out["result"], _train(4, 1, tmp_path / "large"))
