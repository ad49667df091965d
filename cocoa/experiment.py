"""``cocoa experiment``: the demo's comparison over a grid of seeds and labelled-pool sizes.

For every seed: stage 0 and its gate, then each arm's stages before stage 3 (once per seed:
they use only the unlabelled pool). For every labelled-pool size: stage 3 of every arm and
seed. With several stage-3 learning rates (``lrs``), each arm first gets its own: every
candidate is run on the first seed at the smallest pool and the one with the best validation
recall (t2i@1 + i2t@1 on the val split, never the eval items) at the last step is used for the
whole grid. Every piece is cached under the run folder (see ``cocoa.demo``), so an interrupted
experiment resumes where it stopped; a progress bar counts optimizer steps.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from .demo import ARMS, METRICS, DemoConfig, Setup, _write_json, plot_report, prepare_arm, run_stage0, run_stage3
from .demo import arm_run, summarize_arms, verdict


def _val_score(result: dict) -> float:
    val = result["val_curve"]
    return val["t2i@1"][-1] + val["i2t@1"][-1]


def run_experiment(out_dir: str | Path = "runs/experiment", config: DemoConfig | None = None, *,
                   pools=(128, 512), lrs=(1e-3,), workers: int = 1, progress: bool = True) -> dict:
    """Run the grid; write ``report.json`` and one plot per pool (``curves_pool{N}.png``) in
    ``out_dir``; return the report. ``workers`` > 1 runs independent pieces (seeds' stages 0-2,
    stage-3 runs) in that many processes, one torch thread each."""
    from tqdm.auto import tqdm

    cfg = config or DemoConfig()
    pools = sorted(int(p) for p in pools)
    lrs = [float(lr) for lr in lrs]
    if not pools or not lrs:
        raise ValueError("pools and lrs: give at least one value each")
    if max(pools) > cfg.unlabelled:
        raise ValueError(f"pools: a labelled pool ({max(pools)}) larger than the unlabelled one ({cfg.unlabelled})")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    start = time.time()
    extra = cfg.stage1_steps + cfg.stage2_steps
    total = len(cfg.seeds) * (cfg.stage0_steps + 2 * extra + len(pools) * len(ARMS) * cfg.stage3_steps)
    if len(lrs) > 1:
        total += len(ARMS) * (len(lrs) - 1) * cfg.stage3_steps
    bar = tqdm(total=total, desc="experiment", unit="step", disable=not progress, position=0, leave=True)

    def advance(steps: int, what: str) -> None:
        bar.update(steps)
        bar.set_postfix_str(what)

    run = _Runner(cfg, out_dir, workers)
    prepared, stage0, gates = {}, {}, {}
    # 1. per seed: stage 0, its gate, every arm's stages before stage 3 (seeds in parallel)
    for (seed,), (s0, arms_before) in run.map(_prepare_seed, [(seed,) for seed in cfg.seeds]):
        advance(cfg.stage0_steps + 2 * extra, f"seed {seed} ready for stage 3")
        gates[str(seed)] = s0["gate"]
        stage0[str(seed)] = {"loss": s0["loss"], "gate": s0["gate"]}
        if arms_before is None:
            bar.write(f"seed {seed}: stage-0 gate failed (gap {s0['gate']['gap']:.2f}); its arms are skipped")
            advance(len(pools) * len(ARMS) * cfg.stage3_steps, f"seed {seed} skipped")
            continue
        for arm, before in arms_before.items():
            prepared[(seed, arm)] = before

    stage0 = {str(seed): stage0[str(seed)] for seed in cfg.seeds}  # seeds in the config's order
    gates = {str(seed): gates[str(seed)] for seed in cfg.seeds}
    seed_rank = {seed: k for k, seed in enumerate(cfg.seeds)}

    def _in_order(item):
        (seed, arm), _ = item
        return seed_rank[seed], ARMS.index(arm)

    # 2. per arm: the stage-3 learning rate, chosen on the validation split (first seed, smallest pool)
    lr_choice = {}
    tune_seed = next((s for s in cfg.seeds if (s, ARMS[0]) in prepared), None)
    tuning = len(lrs) > 1 and tune_seed is not None
    jobs = [(tune_seed, arm, prepared[(tune_seed, arm)][0], pools[0], lr) for arm in ARMS for lr in lrs]
    jobs = jobs if tuning else []
    tried = {arm: {} for arm in ARMS}
    for (_, arm, _, _, lr), result in run.map(_stage3, jobs):
        tried[arm][f"{lr:g}"] = {"val": {m: result["val_curve"][m][-1] for m in METRICS}, "score": _val_score(result)}
        advance(cfg.stage3_steps, f"lr choice {arm} {lr:g}")
    for arm in ARMS:
        if not tuning:
            lr_choice[arm] = {"lr": lrs[0], "tried": {}}
            continue
        best = max(lrs, key=lambda lr: tried[arm][f"{lr:g}"]["score"])
        lr_choice[arm] = {"lr": best, "tried": tried[arm], "seed": tune_seed, "pool": pools[0]}

    # 3. stage 3 of every seed, pool and arm (the lr-choice runs are reused from the cache)
    jobs = [(seed, arm, weights, pool, lr_choice[arm]["lr"]) for pool in pools
            for (seed, arm), (weights, _, _) in prepared.items()]
    results = {}
    for (seed, arm, _, pool, _), result in run.map(_stage3, jobs):
        results[(seed, arm, pool)] = result
        tuned_here = tuning and seed == tune_seed and pool == pools[0]  # counted by the lr choice
        advance(0 if tuned_here else cfg.stage3_steps, f"pool {pool} seed {seed} {arm}")
    run.close()

    per_pool = {}
    for pool in pools:
        arms = {arm: {"seeds": {}} for arm in ARMS}
        for (seed, arm), (weights, stages, diagnostics) in sorted(prepared.items(), key=_in_order):
            lr = lr_choice[arm]["lr"]
            arms[arm]["seeds"][str(seed)] = arm_run(stage0[str(seed)]["loss"], stages, results[(seed, arm, pool)],
                                                    diagnostics, lr)
        arms = summarize_arms(arms)
        per_pool[str(pool)] = {"arms": arms, "verdict": verdict(arms, gates)}
    bar.close()

    report = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.time() - start, 1),
        "config": {**dataclasses.asdict(cfg), "pools": pools, "lrs": lrs},
        "lr_choice": lr_choice,
        "stage0": stage0,
        "pools": per_pool,
        "verdict": " | ".join(f"pool {p}: {r['verdict']}" for p, r in per_pool.items()),
        "gap_vs_gain": gap_vs_gain(per_pool),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "report.json", report)
    (out_dir / "summary.md").write_text(markdown_summary(report))
    plots = []
    for pool, result in per_pool.items():
        if result["arms"]:
            plot = plot_report({"arms": result["arms"]}, out_dir / f"curves_pool{pool}.png",
                               title=f"labelled pool {pool}, {len(cfg.seeds)} seeds")
            if plot:
                plots.append(str(plot))
    report["plots"] = plots
    return report


# ---------------------------------------------------------------------------------- jobs
# Each job builds its own Setup from (config, seed): datasets hold caches that do not pickle, and
# every result is on disk anyway (the cache makes a job that already ran return at once).
def _prepare_seed(cfg: DemoConfig, out_dir: Path, seed: int):
    setup = Setup(cfg, seed)
    _, s0, s0_final = run_stage0(setup, out_dir)
    if cfg.enforce_gate and not s0["gate"]["passed"]:
        return s0, None
    return s0, {arm: prepare_arm(setup, arm, s0_final, out_dir) for arm in ARMS}


def _stage3(cfg: DemoConfig, out_dir: Path, seed: int, arm: str, weights: Path, pool: int, lr: float):
    return run_stage3(Setup(cfg, seed), arm, weights, out_dir, labelled=pool, lr=lr)


def _one_thread():
    torch.set_num_threads(1)


class _Runner:
    """Runs jobs here (``workers == 1``) or in a pool of spawned processes; yields
    ``(args, result)`` as jobs finish (in order here, as they complete there)."""

    def __init__(self, cfg: DemoConfig, out_dir: Path, workers: int):
        self.cfg, self.out_dir, self.pool = cfg, out_dir, None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_one_thread)

    def map(self, fn, jobs: list):
        if self.pool is None:
            for args in jobs:
                yield args, fn(self.cfg, self.out_dir, *args)
            return
        from concurrent.futures import as_completed

        futures = {self.pool.submit(fn, self.cfg, self.out_dir, *args): args for args in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def gap_vs_gain(per_pool: dict) -> list:
    """Per pool and seed: cocoa's bridge swap gap beside its t2i@1 gain over the better of the
    other two arms (does the gain follow the bridge?)."""
    rows = []
    for pool, result in per_pool.items():
        arms = result["arms"]
        if not all(a in arms for a in ARMS):
            continue
        for seed, run in arms["cocoa"]["seeds"].items():
            best_other = max(arms[a]["seeds"][seed]["recall"]["t2i@1"] for a in ("contrastive_only", "compute_control"))
            rows.append({"pool": int(pool), "seed": int(seed), "swap_gap": run["diagnostics"]["bridge_swap_gap"]["gap"],
                         "t2i@1_gain": run["recall"]["t2i@1"] - best_other})
    return rows


def markdown_summary(report: dict) -> str:
    """The report's numbers as Markdown tables (written beside it as ``summary.md``): per pool,
    held-out recall mean ± std over seeds and the recall curve; per arm, the diagnostics."""
    def pm(result, m):
        return f"{result['mean'][m]:.3f} ± {result['std'][m]:.3f}"

    cfg = report["config"]
    lines = [f"Seeds {cfg['seeds']}, labelled pools {cfg['pools']}, stage-3 lrs tried {cfg['lrs']}; "
             f"wall {report['wall_s']:.0f} s on {report['device']}.", ""]
    for pool, result in report["pools"].items():
        arms = result["arms"]
        lines += [f"**Labelled pool {pool}** (held-out eval items; mean ± std over seeds)", "",
                  "| arm | stage-3 lr | " + " | ".join(METRICS) + " | t2i@1 along stage 3 |",
                  "|---|---|" + "---|" * len(METRICS) + "---|"]
        for arm, r in arms.items():
            curves = [run["curve"] for run in r["seeds"].values()]
            steps = curves[0]["steps"]
            along = ", ".join(f"{st}: {statistics.fmean(c['t2i@1'][i] for c in curves):.2f}"
                              for i, st in enumerate(steps))
            lr = next(iter(r["seeds"].values()))["stage3_lr"]
            lines.append(f"| {arm} | {lr:g} | " + " | ".join(pm(r, m) for m in METRICS) + f" | {along} |")
        lines += ["", f"Verdict: {result['verdict']}", ""]
    first = next(iter(report["pools"].values()))["arms"]
    lines += ["**Before stage 3** (validation items; per seed)", "",
              "| arm | seed | bridge swap gap (nats/word) | caption swap gap | probe acc. (chance) | EOS mean cos "
              "| pixel MSE (constant) |", "|---|---|---|---|---|---|---|"]
    for arm, r in first.items():
        for seed, run in r["seeds"].items():
            d = run["diagnostics"]
            pix = d["pixel"]
            lines.append(f"| {arm} | {seed} | {d['bridge_swap_gap']['gap']:+.2f}"
                         f"{' (carried nothing)' if d['bridge_carried_nothing'] else ''} | "
                         f"{d['caption_swap_gap']['gap']:+.2f} | {d['probe']['mean']['accuracy']:.2f} "
                         f"({d['probe']['mean']['chance']:.2f}) | {d['eos_mean_cosine']:.2f} | "
                         f"{pix['mse']:.2f} ({pix['constant']:.2f}) |")
    lines.append("")
    for arm, choice in report["lr_choice"].items():
        if choice["tried"]:
            tried = ", ".join(f"{lr}: {v['score']:.3f}" for lr, v in choice["tried"].items())
            lines.append(f"- stage-3 lr for {arm}: {choice['lr']:g} (validation t2i@1 + i2t@1 on seed "
                         f"{choice['seed']}, pool {choice['pool']}: {tried})")
    gates = ", ".join(f"seed {s}: {g['gate']['own']:.2f} own vs {g['gate']['swapped']:.2f} swapped"
                      for s, g in report["stage0"].items())
    lines.append(f"- stage-0 gate (held-out caption loss, nats/token): {gates}")
    return "\n".join(lines) + "\n"


def format_experiment(report: dict) -> str:
    """One table per pool (mean ± std over seeds of held-out recall) and the lr choice."""
    from .demo import format_table

    lines = []
    for pool, result in report["pools"].items():
        lines.append(f"labelled pool {pool}:")
        lines.append(format_table(result))
        lines.append("")
    for arm, choice in report["lr_choice"].items():
        tried = ", ".join(f"{lr}: {v['score']:.3f}" for lr, v in choice["tried"].items())
        lines.append(f"stage-3 lr for {arm}: {choice['lr']:g}" + (f" (val t2i@1+i2t@1: {tried})" if tried else ""))
    if report["gap_vs_gain"]:
        gaps = [r["swap_gap"] for r in report["gap_vs_gain"]]
        lines.append(f"cocoa bridge swap gap: mean {statistics.fmean(gaps):+.2f} nats/word over {len(gaps)} runs")
    return "\n".join(lines)
