"""Crash-safe resume: a stage run killed with SIGKILL at several moments (inside a training step,
halfway through writing a checkpoint, halfway through writing the final export) and rerun each
time ends with the same weights as a run never interrupted: the same data order, the same masks.

The runs are fresh processes (this file, run as a script); each kill is made deterministic by a
hook the worker installs in its own process (no timing luck, no hooks in cocoa itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

STEPS, SAVE_STEPS = 6, 2
SAMPLES, BATCH = 8, 2  # 4 batches an epoch: the run crosses an epoch boundary at step 4


def _setup():
    import cocoa
    from cocoa.data import ShapesDataset
    from cocoa.data.encoding import InputEncoder
    from cocoa.embed import default_image_processor
    from cocoa.model import CocoaModel
    from cocoa.tiny import char_tokenizer, tiny_config
    from cocoa.train import StageConfig

    torch.manual_seed(0)
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    model = CocoaModel(cocoa.load_model(tiny_config()))
    # stage 1: random text masks, image masks and packing order all come from the mask RNG
    cfg = StageConfig(stage=1, steps=STEPS, batch_size=BATCH, lr=1e-3, save_steps=SAVE_STEPS, seed=3)
    return cfg, model, encoder, ShapesDataset(SAMPLES)


def _arm(kill_at: str) -> None:
    """Make this process SIGKILL itself at ``kill_at``: "step:N" (inside optimizer step N, after
    its backward), "save:N" (checkpoint-N half written: weights, optimizer and scheduler, but not
    the RNG states and trainer state), "final" (the final folder's weights written, its export not)."""
    import cocoa.export
    from cocoa.train import CocoaTrainer

    def die(*args, **kwargs):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    point, _, step = kill_at.partition(":")
    if point == "step":
        original_step = CocoaTrainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original_step(self, *args, **kwargs)
            if self.state.global_step == int(step) - 1:
                die()
            return loss

        CocoaTrainer.training_step = training_step
    elif point == "save":
        original_rng = CocoaTrainer._save_rng_state

        def save_rng_state(self, output_dir):
            if self.state.global_step == int(step):
                die()
            return original_rng(self, output_dir)

        CocoaTrainer._save_rng_state = save_rng_state
    elif point == "final":
        cocoa.export.complete_export = die
    elif point != "none":
        raise ValueError(f"kill_at: unknown point {kill_at!r}")


def _worker(run_dir: str, kill_at: str) -> None:
    from cocoa.model import CocoaModel
    from cocoa.train import run_stage

    _arm(kill_at)
    loaded = []
    original_load = CocoaModel.load
    CocoaModel.load = lambda self, d: (loaded.append(Path(d).name), original_load(self, d))[1]
    cfg, model, encoder, data = _setup()
    result = run_stage(cfg, model, encoder, data, run_dir)
    print(json.dumps({"resumed_from": loaded, "steps": result["steps"]}))


def _run(run_dir: Path, kill_at: str) -> tuple[int, dict | None]:
    done = subprocess.run([sys.executable, __file__, str(run_dir), kill_at], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"resumed_from"')]
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker ({kill_at}) failed:\n{done.stderr[-3000:]}")
    return done.returncode, (json.loads(lines[-1]) if lines else None)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _names(run_dir: Path) -> set:
    return {p.name for p in run_dir.iterdir()}


def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path):
    from cocoa.train import run_stage

    cfg, model, encoder, data = _setup()
    run_stage(cfg, model, encoder, data, tmp_path / "reference", resume=False)
    reference = tmp_path / "reference" / "final"

    run = tmp_path / "run"
    # 1. killed halfway through writing checkpoint-4: only checkpoint-2 counts
    rc, _ = _run(run, "save:4")
    assert rc == -signal.SIGKILL
    assert _names(run) == {"checkpoint-2", "tmp-checkpoint-4"}
    half = run / "tmp-checkpoint-4" / "checkpoint-4"
    assert (half / "model.safetensors").is_file() and not (half / "trainer_state.json").exists()

    # 2. resumes from checkpoint-2 (the half-written one is deleted, never read); killed in step 5
    rc, _ = _run(run, "step:5")
    assert rc == -signal.SIGKILL
    assert _names(run) == {"checkpoint-2", "checkpoint-4"}

    # 3. resumes from checkpoint-4 (an epoch boundary); killed while writing the final export
    rc, _ = _run(run, "final")
    assert rc == -signal.SIGKILL
    assert "final" not in _names(run) and "checkpoint-6" in _names(run)

    # 4. resumes from checkpoint-6 and writes the final folder
    rc, report = _run(run, "none")
    assert rc == 0 and report == {"resumed_from": ["checkpoint-6"], "steps": STEPS}
    assert not any(name.startswith("tmp-") for name in _names(run))

    for name in ("model.safetensors", "backbone/model.safetensors"):
        expected, got = _tensors(reference / name), _tensors(run / "final" / name)
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    # and the resumed steps' losses are the uninterrupted run's (same batches, same masks)
    record = json.loads((run / "final" / "stage.json").read_text())
    assert record["loss"] == json.loads((reference / "stage.json").read_text())["loss"]


def test_last_complete_checkpoint_skips_incomplete_folders(tmp_path):
    from cocoa import checkpoints

    for name, complete in (("checkpoint-2", True), ("checkpoint-10", False), ("checkpoint-4", True)):
        (tmp_path / name).mkdir()
        if complete:
            checkpoints.mark_complete(tmp_path / name, step=int(name.split("-")[1]))
    # written completely, killed before the rename: still staged, so ignored
    staged = checkpoints.staging_path(tmp_path / "checkpoint-6")
    (staged / "checkpoint-6").mkdir(parents=True)
    checkpoints.mark_complete(staged / "checkpoint-6", step=6)
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoints.remove_staging(tmp_path) == [staged]
    assert not staged.exists()
    assert checkpoints.last_complete_checkpoint(tmp_path / "missing") is None


def test_publish_replaces_a_folder_whole(tmp_path):
    from cocoa import checkpoints

    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staged = checkpoints.staging_path(target)
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    checkpoints.publish(staged, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_seeded_batches_do_not_depend_on_the_global_rng():
    from cocoa.checkpoints import SeededBatches

    draw = SeededBatches(lambda samples: torch.rand(3), seed=1)
    first = [draw(None) for _ in range(3)]
    torch.manual_seed(123)  # an unrelated global state, as after a resume
    before = torch.random.get_rng_state()
    draw.batches = 1
    assert torch.equal(draw(None), first[1]) and torch.equal(draw(None), first[2])
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(SeededBatches(lambda s: torch.rand(3), seed=1, rank=1)(None), first[0])


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
