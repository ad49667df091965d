"""``CocoaModel``: a backbone plus the CoCoA reconstruction heads, EOS pooling and InfoNCE.

- Text reconstruction (stages 1, 2): the backbone's hidden states scored against its own LM head
  with ``cocoa_kernels.linear_cross_entropy`` over the masked positions only (no logits tensor).
- Image reconstruction (stage 1): a light head (one residual MLP block, then a linear layer to
  the merge x merge patches' pixels) regresses the blanked visual tokens' pixels; MSE, weight 0.1.
- Contrastive learning (stage 3): the L2-normalised ``<EOS>`` state; InfoNCE with temperature
  0.02 against in-batch positives gathered from every rank (with gradient) and hard negatives.
  ``grad_cache_chunk`` embeds the batch in chunks without a graph, takes the loss on the whole
  batch, then re-runs each chunk with its cached gradient, so large batches fit in memory; the
  chunks go through the DDP/FSDP-wrapped model and accelerate's backward (see the Trainer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocoa_kernels import KeyRanges, linear_cross_entropy

from .data.encoding import IGNORE, MODEL_INPUTS



@dataclass
class CocoaLossConfig:
    shift: int = 1  # 1: a masked token is predicted from the state before it (LLM2Vec); 0: at itself (MoCa)
    image_loss_weight: float = 0.1
    temperature: float = 0.02


class PixelHead(nn.Module):
    """Hidden state of a visual token -> the pixels of its merge x merge patches."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x):
        # Follow the backbone's compute dtype: under autocast the linear layers run in the autocast
        # dtype whatever the weights are; without it, the input takes the head's own dtype (a bf16
        # backbone feeding an fp32 head, or the reverse, would otherwise be a dtype error).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.out.weight.dtype)
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.out(x)


class CocoaModel(nn.Module):
    def __init__(self, backbone, loss: CocoaLossConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.loss_config = loss or CocoaLossConfig()
        vision = getattr(backbone.config, "vision_config", None)
        if vision is not None:
            hidden = backbone.config.get_text_config().hidden_size
            patch = vision_in_channels(vision) * vision.temporal_patch_size * vision.patch_size**2
            # created in the backbone's dtype, so a pure-bf16 model gets a bf16 head (fp32 master
            # weights come from loading the backbone in fp32, see cocoa.train)
            self.pixel_head = PixelHead(hidden, vision.spatial_merge_size**2 * patch).to(_float_dtype(backbone))
        else:
            self.pixel_head = None

    # ------------------------------------------------------------------ memory (Trainer calls these)
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing and deprecated the
    # old names: the Trainer calls whichever its release has, so both are here, and each calls the
    # backbone's newest name (no deprecation warning on either release).
    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.backbone, "supports_gradient_checkpointing", False)

    def _checkpointing_name(self, new: str) -> str:
        """``new`` (an ``activation_checkpointing`` name) where the backbone's release has it, else
        its older ``gradient_checkpointing`` twin."""
        return new if hasattr(type(self.backbone), new) else new.replace("activation", "gradient")

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, self._checkpointing_name("is_activation_checkpointing"), False))

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute the backbone's layer activations in the backward pass (the heads are small and
        keep theirs). Non-reentrant checkpointing unless ``activation_checkpointing_kwargs`` says
        otherwise: it needs no input that requires grad, so it also works with frozen embeddings
        (LoRA). Other keyword arguments go to the backbone's method as they are."""
        kw = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        enable = self._checkpointing_name("activation_checkpointing_enable")
        getattr(self.backbone, enable)(**{enable.replace("_enable", "_kwargs"): kw}, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """:meth:`activation_checkpointing_enable` under the name transformers before 5.2x calls."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        getattr(self.backbone, self._checkpointing_name("activation_checkpointing_disable"))()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def base(self):
        return getattr(self.backbone, "model", self.backbone)

    def _hidden(self, batch: dict) -> torch.Tensor:
        device = next(self.parameters()).device
        inputs = {k: _to(batch[k], device) for k in MODEL_INPUTS if k in batch}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.base.dtype)
        return self.base(**inputs, use_cache=False).last_hidden_state

    # ------------------------------------------------------------------ stages 1 and 2
    def reconstruction_loss(self, batch: dict, num_items: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Text cross-entropy over the masked tokens (+ weighted pixel MSE); returns ``(loss, parts)``
        with ``parts`` the detached per-batch means ``{"text", "image"}``.

        ``num_items``: ``{"text": masked tokens, "image": masked pixel values}`` counted over a whole
        optimizer step (every micro-batch of a gradient accumulation, every rank; see
        :func:`count_items`). Each part's mean is then rescaled to its sum over this batch divided by
        that count, so the micro-batches' losses add up to the large batch's mean."""
        hidden = self._hidden(batch)
        weight = self.backbone.get_output_embeddings().weight
        labels = batch["labels"].to(hidden.device)
        text = linear_cross_entropy(hidden, weight, labels, shift=self.loss_config.shift)
        parts = {"text": text.detach()}
        text_count = count_items(batch, self.loss_config.shift)["text"] if num_items is not None else None
        loss = _share(text, text_count, num_items, "text")
        if "pixel_targets" in batch and self.pixel_head is not None:
            mask = batch["pixel_mask"].to(hidden.device)
            pred = self.pixel_head(hidden[mask])
            image = F.mse_loss(pred.float(), batch["pixel_targets"].to(hidden.device).float())
            image_share = _share(image, pred.numel(), num_items, "image")
            loss = loss + self.loss_config.image_loss_weight * image_share
            parts["image"] = image.detach()
        return loss, parts

    # ------------------------------------------------------------------ stage 3
    def embed(self, group: dict) -> torch.Tensor:
        """L2-normalised EOS states (B, hidden) of an ``embedding_batch``, float32."""
        hidden = self._hidden(group)
        index = group["eos_index"].to(hidden.device)
        return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float(), dim=-1)

    def info_nce(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of each query against every rank's positives (and hard negatives)."""
        p_all, offset = gather_with_grad(p)
        candidates = p_all if n is None else torch.cat([p_all, gather_with_grad(n)[0]])
        logits = q @ candidates.T / self.loss_config.temperature
        target = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, target)

    def contrastive_loss(self, batch: dict) -> torch.Tensor:
        reps = [self.embed(batch[k]) for k in ("query", "positive", "negative") if k in batch]
        return self.info_nce(*reps)

    def contrastive_step_cached(self, batch: dict, chunk: int, *, model: nn.Module | None = None,
                                backward=None, no_sync=None) -> torch.Tensor:
        """Gradient caching: the loss and the gradients of ``contrastive_loss`` (the backward is
        done here), with at most ``chunk`` inputs holding activations at once. Returns the loss.

        Every chunk is embedded without a graph; the InfoNCE loss on the whole batch (positives
        gathered from every rank) gives each representation its gradient ``g``; then each chunk
        is embedded again with a graph and ``backward(sum(rep_chunk * g_chunk))`` carries ``g``
        into the weights (the gradient of that surrogate is exactly the chunk's share).

        - ``model``: what computes the embeddings, called as ``model(stage=3, embed=True, **group)``:
          this model (the default) or the DDP/FSDP wrapper around it, so the wrapper's hooks
          (gradient all-reduce, FSDP unsharding and reduce-scatter) and accelerate's autocast run.
        - ``backward(loss)``: ``loss.backward()`` by default; the Trainer passes accelerate's
          (loss scaling for fp16, division for gradient accumulation) — any constant factor it
          applies reaches every chunk alike, so the result is that factor times the gradient.
        - ``no_sync``: a context factory for every chunk backward but the last (DDP's
          ``no_sync``: gradients accumulate locally and are all-reduced once, by the last one).

        The two passes must compute the same function: no active dropout (Qwen2-VL has none).
        """
        model = self if model is None else model
        backward = backward or torch.Tensor.backward
        keys = [k for k in ("query", "positive", "negative") if k in batch]
        groups = {k: list(split_group(batch[k], chunk)) for k in keys}
        with torch.no_grad():
            reps = [torch.cat([model(stage=3, embed=True, **g) for g in groups[k]]) for k in keys]
        reps = [r.requires_grad_() for r in reps]
        loss = self.info_nce(*reps)
        cached = torch.autograd.grad(loss, reps)  # reaches no weight: InfoNCE has none
        steps = [pair for k, grad in zip(keys, cached) for pair in _row_slices(groups[k], grad)]
        for i, (g, grad) in enumerate(steps):
            defer = no_sync is not None and i < len(steps) - 1
            with no_sync() if defer else contextlib.nullcontext():
                part = model(stage=3, embed=True, **g)
                backward((part * grad.to(part.dtype)).sum())
        return loss.detach()

    # ------------------------------------------------------------------ Trainer entry
    def forward(self, stage: int, embed: bool = False, num_items: dict | None = None, return_parts: bool = False,
                **batch):
        """The stage's loss on a batch; ``embed=True`` (stage 3): the EOS embeddings of one
        ``embedding_batch`` group instead (gradient caching calls that through DDP/FSDP wrappers).
        ``num_items``: see :meth:`reconstruction_loss`; ``return_parts``: return ``(loss, parts)``
        with the loss's detached parts (``text``, ``image``, ``contrastive``) for logging."""
        if embed:
            if stage != 3:
                raise ValueError(f"embed=True needs stage=3, got stage={stage!r}")
            return self.embed(batch)
        if stage in (0, 1, 2):  # 0: causal captioning, next-token loss on the caption (labels, shift=1)
            loss, parts = self.reconstruction_loss(batch, num_items)
        elif stage == 3:
            loss = self.contrastive_loss(batch)
            parts = {"contrastive": loss.detach()}
        else:
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        return (loss, parts) if return_parts else loss

    # ------------------------------------------------------------------ LoRA (optional, needs peft)
    def enable_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
        """Train low-rank adapters on the language model's projections instead of the backbone;
        the reconstruction heads stay fully trainable. Undo with :meth:`merge_lora`."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:
            raise ImportError("LoRA needs the peft package: pip install 'cocoa[lora]'") from e
        if self.lora_active:
            return
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
        inject_adapter_in_model(config, self.backbone)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("lora_" in name)

    @property
    def lora_active(self) -> bool:
        return any(type(m).__module__.startswith("peft.") for m in self.backbone.modules())

    def merge_lora(self) -> None:
        """Fold the adapters into the weights and put the plain layers back (all trainable again)."""
        for name, module in list(self.backbone.named_modules()):
            if type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer"):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(self.backbone.get_submodule(parent) if parent else self.backbone, child, module.get_base_layer())
        for param in self.backbone.parameters():
            param.requires_grad_(True)

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> None:
        """``model.safetensors``: every weight (heads and active adapters included, tied weights
        stored once) for :meth:`load`; plus, without active adapters, ``backbone/`` via
        save_pretrained: the export that ``Embedder.from_pretrained`` and ``cocoa embed`` read."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))
        if not self.lora_active:
            self.backbone.save_pretrained(directory / "backbone")

    def load(self, directory: str | Path) -> None:
        """Load what :meth:`save` wrote into this model (same architecture, same adapters)."""
        from safetensors.torch import load_model

        load_model(self, str(Path(directory) / "model.safetensors"), device=str(next(self.parameters()).device))


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` (every rank holds as many), stacked in rank order, and the offset
    of this rank's rows; gradients flow back to each rank's own rows, summed over the ranks (every
    rank's loss uses every row). Without torch.distributed, ``x`` itself and 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]


class _GatherRows(torch.autograd.Function):
    """all_gather forward, all_reduce + own slice backward. (torch.distributed.nn's differentiable
    all_gather does the same and is deprecated from torch 2.13 on; its replacement lives in a
    private module.)"""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd's buffer is not ours to change
        dist.all_reduce(grad)
        return grad[ctx.rows]


def count_items(batch: dict, shift: int) -> dict:
    """What the reconstruction loss averages over in ``batch``: ``text``, the labels it scores
    (those past the first ``shift`` positions of a row), and ``image``, the masked pixel values."""
    labels = batch["labels"]
    text = labels[:, shift:].ne(IGNORE).sum()  # a tensor on the labels' device: no sync here
    image = batch["pixel_targets"].numel() if "pixel_targets" in batch else 0
    return {"text": text, "image": image}


def _share(mean: torch.Tensor, count, num_items: dict | None, key: str) -> torch.Tensor:
    """``mean`` as this batch's share of a mean over ``num_items[key]`` items (itself without them)."""
    if num_items is None:
        return mean
    total = num_items[key]
    return mean * (count / total) if total else mean * 0


def _row_slices(groups: list[dict], grad: torch.Tensor):
    """Each chunk of a group with its rows' slice of ``grad`` (chunks in order, rows consecutive)."""
    start = 0
    for g in groups:
        n = g["eos_index"].shape[0]
        yield g, grad[start:start + n]
        start += n


def split_group(group: dict, chunk: int):
    """Split an ``embedding_batch`` into sub-batches of ``chunk`` rows (images follow their rows)."""
    B = group["input_ids"].shape[0]
    if chunk >= B:
        yield group
        return
    if "image_grid_thw" in group:
        patches = group["image_grid_thw"].prod(-1)
        image_start = torch.cat([torch.zeros(1, dtype=patches.dtype), patches.cumsum(0)])
    for start in range(0, B, chunk):
        rows = slice(start, min(B, start + chunk))
        sub = {
            "input_ids": group["input_ids"][rows],
            "attention_mask": group["attention_mask"][rows],
            # (3, B, N) M-RoPE or (B, N) text-only positions: the row axis is second to last
            "position_ids": group["position_ids"][..., rows, :],
            "key_ranges": KeyRanges(group["key_ranges"].lo[rows], group["key_ranges"].hi[rows]),
            "eos_index": group["eos_index"][rows],
        }
        if "image_grid_thw" in group:
            images = ((group["image_rows"] >= rows.start) & (group["image_rows"] < rows.stop)).nonzero().flatten()
            if images.numel():
                sub["image_grid_thw"] = group["image_grid_thw"][images]
                sub["pixel_values"] = torch.cat(
                    [group["pixel_values"][image_start[i]:image_start[i + 1]] for i in images.tolist()]
                )
        yield sub


def vision_in_channels(vision_config) -> int:
    """Input channels of a vision config: transformers 5 names them ``in_channels``, older Qwen2-VL
    configs ``in_chans``; either is accepted."""
    for name in ("in_channels", "in_chans"):
        value = getattr(vision_config, name, None)
        if value is not None:
            return int(value)
    raise ValueError("vision_config: neither in_channels nor in_chans is set")


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _to(value, device):
    return value.to(device) if isinstance(value, (torch.Tensor, KeyRanges)) else value
