"""End to end: one CoCoA stage-2 training step of a Qwen2-VL-2B shaped model with random weights.

The model is built once from a config (text: hidden 1,536, 28 layers, 12 heads, 2 KV heads,
intermediate 8,960, vocabulary 151,936, tied embeddings, M-RoPE; ``layers`` may be reduced to
fit a time budget, and the results record what was used). The vision tower is shrunk to one
small block: the step is text-only, so it never runs.

The batch is the EOS-bridge workload (8 packed samples of [A 1,536 | B 512] = 16,384 tokens,
positions restarting per sample); 70% of each block B is masked and those tokens carry labels.
A step is forward + backward of the mean cross-entropy on the labelled tokens (no optimizer).
The attention implementation is switched on the same model (same weights) between rows:

- ``cocoa_triton``: ``model(..., key_ranges=KeyRanges)``;
- ``sdpa``: the dense (1, 1, N, N) boolean mask as ``attention_mask``;
- ``flex_attention``: a ``BlockMask`` of the same intervals as ``attention_mask``;

all three with the same plain loss (hidden states of the labelled tokens -> LM head -> fp32
``F.cross_entropy``), plus ``cocoa_triton+lce``: the same attention with
``cocoa_kernels.linear_cross_entropy`` on the hidden states (the full cocoa stack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .measure import Prepared, Unavailable
from .timing import host_ms
from .workloads import IGNORE_INDEX, AttnWorkload, bridge_segments

QWEN2VL_2B_TEXT = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, attention_dropout=0.0,
)
SMOKE_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, attention_dropout=0.0,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
TARGET_MASK_RATE = 0.7  # stage 2 masks 70% of block B
# transformers 5.17 refuses attn_implementation="flex_attention" for Qwen2-VL (the model class does
# not declare flex support), so FlexAttention enters through the same hook cocoa uses.
FLEX_ATTN = "bench_flex"  # a name containing "flex_attention" triggers the same refusal


@dataclass
class E2ESetup:
    model: torch.nn.Module
    workload: AttnWorkload
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (3, 1, N)
    labels: torch.Tensor  # (1, N), -100 where not scored
    label_rows: torch.Tensor  # (T_c,) positions that carry a label
    label_values: torch.Tensor  # (T_c,)
    mask: object  # KeyRanges
    config_summary: dict


def build_config(smoke: bool, layers: int | None):
    from transformers import Qwen2VLConfig

    text = dict(SMOKE_TEXT if smoke else QWEN2VL_2B_TEXT)
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = dict(depth=1, embed_dim=32 if smoke else 128, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    tokens = {} if not smoke else dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    return config, text


def stage2_workload(smoke: bool) -> AttnWorkload:
    n, segment = (128, 32) if smoke else (16384, 2048)
    label = f"{n // 1024}k" if n >= 1024 else str(n)
    return AttnWorkload(f"stage2_bridge_{label}", "bridge", bridge_segments(n, segment))


def setup(device, smoke: bool, layers: int | None, dtype=torch.bfloat16, seed: int = 0) -> E2ESetup:
    import cocoa  # registers attn_implementation="cocoa_triton"

    config, text = build_config(smoke, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cocoa.load_model(config, attn_impl=cocoa.ATTN_IMPLEMENTATION, dtype=dtype)
    model.train()
    workload = stage2_workload(smoke)
    n = workload.n
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text["vocab_size"], (1, n), generator=gen)
    target = workload.is_target("cpu")[0]
    scored = target & (torch.rand(n, generator=gen) < TARGET_MASK_RATE)
    labels = torch.where(scored, torch.randint(0, text["vocab_size"], (n,), generator=gen), IGNORE_INDEX).view(1, n)
    rows = scored.nonzero().view(-1)
    pos = workload.positions("cpu").expand(3, 1, n)
    summary = {
        "model": "Qwen2-VL-2B text shape, random weights, bf16, train mode, text-only batch",
        "layers": text["num_hidden_layers"], "hidden": text["hidden_size"], "heads": text["num_attention_heads"],
        "kv_heads": text["num_key_value_heads"], "intermediate": text["intermediate_size"], "vocab": text["vocab_size"],
        "vision_tower": "1 block (unused: text-only step)", "tokens": n, "scored_tokens": int(rows.numel()),
        "params": sum(p.numel() for p in model.parameters()),
        "step": "forward + backward of the mean cross-entropy on the labelled tokens (no optimizer step)",
    }
    return E2ESetup(model, workload, ids.to(device), pos.to(device), labels.to(device), rows.to(device),
                    labels.view(-1)[rows].to(device), workload.mask(device), summary)


def register_flex_attention() -> None:
    """Register ``FLEX_ATTN`` with transformers' AttentionInterface: each decoder layer calls
    FlexAttention (compiled on CUDA) with the BlockMask given as ``attention_mask``, GQA native."""
    from transformers import AttentionInterface

    def flex_layer(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        from .attention_impls import compiled_flex_attention

        if not isinstance(attention_mask, BlockMask):
            raise TypeError(f"{FLEX_ATTN}: attention_mask must be a BlockMask, got {type(attention_mask).__name__}")
        if dropout:
            raise ValueError(f"{FLEX_ATTN}: attention dropout is not supported")
        fn = compiled_flex_attention() if query.is_cuda else flex_attention
        out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(FLEX_ATTN, flex_layer)


def _plain_loss(s: E2ESetup, hidden: torch.Tensor) -> torch.Tensor:
    h = hidden[0].index_select(0, s.label_rows)
    return F.cross_entropy(s.model.lm_head(h).float(), s.label_values)


def _fused_loss(s: E2ESetup, hidden: torch.Tensor) -> torch.Tensor:
    from cocoa_kernels import linear_cross_entropy

    return linear_cross_entropy(hidden[0], s.model.lm_head.weight, s.labels[0], ignore_index=IGNORE_INDEX)


class E2EImpl:
    """``prepare`` switches the model's attention and builds what the mask needs; the returned
    ``call()`` is one forward (model + loss) returning the loss."""

    def __init__(self, name: str, attn: str, fused_loss: bool = False, ours: bool = False):
        self.name, self.attn, self.fused_loss, self.ours = name, attn, fused_loss, ours

    def prepare(self, s: E2ESetup, device) -> Prepared:
        info = {}
        if self.attn == "cocoa_triton":
            kwargs = {"key_ranges": s.mask}
        elif self.attn == "sdpa":
            ms, dense = host_ms(lambda: s.mask.to_dense()[:, None], device)
            kwargs = {"attention_mask": dense}
            info.update(mask_build_ms=ms, mask_mb=dense.numel() / 2**20)
        elif self.attn == "flex_attention":
            if device.type != "cuda":
                raise Unavailable("skipped on CPU: FlexAttention has no CPU backward (and compiling takes minutes)")
            from .attention_impls import block_mask_bytes, interval_block_mask

            block_mask, cold_ms, warm_ms = interval_block_mask(s.mask, device)
            register_flex_attention()
            kwargs = {"attention_mask": block_mask}
            info.update(mask_build_ms=warm_ms, mask_build_cold_ms=cold_ms, mask_mb=block_mask_bytes(block_mask) / 2**20)
        else:
            raise ValueError(self.attn)
        s.model.set_attn_implementation(FLEX_ATTN if self.attn == "flex_attention" else self.attn)
        loss_fn = _fused_loss if self.fused_loss else _plain_loss
        if self.fused_loss:
            try:
                import cocoa_kernels

                cocoa_kernels.linear_cross_entropy  # noqa: B018 - is the fused loss there?
            except Exception as e:
                raise Unavailable(f"not available: cocoa_kernels.linear_cross_entropy ({type(e).__name__})") from e

        def call():
            out = s.model.model(input_ids=s.input_ids, position_ids=s.position_ids, use_cache=False, **kwargs)
            return loss_fn(s, out.last_hidden_state)

        mask_desc = {
            "cocoa_triton": "key_ranges=KeyRanges",
            "sdpa": "dense bool (1, 1, N, N) attention_mask",
            "flex_attention": "torch.compile(flex_attention) registered through AttentionInterface (transformers "
                              "does not enable its own flex path for Qwen2-VL), BlockMask attention_mask, enable_gqa",
        }[self.attn]
        loss_desc = "cocoa_kernels.linear_cross_entropy" if self.fused_loss else "LM head on the labelled rows + fp32 F.cross_entropy"
        info["detail"] = f'attn_implementation="{self.attn}", {mask_desc}; loss: {loss_desc}'
        return Prepared(call, info=info)


IMPLS = {impl.name: impl for impl in (
    E2EImpl("cocoa_triton", "cocoa_triton", ours=True),
    E2EImpl("sdpa", "sdpa"),
    E2EImpl("flex_attention", "flex_attention"),
    E2EImpl("cocoa_triton+lce", "cocoa_triton", fused_loss=True),
)}
