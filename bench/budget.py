"""A wall-clock budget split among sections, so that a run fits the time a GPU lease allows.

Each section gets a share; deadlines are cumulative, so time a section leaves unused passes to
the next. A section that starts late (an earlier one overran) still gets half of its own share,
within the total. Once a section is past its deadline its remaining rows are recorded as skipped
(with a note), never silently dropped. A row already running is not interrupted: ``gpu_check.sh`` keeps
a hard ``timeout`` above this soft one, and the results file is rewritten after every row.
"""

from __future__ import annotations

import time

DEFAULT_SHARES = {"attention": 0.22, "loss": 0.10, "sweep": 0.30, "e2e": 0.38}


class Budget:
    def __init__(self, total_s: float | None, sections, shares: dict[str, float] | None = None):
        self.start = time.monotonic()
        self.total_s = total_s
        shares = shares or DEFAULT_SHARES
        weights = [(name, shares.get(name, 0.1)) for name in sections]
        whole = sum(w for _, w in weights) or 1.0
        self.deadlines: dict[str, float | None] = {}
        self.floors: dict[str, float] = {}
        acc = 0.0
        for name, w in weights:
            acc += w / whole
            self.deadlines[name] = None if total_s is None else self.start + acc * total_s
            self.floors[name] = 0.0 if total_s is None else 0.5 * (w / whole) * total_s

    def begin(self, section: str) -> None:
        """Mark the start of ``section``: it keeps at least half its share from now on, but
        never runs past the end of the whole budget."""
        deadline = self.deadlines.get(section)
        if deadline is None:
            return
        now = time.monotonic()
        self.deadlines[section] = min(self.start + self.total_s, max(deadline, now + self.floors[section]))

    def expired(self, section: str) -> bool:
        deadline = self.deadlines.get(section)
        return deadline is not None and time.monotonic() > deadline

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def skip_note(self, section: str) -> str:
        return f"skipped: section {section!r} ran past its share of the time budget ({self.total_s:.0f} s in all)"
