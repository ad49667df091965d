"""Stage runner on transformers' Trainer: one GPU, many (torchrun/accelerate: DDP and FSDP2 are
tested on CPU ranks in tests/test_distributed.py; DeepSpeed is not) or the CPU run the same code.

``run_stage`` trains one CoCoA stage and writes ``DIR/final`` (backbone in safetensors via
``save_pretrained``, heads beside it); checkpoints go to ``DIR/checkpoint-*`` and a run resumes
from the last one. ``run_pipeline`` chains stages, each starting from the previous one's output.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .data.collators import Stage1Collator, Stage2Collator, Stage3Collator
from .data.encoding import InputEncoder
from .model import CocoaLossConfig, CocoaModel


@dataclass
class StageConfig:
    stage: int
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    save_steps: int = 0  # 0: only the final model
    pack_budget: int | None = None  # stages 1-2: pack inputs into rows of this many tokens
    grad_cache_chunk: int | None = None  # stage 3: embed in chunks of this many inputs
    text_mask_rate: float = 0.4
    image_mask_rate: float = 0.5
    target_mask_rate: float = 0.7
    instruction: str | None = None
    lora: dict | None = None  # e.g. {"r": 16, "alpha": 32}: adapters (peft), merged at the end of the stage
    seed: int = 0
    loss: CocoaLossConfig = field(default_factory=CocoaLossConfig)

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if isinstance(self.loss, dict):
            self.loss = CocoaLossConfig(**self.loss)


def make_collator(cfg: StageConfig, encoder: InputEncoder):
    # No collator seed: masks come from torch's global RNG, seeded by the Trainer (cfg.seed) and
    # restored with each checkpoint.
    if cfg.stage == 1:
        return Stage1Collator(encoder, text_mask_rate=cfg.text_mask_rate, image_mask_rate=cfg.image_mask_rate,
                              shift=cfg.loss.shift, pack_budget=cfg.pack_budget)
    if cfg.stage == 2:
        return Stage2Collator(encoder, target_mask_rate=cfg.target_mask_rate, pack_budget=cfg.pack_budget)
    return Stage3Collator(encoder, instruction=cfg.instruction)


class CocoaTrainer(Trainer):
    """Trainer whose loss is the stage's CoCoA loss; stage 3 may use gradient caching."""

    def __init__(self, *args, stage: int, grad_cache_chunk: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.grad_cache_chunk = grad_cache_chunk

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(stage=self.stage, **inputs)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.stage != 3 or not self.grad_cache_chunk:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inner = self.accelerator.unwrap_model(model)
        loss = inner.contrastive_step_cached(inputs, self.grad_cache_chunk)
        return loss / self.args.gradient_accumulation_steps

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        self.accelerator.unwrap_model(self.model).save(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load(resume_from_checkpoint)


def run_stage(cfg: StageConfig, model: CocoaModel, encoder: InputEncoder, dataset, out_dir: str | Path,
              *, resume: bool = True, report_to: str = "none") -> dict:
    """Train one stage; returns ``{"steps", "loss": [per-step values]}`` and writes ``out_dir/final``."""
    out_dir = Path(out_dir)
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or cfg.steps,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        report_to=report_to,
        seed=cfg.seed,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    if cfg.lora:
        model.enable_lora(**cfg.lora)
    trainer = CocoaTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=make_collator(cfg, encoder),
        stage=cfg.stage, grad_cache_chunk=cfg.grad_cache_chunk,
    )
    last = get_last_checkpoint(str(out_dir)) if resume and out_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    if cfg.lora:
        model.merge_lora()
    trainer.save_model(str(out_dir / "final"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"steps": trainer.state.global_step, "loss": losses}
    (out_dir / "final" / "stage.json").write_text(json.dumps({"config": _jsonable(asdict(cfg)), **result}))
    return result


def run_pipeline(stages: list[StageConfig], model: CocoaModel, encoder: InputEncoder, dataset, out_dir,
                 **kwargs) -> dict:
    """Stages in order, each from the previous one's weights (the model is trained in place).
    ``dataset``: one for every stage, or a dict from stage number to its dataset."""
    results = {}
    for cfg in stages:
        data = dataset[cfg.stage] if isinstance(dataset, dict) else dataset
        results[str(cfg.stage)] = run_stage(cfg, model, encoder, data, Path(out_dir) / f"stage{cfg.stage}", **kwargs)
    return results


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def train_from_sources(stages: list[StageConfig], model_src: str, data_src: str, out_dir, *, init: str | None = None):
    """The ``cocoa train`` entry: ``model_src`` "tiny" or a local folder; ``data_src`` "builtin"
    or a JSONL file; ``init`` a previous stage's ``final`` folder to start from."""
    from .data import ShapesDataset, load_jsonl
    from .embed import default_image_processor, load_image_processor
    from .loading import load_model
    from .tiny import char_tokenizer, tiny_config

    if model_src == "tiny":
        config, tokenizer, processor = tiny_config(), char_tokenizer(), default_image_processor()
        backbone = load_model(config)
    else:
        from transformers import AutoTokenizer

        backbone = load_model(model_src)
        config, tokenizer = backbone.config, AutoTokenizer.from_pretrained(model_src)
        processor = load_image_processor(model_src) if hasattr(config, "vision_config") else None
    model = CocoaModel(backbone)
    if init:
        model.load(init)
    if torch.cuda.is_available():
        model = model.cuda()
    if data_src == "builtin":
        dataset = {1: ShapesDataset(4096), 2: ShapesDataset(4096), 3: ShapesDataset(4096, task="retrieval")}
    else:
        dataset = load_jsonl(data_src)
    encoder = InputEncoder(tokenizer, config, processor)
    results = run_pipeline(stages, model, encoder, dataset, out_dir)
    tokenizer.save_pretrained(Path(out_dir) / f"stage{stages[-1].stage}" / "final" / "backbone")
    if processor is not None:
        processor.save_pretrained(Path(out_dir) / f"stage{stages[-1].stage}" / "final" / "backbone")
    return results

