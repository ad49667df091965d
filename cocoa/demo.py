"""``cocoa demo``: does converting a captioner with CoCoA's stages 1-2 make stage 3 more data-efficient?

The claim under test: stages 1 -> 2 before contrastive training give better embeddings than
contrastive training alone *with the same contrastive data*. Everything runs on the built-in
objects data (``cocoa.data.objects``) with a tiny Qwen2-VL-shaped model, nothing downloaded:

- **stage 0, the novelist**: per seed, the model is first trained as a causal image captioner on
  the unlabelled pool (cached under the run folder, shared by every arm), and must pass a gate:
  held-out caption loss with the own image at least ``gate_margin`` nats below that with a
  swapped image. A captioner that ignores the image is no starting point for the method.
- **three arms from those weights**, each ending in the same stage 3 (same labelled pool,
  steps, batch, schedule, learning rate and temperature): ``contrastive_only`` (stage 3 alone),
  ``cocoa`` (stages 1 -> 2 -> 3 on the unlabelled pool) and ``compute_control`` (as many extra
  steps as stages 1-2, spent on more stage-0 captioning, then stage 3).
- **diagnostics before stage 3** (``cocoa.diagnostics``) on held-out validation items, and
  held-out retrieval recall on the eval items after every ``curve_every`` stage-3 steps.

Every stage's result is cached (JSON beside the weights), so a rerun with the same settings
picks up where an interrupted one stopped; ``cocoa experiment`` builds its grid on this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARMS = ("contrastive_only", "cocoa", "compute_control")
METRICS = ("t2i@1", "t2i@5", "i2t@1", "i2t@5")
NO_BRIDGE_GAP = 0.1  # nats per masked word: a bridge swap gap below this carried (almost) nothing


@dataclass
class DemoConfig:
    """Every setting of a demo run (the report repeats them). Steps are optimizer steps."""

    seeds: list = field(default_factory=lambda: [0])
    objects: int = 2  # objects per image (distinct cells of the 3 x 3 grid)
    image_size: int = 84  # pixels: 3 x 3 merged visual tokens of 28 px
    hidden_size: int = 64
    layers: int = 4
    batch_size: int = 32
    unlabelled: int = 50_000  # stages 0-2 draw from these train items
    labelled: int = 512  # stage 3 pairs: the first ``labelled`` of the unlabelled items
    eval_size: int = 200  # unique held-out items: recall (never used for any choice)
    val_size: int = 200  # unique held-out items apart from eval: gate, diagnostics, lr choice
    probe_train: int = 512  # train items the linear probes are fitted on
    stage0_steps: int = 1500
    stage0_lr: float = 2e-3
    stage1_steps: int = 300
    stage2_steps: int = 300
    recon_lr: float = 1e-3  # stages 1 and 2, and the compute control's extra captioning
    image_mask_rate: float = 0.5
    target_mask_rate: float = 0.7
    stage2_image_only: float = 0.0  # share of stage-2 samples with block A = the image alone, B = the caption
    stage3_steps: int = 300
    stage3_lr: float = 1e-3
    temperature: float = 0.05
    stage3_warmup: float = 0.1
    curve_every: int = 100  # held-out recall every this many stage-3 steps (and at the end)
    gate_margin: float = 1.0  # nats per caption token
    enforce_gate: bool = True  # False: run the arms even when the gate fails (tests)

    def __post_init__(self):
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.labelled > self.unlabelled:
            raise ValueError(f"labelled ({self.labelled}) must not exceed unlabelled ({self.unlabelled})")
        for name in ("stage0_steps", "stage1_steps", "stage2_steps", "stage3_steps", "curve_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.eval_size, self.val_size) < 2:
            raise ValueError("eval_size and val_size must be >= 2 (recall and swaps need pairs)")

    def key(self, *names) -> str:
        """A short hash of the named settings: cached results are reused only when they match."""
        values = {n: getattr(self, n) for n in names}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------- building blocks
class Setup:
    """Tokenizer, image processor, encoder and data of one seed."""

    def __init__(self, cfg: DemoConfig, seed: int):
        from .data.encoding import InputEncoder
        from .data.objects import WORDS
        from .embed import default_image_processor
        from .tiny import word_config, word_tokenizer

        self.cfg, self.seed = cfg, seed
        self.tokenizer = word_tokenizer(WORDS)
        self.config = word_config(self.tokenizer, hidden_size=cfg.hidden_size, layers=cfg.layers)
        self.processor = default_image_processor()
        self.encoder = InputEncoder(self.tokenizer, self.config, self.processor)
        self.unlabelled = self.dataset(cfg.unlabelled, "train")
        self.labelled = self.dataset(cfg.labelled, "train", task="retrieval")
        self.eval = self.dataset(cfg.eval_size, "eval")
        self.val = self.dataset(cfg.val_size, "val")
        self.probe = self.dataset(cfg.probe_train, "train")

    def dataset(self, length: int, split: str, **kwargs):
        """An ObjectsDataset of this seed with the config's objects and image size."""
        from .data.objects import ObjectsDataset

        return ObjectsDataset(length, split, objects=self.cfg.objects, size=self.cfg.image_size, seed=self.seed,
                              **kwargs)

    def new_model(self):
        """A fresh tiny model (vision tower on SDPA: its per-image attention calls dominate a
        CPU step otherwise; the language model runs the cocoa attention with the CoCoA masks)."""
        from .loading import load_model
        from .model import CocoaModel

        torch.manual_seed(self.seed)
        attn = {"": "cocoa_triton", "text_config": "cocoa_triton", "vision_config": "sdpa"}
        model = CocoaModel(load_model(self.config, attn_impl=attn, dtype=torch.float32))
        return model.to("cuda" if torch.cuda.is_available() else "cpu")

    def items(self, dataset, task: str | None = None) -> list:
        data = dataset.with_task(task) if task else dataset
        return [data[i] for i in range(len(data))]

    def recall(self, model, split: str = "eval") -> dict:
        from .embed import Embedder
        from .evaluate import retrieval_recall

        was_training = model.training
        result = retrieval_recall(Embedder(model.backbone, self.tokenizer, self.processor),
                                  self.items(self.eval if split == "eval" else self.val))
        model.train(was_training)
        return result


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def _train(setup: Setup, model, stage_cfg, dataset, out: Path) -> dict:
    """One stage, or its cached result (``out/result.json`` and ``out/final`` weights) loaded into
    ``model``. Returns ``{"steps", "loss"}``."""
    from .train import run_stage

    cached = _load_json(out / "result.json")
    if cached is not None and (out / "final" / "model.safetensors").is_file():
        model.load(out / "final")
        return cached
    result = run_stage(stage_cfg, model, setup.encoder, dataset, out, resume=True)
    result = {"steps": result["steps"], "loss": result["loss"]}
    _write_json(out / "result.json", result)
    return result


class RecallCurve:
    """A Trainer callback: held-out recall every ``every`` steps and at the last one (eval items
    for the curve, validation items for choosing the learning rate)."""

    def __init__(self, setup: Setup, model, every: int, total: int):
        from transformers import TrainerCallback

        self.setup, self.model, self.every, self.total = setup, model, every, total
        self.points = {"steps": [], "eval": [], "val": []}
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step
                if step % outer.every == 0 or step == outer.total:
                    outer.points["steps"].append(step)
                    outer.points["eval"].append(outer.setup.recall(outer.model, "eval"))
                    outer.points["val"].append(outer.setup.recall(outer.model, "val"))

        self.callback = _Callback()

    def result(self) -> dict:
        steps = self.points["steps"]
        return {name: {"steps": steps, **{m: [p[m] for p in self.points[split]] for m in METRICS}}
                for name, split in (("curve", "eval"), ("val_curve", "val"))}


def _stage_cfg(cfg: DemoConfig, stage: int, steps: int, lr: float, seed: int, **extra):
    from .train import StageConfig

    return StageConfig(stage=stage, steps=steps, batch_size=cfg.batch_size, lr=lr, seed=seed, **extra)


# ---------------------------------------------------------------------------------- the pipeline
def run_stage0(setup: Setup, run_dir: Path) -> tuple:
    """Stage 0 of one seed (cached): returns (model, ``{"steps", "loss", "gate"}``, weights folder)."""
    cfg = setup.cfg
    key = cfg.key("objects", "image_size", "hidden_size", "layers", "batch_size", "unlabelled", "stage0_steps",
                  "stage0_lr")
    out = run_dir / f"seed{setup.seed}" / f"stage0-{key}"
    model = setup.new_model()
    result = _train(setup, model, _stage_cfg(cfg, 0, cfg.stage0_steps, cfg.stage0_lr, setup.seed),
                    setup.unlabelled, out)
    if "gate" not in result:
        from .diagnostics import caption_swap_gap

        gap = caption_swap_gap(model, setup.encoder, setup.items(setup.val))
        result["gate"] = {**gap, "margin": cfg.gate_margin, "passed": gap["gap"] >= cfg.gate_margin}
        _write_json(out / "result.json", result)
    return model, result, out / "final"


def diagnose(setup: Setup, model) -> dict:
    """The diagnostics of ``cocoa.diagnostics`` for one model, on validation items."""
    from . import diagnostics as d

    cfg = setup.cfg
    val_bridge = setup.items(setup.val, "bridge")
    val_images = [s.image for s in val_bridge]
    states = d.eos_states(model, setup.encoder, val_images)
    probe_states = d.eos_states(model, setup.encoder, [s.image for s in setup.items(setup.probe)])
    probe = d.probe_attributes(probe_states, [setup.probe.attributes(i) for i in range(len(setup.probe))],
                               states, [setup.val.attributes(i) for i in range(len(setup.val))])
    gap = d.bridge_swap_gap(model, setup.encoder, val_bridge, mask_rate=cfg.target_mask_rate, seed=setup.seed)
    return {
        "bridge_swap_gap": gap,
        "bridge_carried_nothing": gap["gap"] < NO_BRIDGE_GAP,
        "caption_swap_gap": d.caption_swap_gap(model, setup.encoder, setup.items(setup.val)),
        "probe": probe,
        "eos_mean_cosine": d.mean_pairwise_cosine(states),
        "pixel": d.pixel_reconstruction(model, setup.encoder, setup.items(setup.val),
                                        mask_rate=cfg.image_mask_rate, seed=setup.seed),
    }


def prepare_arm(setup: Setup, arm: str, stage0_final: Path, run_dir: Path) -> tuple:
    """The arm's model just before stage 3 (cached): returns (weights folder, stages, diagnostics)."""
    cfg = setup.cfg
    base = run_dir / f"seed{setup.seed}" / arm
    model = setup.new_model()
    model.load(stage0_final)
    stages = {}
    if arm == "cocoa":
        names = ["stage1_steps", "stage2_steps", "recon_lr", "image_mask_rate", "target_mask_rate"]
        key = cfg.key(*names, *(["stage2_image_only"] if cfg.stage2_image_only else []))
        base = base / f"pre-{key}"
        stages["1"] = _train(setup, model, _stage_cfg(cfg, 1, cfg.stage1_steps, cfg.recon_lr, setup.seed,
                                                      image_mask_rate=cfg.image_mask_rate),
                             setup.unlabelled, base / "stage1")
        bridge = setup.dataset(cfg.unlabelled, "train", task="bridge", image_only=cfg.stage2_image_only)
        stages["2"] = _train(setup, model, _stage_cfg(cfg, 2, cfg.stage2_steps, cfg.recon_lr, setup.seed,
                                                      target_mask_rate=cfg.target_mask_rate),
                             bridge, base / "stage2")
        weights = base / "stage2" / "final"
    elif arm == "compute_control":
        key = cfg.key("stage1_steps", "stage2_steps", "recon_lr")
        base = base / f"pre-{key}"
        steps = cfg.stage1_steps + cfg.stage2_steps
        stages["0-extra"] = _train(setup, model, _stage_cfg(cfg, 0, steps, cfg.recon_lr, setup.seed + 1),
                                   setup.unlabelled, base / "stage0-extra")
        weights = base / "stage0-extra" / "final"
    elif arm == "contrastive_only":
        base = base / "pre"
        weights = stage0_final
    else:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    diag_file = base / "diagnostics.json"
    diagnostics = _load_json(diag_file)
    if diagnostics is None:
        diagnostics = diagnose(setup, model)
        _write_json(diag_file, diagnostics)
    return weights, stages, diagnostics


def run_stage3(setup: Setup, arm: str, weights: Path, run_dir: Path, *, labelled: int | None = None,
               lr: float | None = None) -> dict:
    """Stage 3 of one arm from ``weights`` (cached); returns ``{"steps", "loss", "curve", "val_curve"}``."""
    cfg = setup.cfg
    labelled = cfg.labelled if labelled is None else labelled
    lr = cfg.stage3_lr if lr is None else lr
    key = cfg.key("stage3_steps", "temperature", "stage3_warmup", "curve_every", "eval_size", "val_size")
    # which weights it starts from (their folder names carry the settings that made them)
    start = hashlib.sha1(str(Path(weights).resolve().relative_to(Path(run_dir).resolve())).encode()).hexdigest()[:6]
    out = run_dir / f"seed{setup.seed}" / arm / f"stage3-pool{labelled}-lr{lr:g}-{key}-from{start}"
    cached = _load_json(out / "result.json")
    if cached is not None:
        return cached
    from .train import run_stage

    model = setup.new_model()
    model.load(weights)
    data = setup.labelled if labelled == cfg.labelled else setup.dataset(labelled, "train", task="retrieval")
    curve = RecallCurve(setup, model, cfg.curve_every, cfg.stage3_steps)
    stage_cfg = _stage_cfg(cfg, 3, cfg.stage3_steps, lr, setup.seed, warmup_ratio=cfg.stage3_warmup,
                           loss={"temperature": cfg.temperature})
    result = run_stage(stage_cfg, model, setup.encoder, data, out, resume=False, callbacks=[curve.callback])
    result = {"steps": result["steps"], "loss": result["loss"], **curve.result()}
    result["recall"] = {m: result["curve"][m][-1] for m in METRICS}
    _write_json(out / "result.json", result)
    return result


# ---------------------------------------------------------------------------------- the report
def arm_run(stage0_loss: list, stages: dict, s3: dict, diagnostics: dict, lr: float) -> dict:
    """One arm and seed in the report: recall, diagnostics, every stage's losses, the curves."""
    all_stages = {"0": {"loss": stage0_loss}, **{k: {"loss": v["loss"]} for k, v in stages.items()},
                  "3": {"loss": s3["loss"]}}
    return {"recall": s3["recall"], "diagnostics": diagnostics, "stages": all_stages, "curve": s3["curve"],
            "val_curve": s3["val_curve"], "stage3_lr": lr}


def summarize_arms(arms: dict) -> dict:
    """``arms`` with each arm's mean and std over its seeds; arms that ran no seed are left out."""
    return {arm: {**result, **summarize(result["seeds"])} for arm, result in arms.items() if result["seeds"]}


def summarize(per_seed: dict) -> dict:
    """``{SEED: {"recall": {...}}}`` -> ``{"mean": {...}, "std": {...}}`` (std 0.0 for one seed)."""
    out = {"mean": {}, "std": {}}
    for m in METRICS:
        values = [r["recall"][m] for r in per_seed.values()]
        out["mean"][m] = statistics.fmean(values)
        out["std"][m] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def verdict(arms: dict, gates: dict | None = None) -> str:
    """Plain words: does ``cocoa`` beat both other arms on mean held-out t2i@1 and i2t@1?"""
    if gates and not all(g["passed"] for g in gates.values()):
        failed = [s for s, g in gates.items() if not g["passed"]]
        prefix = (f"stage-0 gate failed for seed(s) {', '.join(map(str, failed))}: "
                  "the captioner barely reads the image. ")
    else:
        prefix = ""
    if not all(arm in arms for arm in ARMS):
        return prefix + "no comparison (an arm did not run)"
    parts = []
    for m in ("t2i@1", "i2t@1"):
        c = arms["cocoa"]["mean"][m]
        others = {a: arms[a]["mean"][m] for a in ("contrastive_only", "compute_control")}
        best_other = max(others.values())
        word = "beats" if c > best_other else "does not beat"
        parts.append(f"{m}: cocoa {c:.3f} {word} contrastive_only {others['contrastive_only']:.3f} and "
                     f"compute_control {others['compute_control']:.3f}")
    seeds = len(arms["cocoa"]["seeds"])
    gaps = [s["diagnostics"]["bridge_swap_gap"]["gap"] for s in arms["cocoa"]["seeds"].values()]
    gap_note = f"cocoa's bridge swap gap {statistics.fmean(gaps):+.2f} nats/word"
    if any(s["diagnostics"]["bridge_carried_nothing"] for s in arms["cocoa"]["seeds"].values()):
        gap_note += " (FLAG: ~0 for some seed, the bridge carried nothing)"
    spread = "one seed, no error bars" if seeds == 1 else f"mean of {seeds} seeds"
    return prefix + "; ".join(parts) + f" ({spread}; {gap_note})"


def run_demo(out_dir: str | Path = "runs/demo", config: DemoConfig | None = None, *, progress=None) -> dict:
    """Run every seed's stage 0, gate, three arms and stage 3; write ``report.json`` and
    ``curves.png`` in ``out_dir``; return the report. ``progress``: a callable(str) told what runs."""
    from .integration import ATTN_IMPLEMENTATION

    cfg = config or DemoConfig()
    start = time.time()
    out_dir = Path(out_dir)
    say = progress or (lambda msg: None)
    arms = {arm: {"seeds": {}} for arm in ARMS}
    stage0, gates = {}, {}
    for seed in cfg.seeds:
        setup = Setup(cfg, seed)
        say(f"seed {seed}: stage 0 ({cfg.stage0_steps} steps)")
        _, s0, s0_final = run_stage0(setup, out_dir)
        gates[str(seed)] = s0["gate"]
        stage0[str(seed)] = {"loss": s0["loss"], "gate": s0["gate"]}
        if cfg.enforce_gate and not s0["gate"]["passed"]:
            say(f"seed {seed}: stage-0 gate failed (gap {s0['gate']['gap']:.2f} < {cfg.gate_margin}); arms skipped")
            continue
        for arm in ARMS:
            say(f"seed {seed}: {arm}")
            weights, stages, diagnostics = prepare_arm(setup, arm, s0_final, out_dir)
            s3 = run_stage3(setup, arm, weights, out_dir)
            arms[arm]["seeds"][str(seed)] = arm_run(s0["loss"], stages, s3, diagnostics, cfg.stage3_lr)
    arms = summarize_arms(arms)
    report = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "attn_implementation": ATTN_IMPLEMENTATION,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.time() - start, 1),
        "config": dataclasses.asdict(cfg),
        "stage0": stage0,
        "arms": arms,
        "verdict": verdict(arms, gates),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "report.json", report)
    plot = plot_report(report, out_dir / "curves.png")
    report["plot"] = str(plot) if plot else None
    return report


def plot_report(report: dict, path: Path, title: str | None = None):
    """Losses per stage (first seed), recall bars with error bars (std over seeds), and held-out
    t2i@1 against stage-3 steps (mean over seeds). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = report["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"contrastive_only": "tab:blue", "cocoa": "tab:red", "compute_control": "tab:green"}
    for arm, result in arms.items():
        seed = next(iter(result["seeds"].values()))
        offset = 0
        for stage, values in seed["stages"].items():
            losses = values["loss"]
            style = "-" if stage == "3" else ":"
            label = f"{arm} stage {stage}" if stage != "0" else ("stage 0 (shared)" if arm == "cocoa" else None)
            if stage == "0" and arm != "cocoa":
                offset += len(losses)
                continue
            axes[0].plot(range(offset, offset + len(losses)), losses, style, color=colors[arm], label=label,
                         alpha=0.8, linewidth=0.8)
            offset += len(losses)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("optimizer step (first seed)")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    x = range(len(METRICS))
    width = 0.8 / max(1, len(arms))
    for k, (arm, result) in enumerate(arms.items()):
        axes[1].bar([i + (k - (len(arms) - 1) / 2) * width for i in x], [result["mean"][m] for m in METRICS],
                    yerr=[result["std"][m] for m in METRICS], width=width, label=arm, color=colors[arm], capsize=3)
    axes[1].set_xticks(list(x), METRICS)
    axes[1].set_ylabel("held-out recall (mean ± std over seeds)")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    for arm, result in arms.items():
        curves = [s["curve"] for s in result["seeds"].values()]
        steps = curves[0]["steps"]
        mean = [statistics.fmean(c["t2i@1"][i] for c in curves) for i in range(len(steps))]
        axes[2].plot(steps, mean, "o-", color=colors[arm], label=arm)
    axes[2].set_xlabel("stage-3 steps")
    axes[2].set_ylabel("held-out t2i@1 (mean over seeds)")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    """The terminal table: recall (mean ± std over seeds) and the diagnostics per arm."""
    lines = [f"{'arm':<18}" + "".join(f"{m:>15}" for m in METRICS) + f"{'swap gap':>10}{'probe':>7}{'cos':>7}"]
    for arm, result in report["arms"].items():
        seeds = result["seeds"].values()
        gap = statistics.fmean(s["diagnostics"]["bridge_swap_gap"]["gap"] for s in seeds)
        probe = statistics.fmean(s["diagnostics"]["probe"]["mean"]["accuracy"] for s in seeds)
        cos = statistics.fmean(s["diagnostics"]["eos_mean_cosine"] for s in seeds)
        cells = "".join(f"{result['mean'][m]:>8.3f} ±{result['std'][m]:.3f}" for m in METRICS)
        lines.append(f"{arm:<18}{cells}{gap:>+10.2f}{probe:>7.2f}{cos:>7.2f}")
    lines.append("swap gap: held-out stage-2 loss with swapped minus own images (nats per masked word); "
                 "probe: mean linear-probe accuracy of the object attributes from the image's EOS state; "
                 "cos: mean pairwise cosine of EOS states (all before stage 3)")
    return "\n".join(lines)

