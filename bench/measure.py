"""Fill one result row: forward and forward+backward medians, peak memory, TFLOP/s, and a note
for everything that could not be measured (errors become text, never a crash of the run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .schema import add_note
from .timing import Policy, free_memory, peak_memory_mb, time_ms


class Unavailable(Exception):
    """An implementation cannot run this workload here; the message becomes the row's note
    ("not installed: ...", "unsupported mask: ...", "needs CUDA ...")."""


@dataclass
class Prepared:
    """What an implementation adapter hands the runner for one workload.

    ``call(x)`` runs the forward on one input copy. ``backward`` False means only the forward
    can be measured here (``backward_note`` says why). ``info`` holds extra row fields
    (mask build time, mask memory, what exactly ran)."""

    call: Callable
    backward: bool = True
    backward_note: str | None = None
    info: dict = field(default_factory=dict)
    # A context manager factory the whole measurement (forward, backward, output check) runs in:
    # a setting that must also hold while autograd runs the backward.
    setting: Callable | None = None


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(e, oom)) or "out of memory" in str(e).lower()


def error_note(e: BaseException, limit: int = 300) -> str:
    if is_oom(e):
        return "out of memory"
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"error: {type(e).__name__}: {text}" if text else f"error: {type(e).__name__}"


def measure(
    row: dict,
    fwd: Callable[[int], object],
    fwdbwd: Callable[[int], object] | None,
    n_copies: int,
    device: torch.device,
    policy: Policy,
    flops: tuple[float, float] | None,
    backward_note: str | None = None,
) -> None:
    """Time ``fwd`` then ``fwdbwd`` (None: forward only), take the peak memory of the larger of
    the two, and derive TFLOP/s (backward time = fwd+bwd time - fwd time)."""
    try:
        row["fwd_ms"], row["reps"] = time_ms(fwd, n_copies, device, policy)
    except Exception as e:
        add_note(row, f"forward: {error_note(e)}")
        free_memory(device)
        return
    if fwdbwd is None:
        add_note(row, backward_note or "backward not measured")
    else:
        try:
            row["fwdbwd_ms"], _ = time_ms(fwdbwd, n_copies, device, policy)
        except Exception as e:
            add_note(row, f"forward+backward: {error_note(e)}")
            free_memory(device)
    try:
        row["peak_mem_mb"] = peak_memory_mb(fwdbwd if row["fwdbwd_ms"] is not None else fwd, device)
        if row["peak_mem_mb"] is None:
            add_note(row, "peak memory is measured on CUDA only")
        elif row["fwdbwd_ms"] is None:
            add_note(row, "peak memory of the forward alone")
    except Exception as e:
        add_note(row, f"peak memory: {error_note(e)}")
        free_memory(device)
    _throughput(row, flops)


def _throughput(row: dict, flops: tuple[float, float] | None) -> None:
    if flops is None:
        if row["fwd_ms"] is not None:
            add_note(row, "TFLOP/s not computed for this op")
        return
    fwd_ms, total_ms = row["fwd_ms"], row["fwdbwd_ms"]
    if fwd_ms is not None and fwd_ms > 0:
        row["tflops_fwd"] = flops[0] / (fwd_ms * 1e9)
    elif fwd_ms is not None:
        add_note(row, "forward time below the clock's resolution")
    if fwd_ms is not None and total_ms is not None:
        if total_ms > fwd_ms:
            row["tflops_bwd"] = flops[1] / ((total_ms - fwd_ms) * 1e9)
        else:
            add_note(row, "backward time not resolved (fwd+bwd median <= fwd median)")
