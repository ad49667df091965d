"""The one sample type every collator reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """An input of any modality, and what the stages need beside it.

    ``image`` is a PIL image or a path (loaded lazily); ``text`` the input text; ``target`` the text
    block B reconstructs in stage 2 (if None, the text is split at a random point);
    ``positive``/``negatives`` are further Samples for the stage-3 contrastive loss;
    ``instruction`` the text put before the input in stage 3 (``[instruction][image][text]<EOS>``),
    replacing the stage's ``instruction`` when set (stages 0-2 do not read it).
    """

    image: Any = None
    text: str | None = None
    target: str | None = None
    positive: "Sample | None" = None
    negatives: list["Sample"] = field(default_factory=list)
    instruction: str | None = None
