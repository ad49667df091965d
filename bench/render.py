"""``python -m bench.render RESULTS.json``: a Markdown table and a PNG plot from a results file.

    python -m bench.render bench/results/2026-11-30-nvidia-h200.json            # writes .md and .png beside it
    python -m bench.render RESULTS.json --out-dir /tmp/render --no-plot

Every figure comes from the file: nothing is typed by hand. Ratios are "peer / ours": above 1
means ours is faster (time) or leaner (peak memory). Without matplotlib the table is still
written and the plot is reported as skipped. This module needs neither torch nor a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

from .schema import load, validate

TITLES = {
    "attention": "Attention",
    "loss": "Linear cross-entropy",
    "e2e": "End to end: one stage-2 training step",
}


# ---------------------------------------------------------------------------- helpers
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def ours_row(rows: list[dict], op: str, workload: str, held_to: str | None = None) -> dict | None:
    """Our row a peer is compared with: the one named by the peer's ``held_to`` (the loss: exact
    peers against our exact row, filtered against filtered), else our first row."""
    ours = [r for r in rows if r["op"] == op and r["workload"] == workload and r.get("ours")]
    named = [r for r in ours if held_to is not None and r["impl"] == held_to]
    return (named or ours or [None])[0]


def ratios(row: dict, ours: dict | None) -> tuple[float | None, str, float | None]:
    """(time ratio, which time it compares, memory ratio), all peer / ours."""
    if ours is None or row is ours:
        return None, "", None
    time_ratio, basis = None, ""
    for key, label in (("fwdbwd_ms", ""), ("fwd_ms", " (fwd)")):
        if row.get(key) and ours.get(key):
            time_ratio, basis = row[key] / ours[key], label
            break
    mem_ratio = row["peak_mem_mb"] / ours["peak_mem_mb"] if row.get("peak_mem_mb") and ours.get("peak_mem_mb") else None
    return time_ratio, basis, mem_ratio


def _impl_order(rows: list[dict]) -> list[str]:
    seen = []
    for row in sorted(rows, key=lambda r: not r.get("ours")):
        if row["impl"] not in seen:
            seen.append(row["impl"])
    return seen


# ---------------------------------------------------------------------------- Markdown
def _table(rows: list[dict], all_rows: list[dict]) -> list[str]:
    extra = []
    if any(r.get("mask_build_ms") is not None for r in rows):
        extra.append(("mask build ms", "mask_build_ms"))
    if any(r.get("tokens_per_s") is not None for r in rows):
        extra.append(("tokens/s", "tokens_per_s"))
    if any(r.get("rss_added_mb") is not None for r in rows):
        extra.append(("RSS added MiB", "rss_added_mb"))
    if any(r.get("held_to") for r in rows):
        extra.append(("held to", "held_to"))  # which of our rows the ratios compare with
    head = ["workload", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "TFLOP/s fwd", "TFLOP/s bwd"]
    head += [label for label, _ in extra] + ["peer/ours time", "peer/ours mem", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ours = ours_row(all_rows, row["op"], row["workload"], row.get("held_to"))
        t, basis, m = ratios(row, ours)
        cells = [row["workload"], f"**{row['impl']}**" if row.get("ours") else row["impl"],
                 _fmt(row["fwd_ms"]), _fmt(row["fwdbwd_ms"]), _fmt(row["peak_mem_mb"], 4),
                 _fmt(row["tflops_fwd"]), _fmt(row["tflops_bwd"])]
        cells += [_fmt(row.get(key)) for _, key in extra]
        cells += [("—" if t is None else _ratio(t) + basis), _ratio(m), row["note"] or ""]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _sweep_table(rows: list[dict], all_rows: list[dict]) -> list[str]:
    impls = _impl_order(rows)
    sizes = sorted({r["n_tokens"] for r in rows if r.get("n_tokens")})
    lines = ["| N | " + " | ".join(impls) + " |", "|" + "---|" * (len(impls) + 1)]
    for n in sizes:
        cells = [f"{n:,}"]
        for impl in impls:
            row = next((r for r in rows if r.get("n_tokens") == n and r["impl"] == impl), None)
            if row is None or row["fwdbwd_ms"] is None:
                cells.append("—")
                continue
            t, basis, _ = ratios(row, ours_row(all_rows, row["op"], row["workload"], row.get("held_to")))
            cells.append(_fmt(row["fwdbwd_ms"]) + ("" if t is None else f" ({_ratio(t)}{basis})"))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _versions_line(data: dict) -> str:
    v = data.get("versions", {})
    stack = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "cuda") if v.get(k))
    peers = v.get("peers") or {}
    peer_text = ", ".join(f"{k} {ver}" if ver else f"{k} not installed" for k, ver in peers.items())
    return f"{stack}; peers: {peer_text or 'none recorded'}."


def markdown(data: dict, plot_name: str | None = None, plot_note: str | None = None) -> str:
    rows = data.get("rows", [])
    device = data.get("device", "unknown device")
    out = [f"### Benchmarks on {device} ({data.get('date', 'undated')})", ""]
    out.append(_versions_line(data))
    config = data.get("config", {})
    info = data.get("device_info") or {}
    if config.get("cpu") and info.get("cores"):
        load = config.get("load_average_start")
        threads = ("; rows `_t1`/`_t2` ran with 1/2 torch threads"
                   if any(r["workload"].endswith(("_t1", "_t2")) for r in rows) else "")
        out += ["", f"CPU: {info.get('model') or info.get('processor')}, {info['cores']} cores{threads}"
                + (f"; load average {load[0]} when the run started (other processes share the cores)" if load else "")
                + "."]
    if config.get("smoke"):
        out.append("")
        out.append("**Smoke run (tiny sizes on the CPU): these numbers say nothing about speed.**")
    out += ["", f"Timing: {config.get('timing', 'unknown')}. FLOPs: {config.get('flops', 'see bench/README.md')}.",
            "Ratios are peer / ours: above 1 means ours is faster (time) or uses less peak memory."]
    for op in ("attention", "loss", "e2e"):
        main = [r for r in rows if r["op"] == op and r.get("group", "main") != "sweep"]
        if main:
            out += ["", f"#### {TITLES[op]}", ""]
            if op == "e2e" and config.get("e2e"):
                e = config["e2e"]
                out += [f"{e.get('model', '')}: {e.get('layers')} layers, {e.get('tokens')} tokens "
                        f"({e.get('scored_tokens')} scored); {e.get('step', '')}.", ""]
            out += _table(main, rows)
        sweep = [r for r in rows if r["op"] == op and r.get("group") == "sweep"]
        if sweep:
            out += ["", f"#### {TITLES[op]}: EOS-bridge sweep over N (fwd+bwd ms, peer/ours in brackets)", ""]
            out += _sweep_table(sweep, rows)
    if plot_name:
        out += ["", f"![ratios and N sweep]({plot_name})"]
    if plot_note:
        out += ["", plot_note]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- plot
def plot(data: dict, path: str) -> str | None:
    """Write the PNG; return None, or a sentence saying why the plot was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not installed."
    rows = data.get("rows", [])
    fig, (ax_ratio, ax_sweep) = plt.subplots(1, 2, figsize=(15, 5.5))

    main = [r for r in rows if r.get("group", "main") != "sweep" and not r.get("ours")]
    groups: dict[str, list[tuple[str, float]]] = {}
    for r in main:
        t, _, _ = ratios(r, ours_row(rows, r["op"], r["workload"], r.get("held_to")))
        groups.setdefault(f"{r['op']}: {r['workload']}", [])
        if t:
            groups[f"{r['op']}: {r['workload']}"].append((r["impl"], t))
    labels = list(groups)
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(_impl_order(main))}
    widest = max((len(v) for v in groups.values()), default=1) or 1
    width = 0.8 / widest
    legend = {}
    for i, key in enumerate(labels):
        bars = groups[key]
        for j, (impl, t) in enumerate(bars):
            x = i + (j - (len(bars) - 1) / 2) * width
            # Bars grow from 1 (parity) up or down to the ratio.
            legend[impl] = ax_ratio.bar(x, t - 1.0, bottom=1.0, width=width, color=colors[impl])
    drawn = bool(legend)
    ax_ratio.axhline(1.0, color="black", linewidth=0.8)
    ax_ratio.set_xticks(range(len(labels)))
    ax_ratio.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax_ratio.set_ylabel("peer time / ours (fwd+bwd; >1: ours faster)")
    ax_ratio.set_title("Time of each peer relative to ours")
    if drawn:
        ax_ratio.set_yscale("log")
        ax_ratio.legend(list(legend.values()), list(legend), fontsize=8)
    else:
        ax_ratio.text(0.5, 0.5, "no peer measured", ha="center", va="center", transform=ax_ratio.transAxes)

    sweep = [r for r in rows if r.get("group") == "sweep" and r.get("fwdbwd_ms") and r.get("n_tokens")]
    for impl in _impl_order(sweep):
        pts = sorted((r["n_tokens"], r["fwdbwd_ms"]) for r in sweep if r["impl"] == impl)
        ax_sweep.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax_sweep.set_title("EOS bridge: fwd+bwd time over N")
    ax_sweep.set_xlabel("N (tokens)")
    ax_sweep.set_ylabel("fwd+bwd ms")
    if sweep:
        sizes = sorted({r["n_tokens"] for r in sweep})
        ax_sweep.set_xscale("log", base=2)
        ax_sweep.set_yscale("log")
        ax_sweep.set_xticks(sizes)
        ax_sweep.set_xticklabels([f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in sizes])
        ax_sweep.minorticks_off()
        ax_sweep.legend(fontsize=8)
    else:
        ax_sweep.text(0.5, 0.5, "no sweep measured", ha="center", va="center", transform=ax_sweep.transAxes)
    fig.suptitle(f"{data.get('device', '')} {data.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------- CLI
def render(results_path: str, out_dir: str | None = None, with_plot: bool = True) -> dict:
    """Write ``<stem>.md`` (and ``<stem>.png``) and return their paths and the plot status."""
    data = load(results_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(results_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(results_path))[0]
    png = os.path.join(out_dir, stem + ".png")
    note = plot(data, png) if with_plot else "Plot skipped (--no-plot)."
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(data, plot_name=None if note else os.path.basename(png), plot_note=note))
    return {"markdown": md_path, "plot": None if note else png, "plot_note": note, "problems": validate(data)}


def splice(doc_path: str, results_path: str, text: str) -> None:
    """Replace what lies between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in
    ``doc_path`` (NAME: the results file's name) with ``text``, so a document quotes a results
    file without anyone typing a figure."""
    name = os.path.basename(results_path)
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    with open(doc_path) as f:
        doc = f.read()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"python -m bench.render: {doc_path} needs one {begin} ... {end} pair to write into")
    head, rest = doc.split(begin)
    tail = rest.split(end)[1]
    with open(doc_path, "w") as f:
        f.write(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a results JSON written by python -m bench")
    p.add_argument("--out-dir", default=None, help="where to write <stem>.md and <stem>.png (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--into", default=None, metavar="DOC.md",
                   help="also write the tables between the <!-- bench:RESULTS.json --> markers of DOC.md")
    args = p.parse_args(argv)
    done = render(args.results, args.out_dir, with_plot=not args.no_plot)
    if args.into:
        splice(args.into, args.results, markdown(load(args.results)))
        print(f"written into: {args.into}")
    print(f"table: {done['markdown']}")
    print(f"plot: {done['plot']}" if done["plot"] else done["plot_note"])
    for problem in done["problems"]:
        print(f"schema problem: {problem}", file=sys.stderr)
    return 1 if done["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
