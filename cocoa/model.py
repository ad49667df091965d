"""``CocoaModel``: a backbone plus the CoCoA reconstruction heads, EOS pooling and InfoNCE.

- Text reconstruction (stages 1, 2): the backbone's hidden states scored against its own LM head
  with ``cocoa_kernels.linear_cross_entropy`` over the masked positions only (no logits tensor).
- Image reconstruction (stage 1): a light head (one residual MLP block, then a linear layer to
  the merge x merge patches' pixels) regresses the blanked visual tokens' pixels; MSE, weight 0.1.
- Contrastive learning (stage 3): the L2-normalised ``<EOS>`` state; InfoNCE with temperature
  0.02 against in-batch positives gathered from every rank (with gradient) and hard negatives.
  ``grad_cache_chunk`` embeds the batch in chunks without a graph, takes the loss on the whole
  batch, then re-runs each chunk with its cached gradient, so large batches fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocoa_kernels import KeyRanges, linear_cross_entropy

from .data.encoding import MODEL_INPUTS



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
            patch = vision.in_chans * vision.temporal_patch_size * vision.patch_size**2
            self.pixel_head = PixelHead(hidden, vision.spatial_merge_size**2 * patch)
        else:
            self.pixel_head = None

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
    def reconstruction_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        hidden = self._hidden(batch)
        weight = self.backbone.get_output_embeddings().weight
        labels = batch["labels"].to(hidden.device)
        text = linear_cross_entropy(hidden, weight, labels, shift=self.loss_config.shift)
        parts = {"text": text.detach()}
        loss = text
        if "pixel_targets" in batch and self.pixel_head is not None:
            mask = batch["pixel_mask"].to(hidden.device)
            pred = self.pixel_head(hidden[mask])
            image = F.mse_loss(pred.float(), batch["pixel_targets"].to(hidden.device).float())
            loss = loss + self.loss_config.image_loss_weight * image
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

    def contrastive_step_cached(self, batch: dict, chunk: int) -> torch.Tensor:
        """Gradient caching: the loss and its gradients equal ``contrastive_loss`` (backward done
        here), with at most ``chunk`` inputs holding activations at once. Returns the loss."""
        keys = [k for k in ("query", "positive", "negative") if k in batch]
        with torch.no_grad():
            reps = [torch.cat([self.embed(g) for g in split_group(batch[k], chunk)]) for k in keys]
        reps = [r.requires_grad_() for r in reps]
        loss = self.info_nce(*reps)
        loss.backward()
        for key, rep in zip(keys, reps):
            start = 0
            for g in split_group(batch[key], chunk):
                n = g["eos_index"].shape[0]
                part = self.embed(g)
                part.backward(rep.grad[start:start + n])
                start += n
        return loss.detach()

    # ------------------------------------------------------------------ Trainer entry
    def forward(self, stage: int, **batch):
        if stage in (1, 2):
            return self.reconstruction_loss(batch)[0]
        if stage == 3:
            return self.contrastive_loss(batch)
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")

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
    """All ranks' rows of ``x`` (gradients flow back to each rank's own rows), and the offset of
    this rank's rows. Without torch.distributed, ``x`` itself and 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    offset = sum(p.shape[0] for p in parts[: dist.get_rank()])
    return torch.cat(parts), offset


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
            "position_ids": group["position_ids"][:, rows],
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


def _to(value, device):
    return value.to(device) if isinstance(value, (torch.Tensor, KeyRanges)) else value
