"""``python -m bench --cpu``: our PyTorch attention path against SDPA (dense boolean mask) on
the CPU, at the demo's shapes (``workloads.cpu_attention_workloads``), with 1 and 2 threads.

A shared CPU's load changes from second to second, so the implementations are timed in turns
(ours, SDPA, ours, SDPA, ...) rather than one after the other: both medians see the same load.
Each row also records the median CPU time of the process per call (``fwd_cpu_ms``,
``fwdbwd_cpu_ms``): with one thread it hardly depends on what else the machine runs.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from . import attention_impls, workloads
from .measure import _throughput, error_note
from .schema import add_note, new_row

IMPLS = ("cocoa", "sdpa")


def _timed_in_turns(fns: dict, policy) -> dict:
    """{name: (wall ms list, cpu ms list)} for each ``fn(i)``, called in turns after warm-up."""
    for name, fn in fns.items():
        for i in range(policy.warmup):
            fn(i % 2)
    times = {name: ([], []) for name in fns}
    spent, rep = 0.0, 0
    while rep < policy.max_reps and (rep < policy.min_reps or spent < policy.target_ms):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn(rep % 2)
            times[name][0].append((time.perf_counter() - wall) * 1e3)
            times[name][1].append((time.process_time() - cpu) * 1e3)
            spent += times[name][0][-1]
        rep += 1
    return times


def _measure_workload(w, impls, policy, device) -> list[dict]:
    mask = w.mask(device)
    pairs = workloads.visible_pairs(mask)
    flops = workloads.attention_flops(pairs, w.shape)
    inputs = workloads.make_attention_inputs(w.n, w.shape, device, copies=2)
    rows, calls = {}, {}
    for name in impls:
        impl = attention_impls.IMPLS[name]
        row = new_row("attention", w.name, name, ours=impl.ours, group=w.group, n_tokens=w.n_tokens,
                      visible_pairs=pairs, threads=w.threads)
        rows[name] = row
        try:
            prepared = impl.prepare(w, mask, w.shape, device)
        except Exception as e:
            add_note(row, f"set-up: {error_note(e)}")
            continue
        row.update(prepared.info)
        calls[name] = prepared.call

    def fwd(call):
        return lambda i: call(inputs[i])

    def fwdbwd(call):
        return lambda i: torch.autograd.grad(call(inputs[i]), inputs[i].leaves, inputs[i].dout)

    for key, make in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        try:
            times = _timed_in_turns({name: make(call) for name, call in calls.items()}, policy)
        except Exception as e:
            for name in calls:
                add_note(rows[name], f"{key}: {error_note(e)}")
            continue
        for name, (wall, cpu) in times.items():
            rows[name][f"{key}_ms"] = statistics.median(wall)
            rows[name][f"{key}_cpu_ms"] = statistics.median(cpu)
            rows[name]["reps"] = len(wall)
    reference = None
    for name in calls:  # ours first (IMPLS order): the reference the peer is checked against
        row = rows[name]
        add_note(row, "peak memory is measured on CUDA only")
        _throughput(row, flops)
        try:
            out = calls[name](inputs[0]).detach().float()
        except Exception as e:
            add_note(row, f"output check: {error_note(e)}")
            continue
        if row.get("ours"):
            reference = out
        elif reference is not None:
            err = ((out - reference).norm() / reference.norm()).item()
            row["rel_err_vs_ours"] = err
            if not err <= 2e-2:
                add_note(row, f"output differs from ours (rel. err. {err:.2e}): check the mask given to this impl")
    return list(rows.values())


def run_cpu_attention(opts, results, budget, section: str = "cpu") -> None:
    device = opts.device
    impls = [name for name in IMPLS if name in opts.attention_impls]
    before = torch.get_num_threads()
    results.data.setdefault("config", {})["load_average_start"] = _load_average()
    try:
        for w in workloads.cpu_attention_workloads(opts.smoke):
            if budget.expired(section):
                for name in impls:
                    row = new_row("attention", w.name, name, ours=attention_impls.IMPLS[name].ours, group=w.group,
                                  n_tokens=w.n_tokens, threads=w.threads)
                    add_note(row, budget.skip_note(section))
                    results.add(row)
                continue
            torch.set_num_threads(w.threads)
            for row in _measure_workload(w, impls, opts.policy, device):
                results.add(row)
    finally:
        torch.set_num_threads(before)
        results.data["config"]["load_average_end"] = _load_average()


def _load_average():
    """The machine's 1/5/15-minute load averages (other processes compete for the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
