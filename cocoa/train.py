"""Stage runner on transformers' Trainer: one GPU, many (torchrun/accelerate: DDP and FSDP2 are
tested on CPU ranks in tests/test_distributed.py; DeepSpeed is not) or the CPU run the same code.

``run_stage`` trains one CoCoA stage and writes ``DIR/final``: every weight in
``model.safetensors`` (for ``--init``) and the export ``backbone/`` (``save_pretrained`` weights,
tokenizer, image processor, ``is_causal=False``, ``cocoa_embedding.json``; see cocoa.export).
Checkpoints go to ``DIR/checkpoint-*``, each written under ``tmp-`` and renamed when complete; a
rerun resumes from the last complete one with the same batches and masks (see cocoa.checkpoints).
``run_pipeline`` chains stages, each starting from the previous one's output.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import has_length, rotate_checkpoints

from cocoa_kernels.mask import EOS_SEES

from . import checkpoints
from .data.collators import Stage0Collator, Stage1Collator, Stage2Collator, Stage3Collator
from .data.encoding import InputEncoder
from .data.images import BAD_SAMPLE_POLICIES
from .model import CocoaLossConfig, CocoaModel
from .stage_inputs import SettingError, check_data_fits, stage_encoder
from .tokens import ensure_mask_token

logger = logging.getLogger(__name__)


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
    target_mask_unit: str = "word"  # stage 2: mask whole words of block B ("word") or single tokens ("token")
    # stage 2: what the bridge row sees: "block_a" (B learns A through the EOS alone) or "all" (the
    # whole sample, as the authors' code masks it); KeyRanges.eos_bridge(eos_sees=...)
    eos_sees: str = "block_a"
    instruction: str | None = None
    lora: dict | None = None  # e.g. {"r": 16, "alpha": 32}: adapters (peft), merged at the end of the stage
    seed: int = 0
    # None: CocoaLossConfig with the stage's default shift (default_shift); a dict: its keys over
    # those defaults; a CocoaLossConfig: used as it is (its shift included).
    loss: CocoaLossConfig | dict | None = None
    # Precision and memory, handed to transformers' Trainer. precision: "bf16" (mixed precision:
    # fp32 master weights, bf16 autocast; the default on a GPU), "fp16" (the same with loss
    # scaling) or "fp32" (the default on the CPU); None picks the default for the device.
    precision: str | None = None
    gradient_checkpointing: bool = False  # recompute the backbone's activations in the backward
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (same update as one large batch)
    max_grad_norm: float = 1.0  # gradient clipping; 0: none
    max_pixels: int | None = None  # image processor: pixels per image at most / at least (None: its own)
    min_pixels: int | None = None
    max_length: int | None = None  # text tokens kept per input (None: the encoder's)
    mask_token: str | None = None  # stages 1-2: an existing token to mask with; None: the tokenizer's or <|mask|>
    # a data row with a missing or undecodable image (found when the data loads): "error" stops the
    # run naming the row, "skip" drops the row (counted, logged once); a data spec's own key wins
    on_bad_sample: str = "error"

    def __post_init__(self):
        _check_memory_settings(self)
        if self.stage not in (0, 1, 2, 3):  # 0: causal captioning, the demo's generative starting point
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, "
                             f"got {self.on_bad_sample!r}")
        if self.target_mask_unit not in ("word", "token"):
            raise ValueError(f"target_mask_unit must be 'word' or 'token', got {self.target_mask_unit!r}")
        if self.eos_sees not in EOS_SEES:
            raise ValueError(f"eos_sees must be one of {', '.join(EOS_SEES)}, got {self.eos_sees!r}")
        if self.loss is None or isinstance(self.loss, dict):
            self.loss = CocoaLossConfig(**{"shift": default_shift(self.stage), **(self.loss or {})})
        elif not isinstance(self.loss, CocoaLossConfig):
            raise TypeError(f"loss must be a CocoaLossConfig, a dict or None, got {type(self.loss).__name__}")


PRECISIONS = ("bf16", "fp16", "fp32")


def _check_memory_settings(cfg: StageConfig) -> None:
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise SettingError(f"precision must be one of {', '.join(PRECISIONS)} (or None for the device's default), "
                         f"got {cfg.precision!r}")
    if isinstance(cfg.grad_accum, bool) or not isinstance(cfg.grad_accum, int) or cfg.grad_accum < 1:
        raise SettingError(f"grad_accum must be an integer >= 1, got {cfg.grad_accum!r}")
    if cfg.max_grad_norm is None or cfg.max_grad_norm < 0:
        raise SettingError(f"max_grad_norm must be >= 0 (0: no clipping), got {cfg.max_grad_norm!r}")
    for name in ("max_pixels", "min_pixels", "max_length"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SettingError(f"{name} must be a positive integer or None, got {value!r}")
    if cfg.max_pixels is not None and cfg.min_pixels is not None and cfg.min_pixels > cfg.max_pixels:
        raise SettingError(f"min_pixels ({cfg.min_pixels}) must not exceed max_pixels ({cfg.max_pixels})")


def resolve_precision(precision: str | None) -> str:
    """``precision`` itself, or the device's default: "bf16" on a GPU, "fp32" on the CPU."""
    if precision is None:
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def default_shift(stage: int) -> int:
    """The loss's default ``shift`` for a stage: 1 (a token scored from the state before it) for
    stage 0's next-token captioning and stage 1's masked prediction (LLM2Vec style); 0 (in place)
    for stage 2, so no loss lands on the pooled ``<EOS>`` that precedes block B."""
    return 0 if stage == 2 else 1


def make_collator(cfg: StageConfig, encoder: InputEncoder):
    # No collator seed: masks come from torch's global RNG, which run_stage seeds per batch
    # (checkpoints.SeededBatches), so a resumed run masks exactly as the uninterrupted one.
    if cfg.stage == 0:
        return Stage0Collator(encoder, pack_budget=cfg.pack_budget)
    if cfg.stage == 1:
        return Stage1Collator(encoder, text_mask_rate=cfg.text_mask_rate, image_mask_rate=cfg.image_mask_rate,
                              shift=cfg.loss.shift, pack_budget=cfg.pack_budget)
    if cfg.stage == 2:
        return Stage2Collator(encoder, target_mask_rate=cfg.target_mask_rate, target_mask_unit=cfg.target_mask_unit,
                              pack_budget=cfg.pack_budget, eos_sees=cfg.eos_sees)
    return Stage3Collator(encoder, instruction=cfg.instruction)


class CocoaTrainer(Trainer):
    """Trainer whose loss is the stage's CoCoA loss; stage 3 may use gradient caching."""

    def __init__(self, *args, stage: int, grad_cache_chunk: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.grad_cache_chunk = grad_cache_chunk

    # ------------------------------------------------------------------ loss, accumulation, logging
    # Gradient accumulation: the Trainer hands every micro-batch of an optimizer step the step's
    # item count (``_get_num_items_in_batch``, here the masked tokens and masked pixel values of all
    # micro-batches and ranks); the model turns each part's mean into that micro-batch's share of
    # the step's mean, so the summed gradients equal the large batch's. The Trainer then does not
    # divide by the accumulation steps. Stage 3 (no labels) is divided as usual: an InfoNCE mean
    # per micro-batch (its negatives are the micro-batch's; use grad_cache_chunk for large batches).
    _loss_parts: dict | None = None

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        from .model import count_items

        inner = self.accelerator.unwrap_model(self.model)
        counts = [count_items(batch, inner.loss_config.shift) for batch in batch_samples]
        total = torch.tensor([sum(int(c["text"]) for c in counts), sum(c["image"] for c in counts)], device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total[None]).sum(0)
        return {"text": int(total[0]), "image": int(total[1])}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        num_items = num_items_in_batch if isinstance(num_items_in_batch, dict) else None
        loss, parts = model(stage=self.stage, num_items=num_items, return_parts=True, **inputs)
        if num_items is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # counts span every rank, and DDP/FSDP average gradients
        if model.training:
            self._add_loss_parts(parts)
        return (loss, None) if return_outputs else loss

    LOSS_PARTS = ("text", "image", "contrastive")

    def _add_loss_parts(self, parts: dict) -> None:
        # (sum, count) of each part's micro-batch values since the last log; a fixed layout, so
        # every rank reduces the same tensor even when only some of its batches had images
        for name, value in parts.items():
            if self._loss_parts is None:
                self._loss_parts = torch.zeros(2, len(self.LOSS_PARTS), device=value.device)
            i = self.LOSS_PARTS.index(name)
            self._loss_parts[0, i] += value.detach().float()  # on the device: no sync per micro-batch
            self._loss_parts[1, i] += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with each loss part (``loss_text``, ``loss_image``,
        ``loss_contrastive``: the mean of the micro-batches' values since the last log, over all
        ranks) beside ``loss``, so ``state.log_history``, tensorboard and wandb show them."""
        if "loss" in logs:
            if self._loss_parts is not None:
                sums = self._loss_parts.to(self.args.device)
                if self.args.world_size > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                for name, total, n in zip(self.LOSS_PARTS, sums[0].tolist(), sums[1].tolist()):
                    if n:
                        logs[f"loss_{name}"] = round(total / n, 4)
                self._loss_parts = None
            elif self.stage == 3:  # gradient caching computes the loss outside compute_loss
                logs["loss_contrastive"] = logs["loss"]
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; stage 3 with ``grad_cache_chunk``: gradient caching through the
        wrapped ``model`` (DDP/FSDP hooks and accelerate's autocast run for every chunk) and
        through ``accelerator.backward`` (fp16 loss scaling), scaled as the Trainer scales a plain
        step's loss, so accumulation gives the same gradients as without caching."""
        if self.stage != 3 or not self.grad_cache_chunk:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # the Trainer's own rule (Trainer.training_step): divide by the micro-batches of this step
        scale = 1.0
        if (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None:
            scale /= getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        inner = self.accelerator.unwrap_model(model)
        loss = inner.contrastive_step_cached(
            inputs, self.grad_cache_chunk, model=model,
            backward=lambda surrogate: self.accelerator.backward(surrogate * scale),
            no_sync=self._chunk_no_sync(model),
        )
        return loss * scale

    def _chunk_no_sync(self, model):
        """The context for gradient caching's chunk backwards before the last one, or None.

        DDP (and FSDP1): accelerate's ``no_sync``, so gradients are all-reduced once per step; it
        nests (on a non-final accumulation micro-batch the Trainer's outer ``no_sync`` stays in
        force). FSDP2: None, every chunk reduce-scatters its gradient (the sum is the same):
        accelerate's FSDP2 ``no_sync`` would re-enable syncing on exit, under the Trainer's outer
        one, and unsharded gradients kept over the chunks would cost the memory FSDP saves."""
        if getattr(self.accelerator, "is_fsdp2", False) or not hasattr(model, "no_sync"):
            return None
        return lambda: self.accelerator.no_sync(model)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        self.accelerator.unwrap_model(self.model).save(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    # ------------------------------------------------------------------ crash-safe checkpoints
    # The Trainer writes checkpoint-N itself (weights through _save, optimizer, scheduler, RNG
    # states of every rank, trainer state). It is pointed at a staging run folder, so every file
    # lands in tmp-checkpoint-N/checkpoint-N; once all ranks are done, the main process marks it
    # complete and renames it to checkpoint-N. A kill at any moment leaves a tmp- folder (deleted
    # and never read by the next run) or a complete checkpoint.
    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial):
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = checkpoints.staging_path(run_dir / name)
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every rank's files (e.g. rng_state_<rank>.pth) are written
        if self.args.should_save:
            checkpoints.mark_complete(staging / name, step=self.state.global_step)
            checkpoints.publish(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ exact resume
    # The collator (a checkpoints.SeededBatches) draws the n-th batch's masks from a seed of its own;
    # on a resume it must continue at the first batch the Trainer does not skip.
    _batches_per_epoch: int | None = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load(resume_from_checkpoint)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        self._batches_per_epoch = len(loader) if has_length(loader) else None
        return loader

    def _init_training_state(self, *args, **kwargs):
        epochs_trained, batches_trained_in_epoch = super()._init_training_state(*args, **kwargs)
        if isinstance(self.data_collator, checkpoints.SeededBatches):
            self.data_collator.batches = epochs_trained * (self._batches_per_epoch or 0) + batches_trained_in_epoch
        return epochs_trained, batches_trained_in_epoch


def run_stage(cfg: StageConfig, model: CocoaModel, encoder: InputEncoder, dataset, out_dir: str | Path,
              *, resume: bool = True, report_to: str = "none", callbacks: list | None = None) -> dict:
    """Train one stage; returns ``{"steps", "loss": [per-step values], "loss_parts": {"text": [...],
    ...}}`` and writes ``out_dir/final``. ``callbacks``: ``TrainerCallback``s for the Trainer.

    Before the Trainer is built: the stage's image/text limits are applied to (a copy of) the
    encoder, the data is checked against the model, stages 1 and 2 get a mask token
    (:func:`cocoa.tokens.ensure_mask_token`), and lower-precision weights are cast to fp32 (mixed
    precision keeps fp32 master weights; the Trainer autocasts the compute).
    ``report_to``: "none", "tensorboard" or "wandb" (each needs its package), as the Trainer takes it.
    """
    out_dir = Path(out_dir)
    precision = resolve_precision(cfg.precision)
    _check_report_to(report_to)
    # Every draw of the stage follows from cfg.seed alone, whatever ran before it in this process
    # (a previous stage trained here, or loaded from its checkpoint on a rerun): the LoRA adapters
    # below, then the Trainer (which reseeds at init for dropout and data order; masks draw from
    # SeededBatches' per-batch streams).
    set_seed(cfg.seed)
    encoder = stage_encoder(encoder, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels, max_length=cfg.max_length)
    check_data_fits(encoder, dataset)
    if cfg.stage in (1, 2):
        ensure_mask_token(encoder.tokenizer, model.backbone, cfg.mask_token)
    _fp32_master_weights(model)
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **_checkpointing_args(cfg.gradient_checkpointing),
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
    model.loss_config = cfg.loss  # the stage's shift, image-loss weight and temperature (kept after the stage)
    if cfg.lora:
        model.enable_lora(**cfg.lora)
    trainer = CocoaTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=checkpoints.SeededBatches(make_collator(cfg, encoder), seed=cfg.seed, rank=args.process_index),
        stage=cfg.stage, grad_cache_chunk=cfg.grad_cache_chunk, callbacks=callbacks,
    )
    # Only complete checkpoints count; what an interrupted run left half-written goes.
    last = checkpoints.last_complete_checkpoint(out_dir) if resume else None
    if trainer.args.should_save:
        checkpoints.remove_staging(out_dir)
    trainer.accelerator.wait_for_everyone()
    if last is not None and checkpoints.completed_step(last) >= cfg.steps:
        # Training had finished (killed while writing final): take the weights and the log as
        # they are; the Trainer, resumed at max_steps, would train one step past it.
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(str(last))
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    if cfg.lora:
        model.merge_lora()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    parts = {name: [entry[f"loss_{name}"] for entry in trainer.state.log_history if f"loss_{name}" in entry]
             for name in CocoaTrainer.LOSS_PARTS}
    result = {"steps": trainer.state.global_step, "loss": losses, "loss_parts": {k: v for k, v in parts.items() if v}}
    save_final(trainer, model, encoder, cfg, out_dir / "final", result)
    return result


def save_final(trainer: CocoaTrainer, model: CocoaModel, encoder: InputEncoder, cfg: StageConfig, final, result: dict):
    """Write ``final`` (staged, then renamed): every weight (``model.safetensors``, for ``--init``),
    the complete export ``backbone/`` (weights, the run's tokenizer and image processor, the
    attention flag and ``cocoa_embedding.json``, see :mod:`cocoa.export`) and ``stage.json``."""
    from .export import complete_export

    final = Path(final)
    staging = checkpoints.staging_path(final)
    trainer.save_model(str(staging))  # every rank (FSDP gathers the weights); the main one writes
    if trainer.args.should_save:
        complete_export(staging / "backbone", model.backbone.config, encoder, stage=cfg.stage,
                        instruction=cfg.instruction)
        (staging / "stage.json").write_text(json.dumps({"config": _jsonable(asdict(cfg)), **result}))
        checkpoints.publish(staging, final)
    trainer.accelerator.wait_for_everyone()


def _checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments' activation checkpointing under the installed release's name:
    ``activation_checkpointing`` from transformers 5.2x on (``gradient_checkpointing`` is its
    deprecated alias there), ``gradient_checkpointing`` before."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _fp32_master_weights(model) -> None:
    """Mixed precision trains fp32 weights under autocast; a model loaded in bf16/fp16 (the
    checkpoint's dtype) is cast up once here rather than trained in pure low precision."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        logger.warning("casting the model's %s weights to float32: training keeps fp32 master weights "
                       "(load with dtype=torch.float32 to skip this copy)", "/".join(low))
        model.float()


def _check_report_to(report_to) -> None:
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    for name in [report_to] if isinstance(report_to, str) else list(report_to or ["none"]):
        if name not in available:
            raise SettingError(f"report_to must be one of {', '.join(available)}, got {name!r}")
        if not available[name]:
            raise SettingError(f"report_to={name!r} needs the {name} package: pip install {name}")


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


def train_from_sources(stages: list[StageConfig], model_src: str, data_src, out_dir, *, init: str | None = None,
                       report_to: str = "none", stage_data: dict | None = None, image_dir: str | None = None):
    """The ``cocoa train`` entry: ``model_src`` "tiny" or a local checkpoint folder (weights,
    tokenizer and, for a vision-language model, image processor); ``data_src`` a data spec
    (:mod:`cocoa.data.sources`: "builtin", a path, a dict, or a list of those mixed by weight);
    ``stage_data`` maps a stage number to a spec that replaces ``data_src`` for that stage;
    ``image_dir`` is where relative image paths start for specs without their own; ``init`` a
    previous stage's ``final`` folder to start from (its ``backbone/`` tokenizer, with any mask
    token an earlier stage added, replaces the folder's). The weights load in fp32 whatever the
    checkpoint's dtype: mixed precision (``StageConfig.precision``) autocasts them.

    All the data is read and checked before the model loads; rows skipped under
    ``on_bad_sample="skip"`` are logged once per source."""
    from .embed import default_image_processor, load_image_processor
    from .loading import load_model
    from .stage_inputs import TOKENIZER_FILES, check_model_folder
    from .tiny import char_tokenizer, tiny_config
    from .tokens import grow_embeddings

    dataset = stage_datasets(stages, data_src, stage_data=stage_data, image_dir=image_dir)
    # The model's random draws (the tiny backbone's initial weights, CocoaModel's new heads) come
    # from the first stage's seed: the same command gives the same model, so a run killed before
    # its first checkpoint and started again is the same run.
    set_seed(stages[0].seed)
    if model_src == "tiny":
        config, tokenizer, processor = tiny_config(), char_tokenizer(), default_image_processor()
        backbone = load_model(config, dtype=torch.float32)
    else:
        from transformers import AutoTokenizer

        config_file = Path(model_src) / "config.json"
        vision = config_file.is_file() and "vision_config" in json.loads(config_file.read_text())
        check_model_folder(model_src, vision=vision)
        backbone = load_model(model_src, dtype=torch.float32)
        config, tokenizer = backbone.config, AutoTokenizer.from_pretrained(model_src)
        processor = load_image_processor(model_src) if vision else None
    if init:
        exported = Path(init) / "backbone"
        if any((exported / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(exported)
        grow_embeddings(backbone, len(tokenizer))  # rows an earlier stage added (its mask token)
    model = CocoaModel(backbone)
    if init:
        model.load(init)
    if torch.cuda.is_available():
        model = model.cuda()
    encoder = InputEncoder(tokenizer, config, processor)
    # each stage exports its tokenizer (with the mask token) and image processor
    return run_pipeline(stages, model, encoder, dataset, out_dir, report_to=report_to)


def stage_datasets(stages: list[StageConfig], data_src, *, stage_data: dict | None = None,
                   image_dir: str | None = None) -> dict:
    """Each stage's dataset (stage number -> dataset) from the data specs; a bad spec or data file
    is a :class:`SettingError` naming it. Skipped rows are logged here, once per source."""
    from .data.sources import DataSources

    sources = DataSources(image_dir=image_dir)
    stage_data = stage_data or {}
    datasets = {}
    for cfg in stages:
        spec, where = (data_src, "data")
        if cfg.stage in stage_data:
            spec, where = stage_data[cfg.stage], f"stage {cfg.stage} data"
        try:
            datasets[cfg.stage] = sources.stage_dataset(spec, cfg.stage, on_bad_sample=cfg.on_bad_sample,
                                                        seed=cfg.seed, where=where)
        except (OSError, ValueError) as e:  # the reader's message names the file and row
            raise SettingError(str(e)) from None
    for name, bad in sources.skipped():
        logger.warning("data %s: %s", name, bad.summary())
    return datasets
