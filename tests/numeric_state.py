"""Process-wide settings that change what a floating-point computation returns.

A test that changes one of these and does not put it back changes the numerics of every test that
runs after it in the same worker; ``conftest.py`` fails such a test at once, naming the setting,
instead of letting a later test fail by a hard-to-trace ulp drift.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_TINY = 1e-39  # a float32 subnormal


def _flushes_denormals() -> bool:
    # Flush-to-zero / denormals-are-zero (MXCSR on x86, set by torch.set_flush_denormal or by
    # loading a library built with -ffast-math): a subnormal input then multiplies to zero.
    torch_ftz = float((torch.tensor([_TINY], dtype=torch.float32) * 2).item()) == 0.0
    with np.errstate(all="ignore"):
        numpy_ftz = float(np.float32(_TINY) * np.float32(2)) == 0.0
    return torch_ftz or numpy_ftz


def _backend_flags() -> dict:
    flags = {}
    with warnings.catch_warnings():  # some of these getters warn about their newer spellings
        warnings.simplefilter("ignore")
        getters = {
            "mkldnn.enabled": lambda: torch.backends.mkldnn.enabled,
            "mkldnn.matmul.fp32_precision": lambda: torch.backends.mkldnn.matmul.fp32_precision,
            "mkldnn.conv.fp32_precision": lambda: torch.backends.mkldnn.conv.fp32_precision,
            "cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
            "cuda.matmul.allow_fp16_reduced_precision_reduction":
                lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "cuda.matmul.allow_bf16_reduced_precision_reduction":
                lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "cudnn.deterministic": lambda: torch.backends.cudnn.deterministic,
        }
        for name, get in getters.items():
            try:
                flags[name] = get()
            except (AttributeError, RuntimeError):  # not in this torch build
                pass
    return flags


def snapshot() -> dict:
    """Every global setting that can change a CPU or GPU float result, as plain values."""
    state = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "flush_denormal": _flushes_denormals(),
        "numpy_errstate": np.geterr(),
    }
    if torch.cuda.is_available():
        state["autocast_cuda"] = torch.is_autocast_enabled("cuda")
    state.update(_backend_flags())
    return state


def changes(before: dict, after: dict) -> list[str]:
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]
