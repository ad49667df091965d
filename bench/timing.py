"""Clocks: CUDA events on a GPU, ``time.perf_counter`` on the CPU (smoke mode); medians; peak memory.

A timed function takes the index of an input copy (``fn(i)``) and its return value is dropped at
once, so that the inputs rotate among several copies (larger together than the L2 cache: a
repeated run over one buffer would time the cache) and no two autograd graphs live together.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Policy:
    """Warm-up calls (compilation, autotuning and caches happen there), then ``reps`` timed
    calls, with ``reps`` sized from one probe so that the timed calls take about ``target_ms``."""

    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 50
    target_ms: float = 300.0


SMOKE = Policy(warmup=0, min_reps=1, max_reps=1, target_ms=0.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable[[int], object], indices: list[int]) -> list[float]:
    out = []
    for i in indices:
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _time_cuda(fn: Callable[[int], object], indices: list[int], device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in indices]
    ends = [torch.cuda.Event(enable_timing=True) for _ in indices]
    synchronize(device)
    for start, end, i in zip(starts, ends, indices):
        start.record()
        fn(i)
        end.record()
    synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_ms(fn: Callable[[int], object], n_copies: int, device: torch.device, policy: Policy) -> tuple[float, int]:
    """Median milliseconds of ``fn`` over rotating input copies, and how many runs it is over."""

    def clock(indices):
        return _time_cuda(fn, indices, device) if device.type == "cuda" else _time_cpu(fn, indices)

    for i in range(policy.warmup):
        fn(i % n_copies)
    synchronize(device)
    if policy.max_reps <= 1:
        return clock([policy.warmup % n_copies])[0], 1
    probe = max(clock([policy.warmup % n_copies])[0], 1e-3)
    reps = min(policy.max_reps, max(policy.min_reps, math.ceil(policy.target_ms / probe)))
    times = clock([(policy.warmup + 1 + r) % n_copies for r in range(reps)])
    return statistics.median(times), reps


def peak_memory_mb(fn: Callable[[int], object], device: torch.device) -> float | None:
    """Peak memory allocated during one call above what was allocated before it (inputs and
    weights excluded, outputs and gradients included), in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(0)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def host_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of one call including a device synchronisation (for one-off set-up such as
    building a mask), and its result."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3, result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
