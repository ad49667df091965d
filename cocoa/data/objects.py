"""The demo's built-in data: several objects on a grid, described word by word.

An image (84 px by default) is a 3 x 3 grid of cells, one cell per merged visual token of the
tiny model (14 px patches, 2 x 2 merge); ``objects`` objects sit in distinct cells, each with an
independent size, colour and shape. The caption lists one five-word phrase per object, in random
order: ``"large red circle top left small blue square middle center"``. Every word is one token
of ``word_tokenizer(WORDS)``; there are no articles or plurals that would leak one phrase's
content into another, so once an image is gone an object's phrase is unknowable from the rest
of the caption (``masked_target_bits`` counts how much).

Splits never share content. An *object set* (the objects with their cells, order ignored) falls
in one of 20 buckets by a stable hash: bucket 0 is the ``eval`` split's, bucket 1 the ``val``
split's (for tuning), the rest ``train``'s. ``HELD_OUT`` colour-shape pairs never occur in
``train``, so about a third of the eval items hold a combination the model never saw. The eval
and val splits draw unique object sets (so unique captions). Sample ``i`` is a pure function of
``(seed, split, i)``.

Tasks: ``"caption"`` -> ``Sample(image, text=caption)`` (stages 0 and 1, evaluation);
``"bridge"`` -> ``Sample(image, text=first phrases, target=other phrases)`` (stage 2: block A is
the image with some objects' phrases, block B the other objects', knowable only through A's EOS);
``"retrieval"`` -> ``Sample(image, positive=Sample(text=caption))`` (stage 3).
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from functools import lru_cache
from itertools import combinations, permutations

from .sample import Sample

SIZES = ("large", "small")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (235, 205, 30), "purple": (150, 50, 200), "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
WORDS = (*SIZES, *COLORS, *SHAPES, *ROWS, *COLS)  # the whole caption vocabulary
ATTRIBUTES = ("size", "color", "shape", "row", "col")  # the words of a phrase, in order
HELD_OUT = frozenset({("green", "triangle"), ("purple", "circle"), ("cyan", "square")})
SPLITS = ("train", "val", "eval")
_BUCKETS = 20
_SPLIT_BUCKET = {"eval": 0, "val": 1}
_TASKS = ("caption", "bridge", "retrieval")
_BACKGROUND = (245, 245, 245)


def phrase(obj: tuple) -> str:
    """``(size, colour, shape, cell)`` -> its five words."""
    size, color, shape, cell = obj
    return f"{size} {color} {shape} {ROWS[cell // 3]} {COLS[cell % 3]}"


def split_of(objects) -> str:
    """The split an object set belongs to (order ignored)."""
    key = "|".join(sorted(phrase(o) for o in objects))
    bucket = zlib.crc32(key.encode()) % _BUCKETS
    if bucket == _SPLIT_BUCKET["eval"]:
        return "eval"
    if bucket == _SPLIT_BUCKET["val"]:
        return "val"
    return "train"


def allowed(objects, split: str) -> bool:
    """Whether ``split`` may hold this object set: its hash bucket matches, and train holds no
    ``HELD_OUT`` colour-shape pair."""
    if split_of(objects) != split:
        return False
    return split != "train" or not any((o[1], o[2]) in HELD_OUT for o in objects)


class ObjectsDataset:
    """``length`` samples of ``split`` ("train", "val" or "eval") for ``task`` (see the module doc).

    ``objects`` objects per image (2 to 9) in distinct cells of a 3 x 3 grid of a ``size``-pixel
    image; ``block_a`` phrases go to block A in the "bridge" task (default: all but half, rounded
    down, so one of two); ``image_only``: the share of "bridge" samples whose block A is the image
    alone and block B the whole caption (the input stage 3 embeds is an image alone). Images are
    cached (``cache`` of them), since stage 3 revisits a small labelled pool many times.
    """

    def __init__(self, length: int, split: str = "train", *, task: str = "caption", objects: int = 2,
                 size: int = 84, seed: int = 0, block_a: int | None = None, image_only: float = 0.0,
                 cache: int = 4096):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 2 <= objects <= 9:
            raise ValueError(f"objects must be between 2 and 9 (cells of a 3 x 3 grid), got {objects}")
        if size < 3:
            raise ValueError(f"size must be at least 3 pixels, got {size}")
        block_a = objects - objects // 2 if block_a is None else block_a
        if not 1 <= block_a < objects:
            raise ValueError(f"block_a must be between 1 and objects - 1 = {objects - 1}, got {block_a}")
        if not 0.0 <= image_only <= 1.0:
            raise ValueError(f"image_only must be between 0 and 1, got {image_only}")
        self.length, self.split, self.task, self.objects = length, split, task, objects
        self.size, self.seed, self.block_a, self.image_only = size, seed, block_a, image_only
        self._fixed = self._unique_sets() if split != "train" else None
        self._draw_cached = lru_cache(maxsize=cache)(self._draw_index)

    def __len__(self) -> int:
        return self.length

    def with_task(self, task: str) -> "ObjectsDataset":
        """The same items (same images, same object order) for another task."""
        return ObjectsDataset(self.length, self.split, task=task, objects=self.objects, size=self.size,
                              seed=self.seed, block_a=self.block_a, image_only=self.image_only)

    # ------------------------------------------------------------------ content
    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.split}/{index}")

    def _random_set(self, rng: random.Random) -> list[tuple]:
        """Objects in random (caption) order, drawn until the set belongs to this split."""
        while True:
            cells = rng.sample(range(9), self.objects)
            objs = [(rng.choice(SIZES), rng.choice(list(COLORS)), rng.choice(SHAPES), c) for c in cells]
            if allowed(objs, self.split):
                return objs

    def _unique_sets(self) -> list[list[tuple]]:
        rng = self._rng(-1)
        seen, out = set(), []
        for _ in range(self.length * 1000):
            objs = self._random_set(rng)
            key = frozenset(objs)
            if key not in seen:
                seen.add(key)
                out.append(objs)
                if len(out) == self.length:
                    return out
        raise ValueError(f"length: could not draw {self.length} distinct {self.split} object sets")

    def objects_of(self, i: int) -> list[tuple]:
        """Sample ``i``'s objects ``(size, colour, shape, cell)``, in caption order."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self._fixed is not None:
            return list(self._fixed[i])
        return self._random_set(self._rng(i))

    def attributes(self, i: int) -> dict:
        """Probe targets of sample ``i``: ``{"obj1.color": index, ...}`` with objects in cell order
        (obj1 the one in the lowest cell), each attribute an index into its word list."""
        out = {}
        for k, (size, color, shape, cell) in enumerate(sorted(self.objects_of(i), key=lambda o: o[3]), 1):
            values = {"size": SIZES.index(size), "color": list(COLORS).index(color), "shape": SHAPES.index(shape),
                      "row": cell // 3, "col": cell % 3}
            out.update({f"obj{k}.{name}": v for name, v in values.items()})
        return out

    def __getitem__(self, i: int) -> Sample:
        objs = self.objects_of(i)
        image = self._draw_cached(i)
        phrases = [phrase(o) for o in objs]
        if self.task == "bridge":
            if self.image_only and random.Random(f"{self.seed}/{self.split}/{i}/a").random() < self.image_only:
                return Sample(image=image, target=" ".join(phrases))
            return Sample(image=image, text=" ".join(phrases[: self.block_a]), target=" ".join(phrases[self.block_a:]))
        caption = " ".join(phrases)
        if self.task == "retrieval":
            return Sample(image=image, positive=Sample(text=caption))
        return Sample(image=image, text=caption)

    # ------------------------------------------------------------------ drawing
    def _draw_index(self, i: int):
        rng = random.Random(f"{self.seed}/{self.split}/{i}/draw")
        return draw(self.objects_of(i), self.size, rng)


def draw(objects, size: int, rng: random.Random):
    """An RGB image of ``objects`` on a 3 x 3 grid; positions jittered inside their cells."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), _BACKGROUND)
    pen = ImageDraw.Draw(img)
    cell = size / 3
    for obj_size, color, shape, c in objects:
        radius = cell * (0.4 if obj_size == "large" else 0.22)
        slack = cell / 2 - radius - 1
        cx = (c % 3 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-slack, slack)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return img


def masked_target_bits(mask_rate: float = 0.7, objects: int = 2, block_a: int | None = None) -> dict:
    """How many bits of a stage-2 block B remain unknown without the image, by enumeration.

    Enumerates every train-split object set of ``objects`` objects in every caption order, and
    every choice of the masked words of block B (``max(1, round(mask_rate * words))`` of them,
    the collator's rule), all equally likely; whoever sees block A's text and B's visible words
    but not the image can at best narrow B down to the sets that agree with what they see. Returns
    the conditional entropy of B's masked words, mean and minimum over what is seen, in bits:
    ``{"mean": ..., "min": ..., "masked_words": k}``. Exact for 2 objects (a few seconds); the
    count grows fast with more.
    """
    block_a = objects - objects // 2 if block_a is None else block_a
    objs = [(s, c, sh, cell) for s in SIZES for c in COLORS for sh in SHAPES for cell in range(9)]
    words_b = 5 * (objects - block_a)
    k = min(words_b, max(1, round(mask_rate * words_b)))
    hidden_sets = list(combinations(range(words_b), k))
    groups: Counter = Counter()
    for combo in combinations(objs, objects):
        if len({o[3] for o in combo}) < objects or not allowed(combo, "train"):
            continue
        for order in permutations(combo):
            a_text = " ".join(phrase(o) for o in order[:block_a])
            b_words = " ".join(phrase(o) for o in order[block_a:]).split()
            for hidden in hidden_sets:
                visible = tuple(w if j not in hidden else None for j, w in enumerate(b_words))
                groups[(a_text, hidden, visible)] += 1
    total = sum(groups.values())
    # every (set, order, mask) is equally likely; within a group of n, the masked words are 1 of n
    mean = sum(n * math.log2(n) for n in groups.values()) / total
    return {"mean": mean, "min": math.log2(min(groups.values())), "masked_words": k}
