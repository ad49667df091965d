"""``python -m bench --cpu --only cpu_loss``: the fused linear cross-entropy on the CPU against
torch's own ``F.linear_cross_entropy`` (chunked and dense) and plain PyTorch, forward + backward,
one thread, fp32.

Each (workload, implementation) runs in a process of its own, so its peak resident memory
(``peak_mem_mb``, ``getrusage`` ru_maxrss) is its own: ``rss_added_mb`` is that peak minus the
process's peak before the first call (after imports and inputs), the memory the loss itself
needed. Time: the median (and ``best_ms``, the minimum) of the timed calls after one warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from . import loss_impls
from .cpu_attention import _load_average
from .measure import error_note
from .schema import add_note, new_row
from .workloads import LossWorkload, make_loss_inputs

WORKLOADS = {
    # issue 25's shape: 4,096 rows of which 40% count, H 512, V 32,768
    "lce_4k_v32k_40pct_fp32": LossWorkload("lce_4k_v32k_40pct_fp32", 4096, 512, 32768, 0.4, torch.float32),
    # the demo's stage-1 batch: 704 tokens of which ~18% are masked, H 64, its 25-word vocabulary
    "lce_demo_fp32": LossWorkload("lce_demo_fp32", 704, 64, 25, 0.18, torch.float32),
}
IMPLS = ("cocoa", "torch_lce", "torch_lce_dense", "torch_compact", "torch_full")
SMOKE_WORKLOADS = ("lce_demo_fp32",)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure(workload: str, impl: str, reps: int) -> dict:
    """In this process: one warm-up and ``reps`` timed forward + backward calls."""
    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    weight, (x,) = make_loss_inputs(w, torch.device("cpu"), copies=1)
    call = loss_impls.IMPLS[impl].prepare(w, torch.device("cpu")).call
    before = _peak_mb()
    times, loss = [], None
    for rep in range(reps + 1):
        weight.grad = x.hidden.grad = None
        start = time.perf_counter()
        loss = call(weight, x)
        loss.backward()
        if rep:
            times.append((time.perf_counter() - start) * 1e3)
    peak = _peak_mb()
    return {"fwdbwd_ms": statistics.median(times), "best_ms": min(times), "reps": reps, "peak_mem_mb": peak,
            "rss_added_mb": peak - before, "loss": float(loss.detach()), "grad_norm": float(x.hidden.grad.norm())}


def run_cpu_loss(opts, results, budget, section: str = "cpu_loss") -> None:
    names = [n for n in IMPLS if n in opts.loss_impls]
    reps = 1 if opts.smoke else 3
    config = results.data.setdefault("config", {})
    config.setdefault("load_average_start", _load_average())
    config["timing"] = (config.get("timing", "") + f"; loss rows (cpu_loss): one process per row, 1 thread, median "
                        f"(best_ms: minimum) of {reps} timed fwd+bwd calls after one warm-up").lstrip("; ")
    for workload in (SMOKE_WORKLOADS if opts.smoke else WORKLOADS):
        reference = None
        for name in names:
            impl = loss_impls.IMPLS[name]
            row = new_row("loss", workload, name, ours=impl.ours, threads=1, n_tokens=WORKLOADS[workload].tokens)
            results.add(row)
            if budget.expired(section):
                add_note(row, budget.skip_note(section))
                continue
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # our CPU path, not the interpreter
            done = subprocess.run([sys.executable, "-m", "bench.cpu_loss", workload, name, str(reps)],
                                  capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                add_note(row, error_note(RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                                                      else f"exit {done.returncode}")))
                continue
            got = json.loads(lines[-1])
            if "unavailable" in got:
                add_note(row, got["unavailable"])
                continue
            row.update({k: got[k] for k in ("fwdbwd_ms", "best_ms", "reps", "peak_mem_mb", "rss_added_mb")})
            row["detail"] = f"one process per row, 1 thread; loss {got['loss']:.6f}, |d hidden| {got['grad_norm']:.6f}"
            add_note(row, "fwd+bwd only; peak memory: the process's peak RSS")
            if impl.ours:
                reference = got["loss"]
            elif reference is not None:
                row["rel_err_vs_ours"] = abs(got["loss"] - reference) / abs(reference)
            results.write()


if __name__ == "__main__":  # one measurement, in its own process
    from .measure import Unavailable

    try:
        print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
    except Unavailable as e:
        print(json.dumps({"unavailable": str(e)}))
