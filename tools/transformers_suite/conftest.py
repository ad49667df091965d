"""Loaded by pytest for the transformers suite run by ``tools/transformers_suite/run.py``.

With ``COCOA_SUITE_IMPL=cocoa_triton`` every model that would run "sdpa" (asked for by name or
by default) runs "cocoa_triton" instead: the transformers tests that exercise "sdpa" then test
ours. With ``COCOA_SUITE_IMPL=sdpa`` nothing is changed (the baseline run)."""

from __future__ import annotations

import os

import cocoa  # noqa: F401  (registers "cocoa_triton")
from transformers.modeling_utils import PreTrainedModel

if os.environ.get("COCOA_SUITE_IMPL", "sdpa") == "cocoa_triton":
    _original = PreTrainedModel.get_correct_attn_implementation

    def _ours_for_sdpa(self, requested_attention, is_init_check=False):
        chosen = _original(self, requested_attention, is_init_check=is_init_check)
        return cocoa.ATTN_IMPLEMENTATION if chosen == "sdpa" else chosen

    PreTrainedModel.get_correct_attn_implementation = _ours_for_sdpa
