"""Runs that repeat, through the ``cocoa train`` command in fresh processes: the same command
twice gives bit-identical weights, and a run SIGKILLed at any moment (inside a step before the
first checkpoint, halfway through writing a checkpoint, between checkpoints, halfway through
writing the final export) and started again with the same command ends with the uninterrupted
run's weights and losses: the same initial weights, data order, masks and dropout.

Each run is this file run as a script: it installs a deterministic kill hook in its own process
(no timing luck, no hooks in cocoa itself) and then calls ``cocoa.cli.main`` with the command's
arguments, so the command's own seeding is what is tested (nothing here seeds anything).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_checkpoint import real_vl_checkpoint  # noqa: F401

STEPS, SAVE_STEPS = 6, 2
SAMPLES, BATCH = 8, 2  # 4 batches an epoch: the run crosses an epoch boundary at step 4


def _write_shapes_jsonl(folder: Path) -> Path:
    """SAMPLES built-in captioned images as the project's JSONL with PNG files (a small set, so
    the run crosses an epoch boundary)."""
    from cocoa.data import ShapesDataset

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(ShapesDataset(SAMPLES)):
        sample.image.save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": sample.text}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "data.jsonl"


def _tiny_command(data: Path, out: Path) -> list[str]:
    # stage 1: random text masks, image masks and packing order all come from the mask RNG; the
    # tiny backbone's weights and the pixel head come from the seed too
    return ["train", "--stage", "1", "--model", "tiny", "--data", str(data), "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--lr", "1e-3", "--save-steps", str(SAVE_STEPS), "--seed", "3",
            "--out", str(out)]


def _arm(kill_at: str) -> None:
    """Make this process SIGKILL itself at ``kill_at``, ``[STAGE/]POINT``: "step:N" (inside
    optimizer step N, after its backward), "save:N" (checkpoint-N half written: weights, optimizer
    and scheduler, but not the RNG states and trainer state), "final" (the final folder's weights
    written, its export not); with ``STAGE/``, only in that stage of a multi-stage run."""
    import cocoa.export
    from cocoa.train import CocoaTrainer

    def die(*args, **kwargs):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    stage, _, kill_at = kill_at.rpartition("/")
    point, _, step = kill_at.partition(":")

    def here(trainer, global_step) -> bool:
        return (not stage or trainer.stage == int(stage)) and trainer.state.global_step == global_step

    if point == "step":
        original_step = CocoaTrainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original_step(self, *args, **kwargs)
            if here(self, int(step) - 1):
                die()
            return loss

        CocoaTrainer.training_step = training_step
    elif point == "save":
        original_rng = CocoaTrainer._save_rng_state

        def save_rng_state(self, output_dir):
            if here(self, int(step)):
                die()
            return original_rng(self, output_dir)

        CocoaTrainer._save_rng_state = save_rng_state
    elif point == "final":
        cocoa.export.complete_export = die
    elif point != "none":
        raise ValueError(f"kill_at: unknown point {kill_at!r}")


def _worker(kill_at: str, *argv: str) -> None:
    from cocoa.cli import main
    from cocoa.model import CocoaModel

    _arm(kill_at)
    loaded = []
    original_load = CocoaModel.load
    CocoaModel.load = lambda self, d: (loaded.append(Path(d).name), original_load(self, d))[1]
    assert main(list(argv)) == 0
    print(json.dumps({"resumed_from": loaded}))


def _run(kill_at: str, argv: list[str]) -> tuple[int, dict | None]:
    done = subprocess.run([sys.executable, __file__, kill_at, *argv], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"resumed_from"')]
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker ({kill_at}) failed:\n{done.stderr[-3000:]}")
    return done.returncode, (json.loads(lines[-1]) if lines else None)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _names(run_dir: Path) -> set:
    return {p.name for p in run_dir.iterdir()}


def _assert_identical_finals(got: Path, want: Path) -> None:
    """Bit-identical weights (every tensor of the stage's weights and of its export) and losses."""
    for name in ("model.safetensors", "backbone/model.safetensors"):
        expected, actual = _tensors(want / name), _tensors(got / name)
        assert set(actual) == set(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{got / name}: {key}"
    record = json.loads((got / "stage.json").read_text())
    assert record["loss"] == json.loads((want / "stage.json").read_text())["loss"]


def test_the_same_train_command_twice_gives_identical_weights_and_resumes_after_kills(tmp_path):
    data = _write_shapes_jsonl(tmp_path / "data")
    for name in ("reference", "again"):
        rc, report = _run("none", _tiny_command(data, tmp_path / name))
        assert rc == 0 and report == {"resumed_from": []}
    reference = tmp_path / "reference" / "stage1" / "final"
    _assert_identical_finals(tmp_path / "again" / "stage1" / "final", reference)

    command = _tiny_command(data, tmp_path / "run")
    run = tmp_path / "run" / "stage1"  # where the command writes stage 1's checkpoints and final
    # 1. killed inside step 2, before the first checkpoint: nothing to resume from
    rc, _ = _run("step:2", command)
    assert rc == -signal.SIGKILL
    assert not run.exists() or not any(name.startswith("checkpoint-") for name in _names(run))

    # 2. starts again from nothing (the same seeded run); killed halfway through writing checkpoint-4
    rc, _ = _run("save:4", command)
    assert rc == -signal.SIGKILL
    assert _names(run) == {"checkpoint-2", "tmp-checkpoint-4"}
    half = run / "tmp-checkpoint-4" / "checkpoint-4"
    assert (half / "model.safetensors").is_file() and not (half / "trainer_state.json").exists()

    # 3. resumes from checkpoint-2 (the half-written one is deleted, never read); killed in step 5,
    #    between checkpoints
    rc, _ = _run("step:5", command)
    assert rc == -signal.SIGKILL
    assert _names(run) == {"checkpoint-2", "checkpoint-4"}

    # 4. resumes from checkpoint-4 (an epoch boundary); killed while writing the final export
    rc, _ = _run("final", command)
    assert rc == -signal.SIGKILL
    assert "final" not in _names(run) and "checkpoint-6" in _names(run)

    # 5. resumes from checkpoint-6 and writes the final folder
    rc, report = _run("none", command)
    assert rc == 0 and report == {"resumed_from": ["checkpoint-6"]}
    assert not any(name.startswith("tmp-") for name in _names(run))
    _assert_identical_finals(run / "final", reference)


def test_real_format_two_stage_run_repeats_and_resumes_bit_for_bit(real_vl_checkpoint, tmp_path):  # noqa: F811
    """Stages 1 and 2 from the real-format folder (bf16 weights, BPE tokenizer without a mask
    token) with LoRA adapters (their random init too) through ``cocoa train --config``: twice the
    same command, then once killed in stage 2's first step and started again. The rerun takes
    stage 1's weights from its last checkpoint without training, so the process's random state
    reaches stage 2 unlike the uninterrupted run's: stage 2 must draw its adapters from its own
    seed alone."""
    pytest.importorskip("peft")
    stage = {"steps": 2, "batch_size": 2, "lr": 1e-3, "max_pixels": 56 * 56, "save_steps": 1, "seed": 5,
             "lora": {"r": 4, "alpha": 8}}

    def command(out: Path) -> list[str]:
        config = {"model": str(real_vl_checkpoint), "data": "builtin", "out": str(out),
                  "stages": [{"stage": 1, **stage, "pack_budget": 64}, {"stage": 2, **stage}]}
        path = out.with_suffix(".json")
        path.write_text(json.dumps(config))
        return ["train", "--config", str(path)]

    for name in ("reference", "again", "killed"):
        rc, _ = _run("2/step:1" if name == "killed" else "none", command(tmp_path / name))
        assert rc == (-signal.SIGKILL if name == "killed" else 0)
    assert "final" not in _names(tmp_path / "killed" / "stage2")
    rc, report = _run("none", command(tmp_path / "killed"))
    # stage 1 had finished: its last checkpoint's weights are taken as they are; stage 2 had no
    # checkpoint yet and starts again
    assert rc == 0 and report == {"resumed_from": ["checkpoint-2"]}
    for run in ("again", "killed"):
        for stage_dir in ("stage1", "stage2"):
            _assert_identical_finals(tmp_path / run / stage_dir / "final", tmp_path / "reference" / stage_dir / "final")


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
    _worker(*sys.argv[1:])
