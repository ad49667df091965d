"""Compaction of the rows that count, on the device.

``rows`` is a permutation of ``[0, T)`` that lists the counted rows first (in order), then the
ignored ones; ``count`` (a one-element int32 tensor on the same device) says how many count. The
forward kernel reads ``count`` on the device and never touches a slot at or past it, gathering
rows through ``rows`` (no (T, H) copy); the backward reads it on the host once, because it sizes
the backward's GEMMs, and gathers the counted rows into one (count, H) block.
"""

from __future__ import annotations

import torch


def compact_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """targets: (T,) integer. Returns ``rows`` (T,) int32, ``count`` (1,) int32 and the targets in
    slot order ``slot_targets`` (T,) int32 (meaningful for the first ``count`` slots)."""
    valid = targets != ignore_index
    # A stable sort of the 0/1 "ignored" flag puts counted rows first in their original order.
    rows = torch.argsort((~valid).to(torch.int32), stable=True).to(torch.int32)
    count = valid.sum(dtype=torch.int32).reshape(1)
    slot_targets = targets.index_select(0, rows).to(torch.int32)
    return rows, count, slot_targets
