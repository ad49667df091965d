"""A built-in image-caption set, drawn on the fly: coloured shapes with counts, sizes, positions.

Nothing is downloaded. Sample ``i`` is a pure function of ``(seed, i)``; the held-out split uses
indices no training index reaches, so train and eval never share a sample.
"""

from __future__ import annotations

import random

from .sample import Sample

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("one", "two", "three")
_EVAL_OFFSET = 1_000_000


class ShapesDataset:
    """``split="train"`` or ``"eval"``; ``len`` samples of ``size``-pixel images with captions.

    ``task="caption"`` (stages 1 and 2, and evaluation): ``Sample(image, text=caption)``.
    ``task="retrieval"`` (stage 3): ``Sample(image, positive=Sample(text=caption))``, so the query
    is the image alone and its caption the positive. Sample ``i`` is the same image either way.
    """

    def __init__(self, length: int, split: str = "train", size: int = 84, seed: int = 0, task: str = "caption"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if task not in ("caption", "retrieval"):
            raise ValueError(f"task must be 'caption' or 'retrieval', got {task!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.split, self.size, self.seed, self.task = length, split, size, seed, task

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.length:
            raise IndexError(i)
        index = i + (_EVAL_OFFSET if self.split == "eval" else 0)
        rng = random.Random(self.seed * 10_000_019 + index)
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        count = rng.randint(1, 3)
        large = rng.random() < 0.5
        row, col = rng.randrange(3), rng.randrange(3)
        image = self._draw(rng, color, shape, count, large, row, col)
        noun = shape + ("s" if count > 1 else "")
        caption = f"{NUMBERS[count - 1]} {'large' if large else 'small'} {color} {noun} at the {ROWS[row]} {COLS[col]}"
        if self.task == "retrieval":
            return Sample(image=image, positive=Sample(text=caption))
        return Sample(image=image, text=caption)

    def _draw(self, rng, color, shape, count, large, row, col):
        from PIL import Image, ImageDraw

        s = self.size
        cell = s // 3
        img = Image.new("RGB", (s, s), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        radius = cell * (0.22 if large else 0.13)
        for k in range(count):
            # spread the copies inside the cell, jittered
            cx = col * cell + cell * (k + 1) / (count + 1) + rng.uniform(-1, 1)
            cy = row * cell + cell / 2 + rng.uniform(-cell * 0.15, cell * 0.15)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if shape == "circle":
                draw.ellipse(box, fill=COLORS[color])
            elif shape == "square":
                draw.rectangle(box, fill=COLORS[color])
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                             fill=COLORS[color])
        return img
