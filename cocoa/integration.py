"""``attn_implementation="cocoa_triton"``: cocoa_kernels.attention behind transformers' own hooks.

Importing ``cocoa`` registers two functions under the name ``"cocoa_triton"``:

- with ``AttentionMaskInterface``: turns the 2-D padding mask a model is given into a
  :class:`KeyRanges` (O(N), no (N, N) tensor), causal or bidirectional as the text config's
  ``is_causal`` says, exactly the mask ``"sdpa"`` would build;
- with ``AttentionInterface``: runs every attention layer through ``cocoa_kernels.attention``.

The CoCoA masks travel as a forward keyword: ``model(**inputs, key_ranges=KeyRanges(...))``.
transformers hands unknown keywords down to every attention call; decoder self-attention layers
(the modules with a ``layer_idx``, i.e. a KV-cache slot) use them, while vision-tower blocks,
which get the same keywords, ignore them and attend bidirectionally within each image.
``cocoa_deterministic=False`` (another forward keyword, default True) gives every
``cocoa_triton`` layer the faster non-deterministic backward (``attention(deterministic=...)``);
``cocoa_impl="triton" | "torch"`` forces an implementation (``attention(impl=...)``).
No model class is patched and no forward is copied.

A mask is never converted approximately. What has no key-interval form is refused with an error
saying what was given: an additive mask with values other than 0 and -inf (a bias), a per-head
4-D mask, and padding inside a row. For the last (and any other exact 0/-inf or bool mask with
gaps), ``cocoa_dense_fallback=True`` computes those layers exactly with dense SDPA (slow; logged
once). Under ``torch.compile`` the data checks run on the device (``cocoa_kernels.mask.refuse``).
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
from transformers.masking_utils import sdpa_mask

from cocoa_kernels import KeyRanges, attention
from cocoa_kernels.mask import refuse

ATTN_IMPLEMENTATION = "cocoa_triton"
logger = logging.getLogger(__name__)


def padding_to_key_ranges(attention_mask: torch.Tensor | None, batch: int, length: int, causal: bool, device):
    """The mask ``"sdpa"`` builds from a 2-D padding mask, as key intervals (O(N)).

    Every query sees the row's valid keys (causal: those at or before it). The valid keys of a
    row must be contiguous (left or right padding, what tokenizers produce); padding inside a row
    gives None (under ``torch.compile``, where the data cannot be read, the check runs on the
    device and fails the run instead).
    """
    if attention_mask is None:
        lo = torch.zeros(batch, length, dtype=torch.int32, device=device)
        hi = torch.full((batch, length), length, dtype=torch.int32, device=device)
        return KeyRanges(lo, hi, causal=causal)
    valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    count = valid.sum(-1, keepdim=True)
    first = valid.int().argmax(-1, keepdim=True)
    last = length - valid.flip(-1).int().argmax(-1, keepdim=True)
    first = torch.where(count > 0, first, 0)
    last = torch.where(count > 0, last, 0)
    gaps = (last - first) != count
    if not torch.compiler.is_compiling() and bool(gaps.any()):
        return None
    refuse(gaps, lambda b, i: f"attention_mask: padding inside row {b}")  # under compile: on the device
    return KeyRanges(first.expand(batch, length), last.expand(batch, length), causal=causal)


def dense_to_key_ranges(dense: torch.Tensor) -> tuple[KeyRanges | None, ValueError | None]:
    """A (B, N, N) bool mask as key intervals, or (None, the error saying which row has none).
    Under ``torch.compile`` the check runs on the device: the intervals always come back."""
    try:
        return KeyRanges.from_dense(dense.contiguous()), None
    except ValueError as e:
        return None, e


def _no_interval_message(problem) -> str:
    return (f"attention_mask: {problem} (padding inside a row, or a mask with gaps). Pad on the left or the "
            "right, pass key_ranges, or pass cocoa_dense_fallback=True to the forward to compute such a mask "
            "exactly with dense SDPA (slow; not under torch.compile)")


def cocoa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device="cpu",
    **kwargs,
):
    """AttentionMaskInterface entry: the model's default mask as a KeyRanges (or None while
    decoding with a cache, which the attention function then refuses)."""
    if q_length != kv_length or q_offset or kv_offset:
        return None
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        causal = mask_function is causal_mask_function
        ranges = padding_to_key_ranges(attention_mask, batch_size, kv_length, causal, device)
        if ranges is not None:
            return ranges
    # Composite masks (packed-sequence detection, model-specific overlays) and padding inside a
    # row: evaluated densely once, as "sdpa" does, and converted to key intervals; a mask without
    # them is handed over dense (4-D bool), for the attention function to refuse or, with
    # cocoa_dense_fallback=True, to compute densely.
    kwargs.pop("allow_is_causal_skip", None)
    dense = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, mask_function=mask_function,
        attention_mask=attention_mask, allow_is_causal_skip=False, device=device, **kwargs,
    ).to(torch.bool)
    ranges, _ = dense_to_key_ranges(dense[:, 0].expand(batch_size, q_length, kv_length))
    return ranges if ranges is not None else dense


def cocoa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    key_ranges: KeyRanges | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cocoa_vision_cu_seqlens: torch.Tensor | None = None,
    cocoa_deterministic: bool = True,
    cocoa_impl: str | None = None,
    cocoa_dense_fallback: bool = False,
    **kwargs,
):
    """AttentionInterface entry. q (B, Hq, N, D), k/v (B, Hkv, N, D) -> ((B, N, Hq, D), None)."""
    if dropout:
        raise ValueError(
            f"cocoa_triton: attention dropout {dropout} is not supported; set the config's attention_dropout to 0"
        )
    B, _, N, _ = query.shape
    if key.shape[2] != N:
        raise ValueError(
            "cocoa_triton: a KV cache (generation) is not supported: queries cover "
            f"{N} positions but keys {key.shape[2]}; use attn_implementation='sdpa' to generate"
        )
    decoder_layer = hasattr(module, "layer_idx")
    if key_ranges is not None and decoder_layer:
        mask = key_ranges
        if not isinstance(mask, KeyRanges):
            raise TypeError(f"key_ranges must be a cocoa_kernels.KeyRanges, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"key_ranges has shape {tuple(mask.shape)} but the batch is (B, N) = {(B, N)}")
        if mask.device != query.device:
            raise ValueError(f"key_ranges is on {mask.device} but the model runs on {query.device}")
    elif isinstance(attention_mask, KeyRanges):
        mask = attention_mask
    elif cocoa_vision_cu_seqlens is not None:  # all images at once (one_call_vision_attention)
        mask = KeyRanges.from_cu_seqlens(cocoa_vision_cu_seqlens, length=N)
    elif cu_seq_lens_q is not None:  # varlen call: bidirectional per segment
        mask = KeyRanges.from_cu_seqlens(cu_seq_lens_q, length=N)
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        mask = padding_to_key_ranges(None, B, N, bool(causal), query.device)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        allowed = allowed_keys(attention_mask, B, N)
        mask, problem = dense_to_key_ranges(allowed)
        if problem is not None:
            if not cocoa_dense_fallback:
                raise ValueError(_no_interval_message(problem))
            return _dense_attention(query, key, value, allowed, scaling), None
    else:
        raise TypeError(f"cocoa_triton: unsupported attention_mask of type {type(attention_mask).__name__}")
    out = attention(query, key, value, mask, scale=scaling, deterministic=cocoa_deterministic, impl=cocoa_impl)
    return out.transpose(1, 2), None  # free: the kernel writes token-major


def allowed_keys(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """A prepared 4-D mask, (B, 1, N, N) bool or additive, as the (B, N, N) bool mask of the keys
    each query sees; refuses what it cannot represent exactly: a per-head mask, and an additive
    mask with values other than 0 (seen) and -inf or the dtype's minimum (not seen), i.e. a bias."""
    if attention_mask.shape[1] != 1:
        raise ValueError(
            f"attention_mask: a per-head mask of shape {tuple(attention_mask.shape)} is not supported by "
            "cocoa_triton (the heads share one key interval per query); give one mask for every head, of shape "
            f"({batch}, 1, {length}, {length}), or key_ranges")
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, 0]
    elif attention_mask.is_floating_point():
        allowed = attention_mask[:, 0] == 0
        blocked = (attention_mask[:, 0] == float("-inf")) | (attention_mask[:, 0] == torch.finfo(attention_mask.dtype).min)
        bias = ~(allowed | blocked)
        refuse(bias.any(-1), lambda b, i: (
            f"attention_mask: an additive mask with values other than 0 and -inf (a bias; row {i} of batch {b} "
            f"holds {float(attention_mask[b, 0, i][bias[b, i]][0]):g}) is not supported by cocoa_triton, which "
            "adds no bias to the scores; use attn_implementation='sdpa' or 'eager' for biased attention"))
    else:
        raise TypeError(f"attention_mask: a 4-D mask must be bool or additive float, got {attention_mask.dtype}")
    return allowed.expand(batch, length, length)


def _dense_attention(query, key, value, allowed: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Exact attention with a dense (B, N, N) bool mask through SDPA: the opt-in fallback
    (``cocoa_dense_fallback=True``) for masks without key intervals. Rows that see nothing give
    zeros and zero gradients, as ``cocoa_kernels.attention`` does (SDPA alone would give NaN)."""
    global _warned_dense
    if not _warned_dense:
        _warned_dense = True
        logger.warning("cocoa_triton: a mask without one key interval per query (padding inside a row?) is "
                       "computed with dense SDPA (cocoa_dense_fallback=True): exact, but O(N^2) memory and slower")
    empty = ~allowed.any(-1, keepdim=True)  # (B, N, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=(allowed | empty)[:, None], scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.masked_fill(empty[:, None], 0).transpose(1, 2)


_warned_dense = False


def _one_call_hook(module, args, kwargs):
    """Forward pre-hook of a vision attention module: when it runs ``cocoa_triton``, hand it one
    segment spanning every patch and carry the per-image boundaries to the attention function in
    a keyword, so the module makes one attention call (bidirectional within each image) where it
    would make one per image."""
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None or module.config._attn_implementation != ATTN_IMPLEMENTATION:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    kwargs = dict(kwargs)
    kwargs["cu_seqlens"] = cu_seqlens.new_tensor([0, hidden.shape[0]])
    kwargs["cocoa_vision_cu_seqlens"] = cu_seqlens
    return args, kwargs


def one_call_vision_attention(model: torch.nn.Module) -> int:
    """Make the vision tower of a Qwen2-VL / Qwen2.5-VL ``model`` attend over all the images of a
    batch in one call per block (``cocoa.load_model`` does this; call it on a model loaded otherwise).

    transformers' vision attention takes its packed path (one call, ``cu_seqlens``) only for
    implementations named "flash" and otherwise splits the patches and calls the attention once
    per image. Our kernel takes the packed form directly, so a forward pre-hook on each vision
    attention module (a module whose ``forward`` takes ``cu_seqlens``; nothing else is touched, no
    forward is replaced) turns the split into one segment and passes the image boundaries along as
    ``cocoa_vision_cu_seqlens``. It acts only while the module's config says ``"cocoa_triton"``.
    Idempotent; returns the number of modules hooked."""
    import inspect

    count = 0
    for module in model.modules():
        if getattr(module, "_cocoa_one_call", False):
            count += 1
            continue
        forward = type(module).forward
        if not hasattr(module, "config") or "Vision" not in type(module).__name__:
            continue
        if "cu_seqlens" not in inspect.signature(forward).parameters or not hasattr(module, "qkv"):
            continue
        module.register_forward_pre_hook(_one_call_hook, with_kwargs=True)
        module._cocoa_one_call = True
        count += 1
    return count


def register() -> None:
    """Register "cocoa_triton" with transformers (done on ``import cocoa``; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, cocoa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, cocoa_mask)
