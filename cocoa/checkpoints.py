"""Crash-safe checkpoints and exact resume.

Folders: written under a ``tmp-`` name, renamed when complete. A run killed at any moment
(``SIGKILL``, a lost node) leaves either a complete ``checkpoint-N`` (renamed only after every
file of it, on every rank, was written, and holding the completion marker) or a ``tmp-*`` folder
that a resume deletes and never reads. ``os.replace`` of a folder is atomic on one file system,
which is what the output directory of a run is.

Masks: :class:`SeededBatches` gives the n-th batch of a run its own random stream, so a resumed
run draws the same masks as the uninterrupted one (see the class for why the global RNG cannot).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from hashlib import blake2b
from pathlib import Path

import torch

COMPLETE_MARKER = "cocoa_checkpoint.json"  # written last, just before the rename
STAGING_PREFIX = "tmp-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def staging_path(target: str | os.PathLike) -> Path:
    """Where ``target`` is written before it is complete: ``tmp-<name>`` beside it."""
    target = Path(target)
    return target.with_name(STAGING_PREFIX + target.name)


def mark_complete(folder: str | os.PathLike, **info) -> None:
    """Write the completion marker (with ``info``, e.g. the step) into a staged folder."""
    (Path(folder) / COMPLETE_MARKER).write_text(json.dumps({"complete": True, **info}) + "\n")


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def completed_step(folder: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was taken at (from its marker)."""
    return int(json.loads((Path(folder) / COMPLETE_MARKER).read_text())["step"])


def publish(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename a fully written ``staged`` folder to ``target``, replacing an older ``target``.

    An existing ``target`` is first moved aside (``tmp-old-<name>``) and deleted after the
    rename, so at every moment ``target`` is absent or complete."""
    staged, target = Path(staged), Path(target)
    if not staged.is_dir():
        raise ValueError(f"staged: {staged} is not a folder")
    old = None
    if target.exists():
        old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old)
    return target


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` of ``run_dir`` with the highest N that carries the completion marker
    (an unmarked one, e.g. written by an interrupted plain Trainer, is skipped); None if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def remove_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``tmp-*`` folders an interrupted run left in ``run_dir``; returns them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = [child for child in run_dir.iterdir() if child.is_dir() and child.name.startswith(STAGING_PREFIX)]
    for child in removed:
        shutil.rmtree(child)
    return removed


class SeededBatches:
    """A collator wrapper: the random choices (masks, cut points) made for the ``batches``-th
    batch come from the CPU generator seeded with ``(seed, rank, batches)``; the global RNG is
    left as it was.

    Why not the global RNG, restored with each checkpoint: accelerate's data loader collates one
    batch ahead of the one it hands out, and the Trainer restores the checkpoint's RNG after
    fetching the first batch of a resumed run, so the states the collator sees around a resume
    differ from the uninterrupted run's. A batch counter does not depend on when the collator is
    called; the trainer sets ``batches`` to the number of batches already trained on when it
    resumes (see ``CocoaTrainer``). Needs the collator to run in the main process
    (``dataloader_num_workers=0``, the default), where the counter lives.
    """

    def __init__(self, collate, *, seed: int = 0, rank: int = 0):
        self.collate = collate
        self.seed, self.rank = int(seed), int(rank)
        self.batches = 0

    def batch_seed(self, index: int) -> int:
        digest = blake2b(f"{self.seed}:{self.rank}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # a non-negative 63-bit seed

    def __call__(self, samples):
        with torch.random.fork_rng(devices=[]):  # only the CPU generator, which collators use
            torch.default_generator.manual_seed(self.batch_seed(self.batches))
            batch = self.collate(samples)
        self.batches += 1
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings stay readable
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)
