"""The results format: one JSON file per run, a list of rows, and the check both sides rely on.

A results file is::

    {"schema": 1, "date": "2026-11-30", "device": "NVIDIA H200", "device_info": {...},
     "versions": {"torch": ..., "triton": ..., "transformers": ..., "peers": {...}},
     "config": {...how the run was set up...}, "rows": [ROW, ...]}

Every row has every key of ``ROW_KEYS``. A figure that was not measured is null, and then
``note`` says why (not installed, out of memory, unsupported mask, the error text, ...).
Rows may carry extra keys (``EXTRA_KEYS`` lists the ones this harness writes).
This module imports nothing heavy: the renderer and the tests use it without torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

SCHEMA_VERSION = 1

ROW_KEYS = ("op", "workload", "impl", "fwd_ms", "fwdbwd_ms", "peak_mem_mb", "tflops_fwd", "tflops_bwd", "note")
FIGURES = ("fwd_ms", "fwdbwd_ms", "peak_mem_mb", "tflops_fwd", "tflops_bwd")
TOP_KEYS = ("device", "versions", "date", "rows")
OPS = ("attention", "loss", "e2e")

EXTRA_KEYS = {
    "ours": "true for this project's implementation (the reference of every ratio)",
    "group": '"main" or "sweep" (attention over N)',
    "n_tokens": "tokens in the workload (rows x sequence length)",
    "mask_build_ms": "time to build the mask the impl needs from the interval mask (FlexAttention: "
    "create_block_mask, warm; SDPA: the dense boolean mask)",
    "mask_build_cold_ms": "the first create_block_mask call (includes any one-off set-up)",
    "mask_mb": "memory held by the mask the impl consumes",
    "rel_err_vs_ours": "|out - ours| / |ours| on the same inputs (forward output or loss value)",
    "tokens_per_s": "end to end: tokens of one training step / step time",
    "visible_pairs": "attention: visible (query, key) pairs per head",
    "reps": "timed repetitions behind each median",
    "detail": "what exactly ran (layout, compile mode, which loss)",
    "held_to": "loss: which of our rows the ratios compare with (exact peers: cocoa, filtered: cocoa_filtered)",
    "threads": "CPU rows: torch.set_num_threads while measured",
    "fwd_cpu_ms": "CPU rows: median process CPU time of the forward (load-independent with one thread)",
    "fwdbwd_cpu_ms": "CPU rows: median process CPU time of forward + backward",
    "best_ms": "CPU loss rows: the fastest timed forward + backward",
    "rss_added_mb": "CPU loss rows: peak RSS minus the process's peak before the first call (after imports "
    "and inputs): the memory the loss itself needed",
}


def new_row(op: str, workload: str, impl: str, **extra) -> dict:
    row = {key: None for key in ROW_KEYS}
    row.update(op=op, workload=workload, impl=impl)
    row.update(extra)
    return row


def add_note(row: dict, text: str) -> None:
    """Append ``text`` to the row's note (notes are '; '-separated, never duplicated)."""
    if not text:
        return
    parts = [p for p in (row.get("note") or "").split("; ") if p]
    if text not in parts:
        parts.append(text)
    row["note"] = "; ".join(parts)


def validate(data: dict) -> list[str]:
    """Everything wrong with a results object, as readable lines (empty when it is valid)."""
    problems = []
    if not isinstance(data, dict):
        return [f"results must be a JSON object, got {type(data).__name__}"]
    for key in TOP_KEYS:
        if key not in data:
            problems.append(f"missing top-level key {key!r}")
    versions = data.get("versions")
    if isinstance(versions, dict):
        for key in ("torch", "triton", "transformers", "peers"):
            if key not in versions:
                problems.append(f"versions lacks {key!r}")
    elif "versions" in data:
        problems.append("versions must be an object")
    rows = data.get("rows")
    if not isinstance(rows, list):
        return problems + ["rows must be a list"]
    for i, row in enumerate(rows):
        where = f"row {i} ({row.get('op')}/{row.get('workload')}/{row.get('impl')})" if isinstance(row, dict) else f"row {i}"
        if not isinstance(row, dict):
            problems.append(f"{where}: not an object")
            continue
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            problems.append(f"{where}: missing keys {missing}")
            continue
        if row["op"] not in OPS:
            problems.append(f"{where}: op must be one of {OPS}")
        for key in ("workload", "impl"):
            if not isinstance(row[key], str) or not row[key]:
                problems.append(f"{where}: {key} must be a non-empty string")
        for key in FIGURES:
            value = row[key]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{where}: {key} = {value!r} is not a finite non-negative number")
        nulls = [k for k in FIGURES if row[k] is None]
        if nulls and not (isinstance(row["note"], str) and row["note"].strip()):
            problems.append(f"{where}: {nulls} are null but the note does not say why")
        if row["note"] is not None and not isinstance(row["note"], str):
            problems.append(f"{where}: note must be a string or null")
    return problems


def results_name(date: str, device_slug: str, smoke: bool = False) -> str:
    return f"{date}-{device_slug}{'-smoke' if smoke else ''}.json"


class ResultsFile:
    """A results object that is rewritten (atomically) after every row, so a run that is
    killed part-way still leaves valid JSON with what it measured."""

    def __init__(self, path: str, header: dict, on_add=None):
        self.path = path
        self.on_add = on_add
        self.data = dict(header)
        self.data.setdefault("schema", SCHEMA_VERSION)
        self.data["rows"] = []
        self.write()

    def add(self, row: dict) -> dict:
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
                add_note(row, f"{key} was {value} (not finite)")
        self.data["rows"].append(row)
        self.write()
        if self.on_add is not None:
            self.on_add(row)
        return row

    def write(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, self.path)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
