"""``cocoa.load_model``: a backbone with the cocoa attention in one call."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from .integration import ATTN_IMPLEMENTATION, one_call_vision_attention


def load_model(
    path_or_config: str | PretrainedConfig,
    attn_impl: str = ATTN_IMPLEMENTATION,
    dtype: torch.dtype | None = None,
    model_class=None,
    **kwargs,
):
    """Load a backbone (local path or hub id with weights; or a config for random weights).

    Multimodal configs (with a ``vision_config``, e.g. Qwen2-VL, Qwen2.5-VL) load with
    ``AutoModelForImageTextToText``, text-only ones with ``AutoModelForCausalLM``, unless
    ``model_class`` says otherwise. Every attention layer runs ``attn_impl``.

    ``dtype``: ``None`` keeps the checkpoint's own dtype (transformers' ``"auto"``: bf16 for
    Qwen2-VL) or, from a config, float32. Training passes ``torch.float32``: mixed precision keeps
    fp32 master weights and autocasts the compute (see :mod:`cocoa.train`).

    The vision tower attends over all the images of a batch in one call per block
    (:func:`cocoa.integration.one_call_vision_attention`).
    """
    config = path_or_config
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(path_or_config)
    if model_class is None:
        model_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    if isinstance(path_or_config, PretrainedConfig):
        model = model_class.from_config(path_or_config, attn_implementation=attn_impl, dtype=dtype, **kwargs)
    else:
        model = model_class.from_pretrained(path_or_config, attn_implementation=attn_impl, dtype=dtype, **kwargs)
    one_call_vision_attention(model)
    return model
