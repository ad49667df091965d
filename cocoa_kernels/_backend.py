"""Choosing between the Triton kernels and the PyTorch implementation (the ``impl=`` switch).

``impl=None`` picks Triton for CUDA tensors and PyTorch otherwise. ``impl="triton"`` on CPU
tensors runs the very same kernels through Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before Triton compiles anything; without it the request is an error, never
a silent fallback.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def choose_impl(op: str, device: torch.device, impl: str | None) -> str:
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS} or None, got {impl!r}")
    if impl == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton ships with Linux torch wheels
            raise RuntimeError(f"{op}: impl='triton' needs the triton package, which is not installed") from e
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors (got {device.type}); to run the Triton "
                "kernels on the CPU set TRITON_INTERPRET=1 before starting Python"
            )
        if device.type == "cpu":
            _fix_interpreter_bf16()
    return impl


_patched = False


def _fix_interpreter_bf16() -> None:
    """Make the Triton interpreter's bfloat16 arithmetic match a GPU's.

    The interpreter (triton 3.x) stores bfloat16 as raw uint16 and
    - hands those bits straight to ``np.matmul`` in ``tl.dot``, so a bf16 dot returns garbage;
      a GPU multiplies bf16 operands exactly into an fp32 accumulator, which widening the bits
      to float32 (bf16 is the top half of an fp32) and multiplying in fp32 reproduces;
    - truncates when casting fp32 to bf16, where a GPU rounds to nearest even; truncation biases
      every rounded probability downwards and doubles the error of bf16 attention.
    Only the interpreter is touched, once, and only when a Triton kernel is asked to run on CPU.
    """
    global _patched
    if _patched:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def widen(handle):
        if handle.get_element_ty() == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
            rounded = np.where(np.isnan(src.data), 0x7FC0, rounded).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    _patched = True
