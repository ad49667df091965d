"""``python -m bench``: run the benchmarks and write ``<date>-<gpu>.json``.

    python -m bench                          # everything, on the GPU, into bench/results/
    python -m bench --only attention,loss    # some sections
    python -m bench --budget-s 240           # skip (and record as skipped) what does not fit
    python -m bench --smoke --out /tmp/b     # tiny sizes on the CPU (Triton interpreter)
    python -m bench --cpu                    # the PyTorch attention path vs SDPA on this CPU

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU with perf_counter timing (checks the harness)")
    p.add_argument("--cpu", action="store_true", help="the CPU section: our PyTorch attention path vs dense-mask SDPA "
                   "at the demo's shapes, 1 and 2 threads (with --smoke: tiny sizes)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results, or runs/bench-smoke with --smoke)")
    p.add_argument("--name", default=None, help="results file name (default: <date>-<gpu>.json)")
    p.add_argument("--only", type=_csv, default=None, help="comma-separated sections: attention,loss,sweep,e2e (--cpu: cpu)")
    p.add_argument("--attention-impls", type=_csv, default=None, help="cocoa,flex_attention,sdpa,flash_attn")
    p.add_argument("--loss-impls", type=_csv, default=None, help="cocoa,cocoa_filtered,torch_compact,torch_full,liger,cut_cross_entropy,cut_cross_entropy_exact,torch_lce,torch_lce_dense")
    p.add_argument("--e2e-impls", type=_csv, default=None, help="cocoa_triton,sdpa,flex_attention,cocoa_triton+lce")
    p.add_argument("--e2e-layers", type=int, default=None, help="decoder layers of the end-to-end model (default 28; smoke 2)")
    p.add_argument("--sweep", type=lambda s: tuple(int(x) for x in _csv(s)), default=None,
                   help="sequence lengths of the bridge sweep (default 1024,...,32768)")
    p.add_argument("--budget-s", type=float, default=None, help="soft wall-clock budget for all sections, in seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from . import attention_impls, e2e, loss_impls
    from .budget import Budget
    from .environment import device_info, today, versions
    from .render import markdown
    from .runner import CPU_SECTIONS, SECTIONS, RunOptions, default_policies, run
    from .schema import ResultsFile, results_name, validate

    if args.smoke or args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("python -m bench: no CUDA device; the benchmarks need a GPU (use --smoke to check the harness on the CPU)",
              file=sys.stderr)
        return 2

    def pick(given, known, what):
        chosen = given or tuple(known)
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise SystemExit(f"python -m bench: unknown {what} {unknown}; known: {list(known)}")
        return chosen

    sections = pick(args.only, CPU_SECTIONS if args.cpu else SECTIONS, "section")
    policy, e2e_policy = default_policies(args.smoke, cpu=args.cpu)
    layers = args.e2e_layers if args.e2e_layers is not None else (None if args.smoke else 28)
    opts = RunOptions(
        device=device, smoke=args.smoke, sections=sections,
        attention_impls=pick(args.attention_impls, attention_impls.IMPLS, "attention impl"),
        loss_impls=pick(args.loss_impls, loss_impls.IMPLS, "loss impl"),
        e2e_impls=pick(args.e2e_impls, e2e.IMPLS, "e2e impl"),
        e2e_layers=layers, sweep_sizes=args.sweep, policy=policy, e2e_policy=e2e_policy,
    )

    info = device_info(device)
    date = today()
    out_dir = args.out or ("runs/bench-smoke" if args.smoke else os.path.join(os.path.dirname(__file__), "results"))
    path = os.path.join(out_dir, args.name or results_name(date, info["slug"], args.smoke))
    header = {
        "date": date,
        "device": info["name"],
        "device_info": info,
        "versions": versions(),
        "config": {
            "smoke": args.smoke, "cpu": args.cpu, "sections": list(sections), "budget_s": args.budget_s,
            "timing": "CUDA events, median" if device.type == "cuda" else (
                ("attention rows (cpu): time.perf_counter, median of calls made in turns with the peer (smoke: 1 "
                 "run); process CPU time in fwd_cpu_ms/fwdbwd_cpu_ms" if "cpu" in sections else "")
                if args.cpu else "time.perf_counter, median (smoke: 1 run)"),
            "policy": vars(policy) if hasattr(policy, "__dict__") else str(policy),
            "flops": "attention: 4*D per visible (query, key) pair and query head forward, 2.5x that backward; "
                     "loss: 2*T_counted*V*H forward, 2x that backward; backward time = fwd+bwd - fwd",
            "command": " ".join(["python -m bench"] + list(sys.argv[1:] if argv is None else argv)),
        },
    }

    def log_row(row):
        figures = ", ".join(f"{k}={row[k]:.3g}" for k in ("fwd_ms", "fwdbwd_ms", "peak_mem_mb") if row.get(k) is not None)
        print(f"  {row['op']:9} {row['workload']:22} {row['impl']:18} {figures or '-'}"
              + (f"  [{row['note']}]" if row.get("note") else ""), flush=True)

    results = ResultsFile(path, header, on_add=log_row)
    budget = Budget(args.budget_s, sections)
    print(f"[bench] {info['name']} -> {path}", flush=True)
    run(opts, results, budget, log=lambda m: print(m, flush=True))
    results.data["config"]["elapsed_s"] = round(budget.elapsed_s(), 1)
    results.write()

    problems = validate(results.data)
    print()
    print(markdown(results.data))
    print(f"[bench] wrote {path} ({len(results.data['rows'])} rows, {budget.elapsed_s():.0f} s)")
    for problem in problems:
        print(f"[bench] schema problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:
        # Before anything imports Triton: run our kernels through its CPU interpreter (only when
        # run as a program; main() called in-process leaves the environment alone).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
