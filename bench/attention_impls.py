"""One adapter per attention implementation, all fed the same interval mask and inputs.

Every adapter takes token-major leaves (``AttnInputs``: q (B, N, Hq, D), k/v (B, N, Hkv, D), the
layout a transformers layer holds) and returns the output token-major, (B, N, Hq, D), so one
upstream gradient serves all. What each one is given:

- ``cocoa``: ``cocoa_kernels.attention`` on the (B, H, N, D) views, the ``KeyRanges`` as is.
- ``flex_attention``: ``torch.compile(flex_attention)`` with a ``BlockMask`` built once from the
  same intervals (``mask_mod``: ``lo[b, q] <= kv < hi[b, q]``), GQA through ``enable_gqa``.
- ``sdpa``: ``F.scaled_dot_product_attention`` with the dense (B, 1, N, N) boolean mask
  (``KeyRanges.to_dense``) and K/V repeated to Hq heads, as transformers' "sdpa" does with a mask.
- ``flash_attn``: ``flash_attn_varlen_func`` (flash-attn 2, else flash-attn 3's
  ``flash_attn_interface``) on the packed (B*N, H, D) tensors with ``cu_seqlens``; segment masks
  only (bidirectional or causal), the EOS bridge has no varlen form.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from cocoa_kernels import KeyRanges

from .measure import Prepared, Unavailable
from .timing import host_ms
from .workloads import AttnInputs, AttnShape, AttnWorkload


def _interpreting() -> bool:
    from cocoa_kernels._backend import interpreting

    return interpreting()


def _heads_first(x: AttnInputs):
    return x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2)


def _tensor_bytes(*objs) -> int:
    total = 0
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
    return total


class Cocoa:
    name = "cocoa"
    ours = True

    def prepare(self, w: AttnWorkload, mask: KeyRanges, shape: AttnShape, device) -> Prepared:
        from cocoa_kernels import attention

        impl = getattr(w, "ours_impl", None) or ("triton" if device.type == "cuda" or _interpreting() else "torch")

        def call(x: AttnInputs):
            q, k, v = _heads_first(x)
            return attention(q, k, v, mask, impl=impl).transpose(1, 2)

        detail = f"cocoa_kernels.attention(impl={impl!r}) on (B, H, N, D) views of token-major tensors"
        info = {"mask_mb": _tensor_bytes(mask.lo, mask.hi) / 2**20}
        if device.type != "cuda" and impl == "torch":
            # The CPU path plans its kernel calls once per mask (reused by the backward and by
            # every later call with the same mask, e.g. every layer of a model): that is its
            # mask preparation, timed here like SDPA's dense mask.
            from cocoa_kernels.attention import cpu

            lo, hi = mask.lo, mask.effective_hi()
            info["mask_build_ms"], _ = host_ms(lambda: cpu.plan(lo, hi, shape.heads_q, shape.head_dim), device)
            detail += " (PyTorch path: the CPU flash kernel on runs and masked chunks; its plan is the mask build)"
        elif device.type != "cuda":
            detail += " (Triton interpreter)"
        info["detail"] = detail
        return Prepared(call, info=info)


_COMPILED_FLEX = None


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process. Dynamo's recompile limits
    are raised: each sequence length (the N sweep) and each block mask may recompile."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def interval_block_mask(mask: KeyRanges, device):
    """A FlexAttention ``BlockMask`` of the interval mask (causal limit folded into hi), the
    build timed twice: the first call (cold) and the one kept (warm). Returns (mask, cold_ms, warm_ms)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lo, hi = mask.lo, mask.effective_hi()
    B, N = mask.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[b, q_idx]) & (kv_idx < hi[b, q_idx])

    def build():
        return create_block_mask(mask_mod, B, None, N, N, device=str(device))

    cold_ms, _ = host_ms(build, device)
    warm_ms, block_mask = host_ms(build, device)
    return block_mask, cold_ms, warm_ms


def block_mask_bytes(block_mask) -> int:
    return _tensor_bytes(*vars(block_mask).values())


class Flex:
    name = "flex_attention"
    ours = False

    def prepare(self, w: AttnWorkload, mask: KeyRanges, shape: AttnShape, device) -> Prepared:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise Unavailable(f"not installed: FlexAttention needs torch >= 2.5 (have {torch.__version__})")
        from torch.nn.attention.flex_attention import flex_attention

        block_mask, cold_ms, warm_ms = interval_block_mask(mask, device)
        info = {
            "mask_build_ms": warm_ms,
            "mask_build_cold_ms": cold_ms,
            "mask_mb": (block_mask_bytes(block_mask) + _tensor_bytes(mask.lo, mask.hi)) / 2**20,
        }
        if device.type == "cuda":
            fn = compiled_flex_attention()
            info["detail"] = "torch.compile(flex_attention, dynamic=False), BlockMask built once, enable_gqa=True"

            def call(x: AttnInputs):
                q, k, v = _heads_first(x)
                return fn(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

            return Prepared(call, info=info)

        # CPU (smoke): compiling takes ~30 s and FlexAttention has no CPU backward.
        info["detail"] = "eager flex_attention (smoke, CPU), forward on detached inputs"

        def call_cpu(x: AttnInputs):
            q, k, v = (t.detach() for t in _heads_first(x))
            with warnings.catch_warnings():  # "called without torch.compile": deliberate here
                warnings.simplefilter("ignore", UserWarning)
                return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

        return Prepared(call_cpu, backward=False, backward_note="backward not measured: FlexAttention has no CPU backward",
                        info=info)


class Sdpa:
    name = "sdpa"
    ours = False

    def prepare(self, w: AttnWorkload, mask: KeyRanges, shape: AttnShape, device) -> Prepared:
        build_ms, dense = host_ms(lambda: mask.to_dense()[:, None], device)  # (B, 1, N, N) bool
        rep = shape.heads_q // shape.heads_kv

        def call(x: AttnInputs):
            q, k, v = _heads_first(x)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense).transpose(1, 2)

        info = {
            "mask_build_ms": build_ms,
            "mask_mb": _tensor_bytes(dense) / 2**20,
            "detail": "F.scaled_dot_product_attention, dense bool mask (B, 1, N, N), K/V repeated to Hq heads "
            "inside the timed call; backend chosen by PyTorch",
        }
        return Prepared(call, info=info)


def flash_varlen():
    """(function, label) for the installed flash-attn varlen entry point, or Unavailable."""
    for module, label in (("flash_attn", "flash-attn 2"), ("flash_attn_interface", "flash-attn 3")):
        if importlib.util.find_spec(module) is None:
            continue
        try:
            mod = importlib.import_module(module)
        except Exception as e:
            raise Unavailable(f"{module} is installed but failed to import: {type(e).__name__}: {e}") from e
        fn = getattr(mod, "flash_attn_varlen_func", None)
        if fn is not None:
            return fn, label
    raise Unavailable("not installed: flash-attn (flash_attn / flash_attn_interface)")


class FlashVarlen:
    name = "flash_attn"
    ours = False

    def prepare(self, w: AttnWorkload, mask: KeyRanges, shape: AttnShape, device) -> Prepared:
        fn, label = flash_varlen()
        if w.kind not in ("bidir", "causal"):
            raise Unavailable(f"unsupported mask: {w.kind!r} has no varlen form (flash-attn takes causal or "
                              "bidirectional segments only)")
        if device.type != "cuda":
            raise Unavailable("needs CUDA (smoke run on CPU)")
        if shape.batch != 1:
            raise Unavailable("adapter packs one row (batch 1) only")
        cu = w.cu_seqlens(device)
        max_len = w.max_seqlen
        causal = w.kind == "causal"
        B, N, Hq, Hkv, D = shape.batch, w.n, shape.heads_q, shape.heads_kv, shape.head_dim

        def call(x: AttnInputs):
            out = fn(x.q.view(B * N, Hq, D), x.k.view(B * N, Hkv, D), x.v.view(B * N, Hkv, D),
                     cu, cu, max_len, max_len, causal=causal)
            if isinstance(out, (tuple, list)):  # some flash-attn 3 builds return (out, lse)
                out = out[0]
            return out.view(B, N, Hq, D)

        return Prepared(call, info={"mask_mb": _tensor_bytes(cu) / 2**20,
                                    "detail": f"{label} flash_attn_varlen_func, cu_seqlens, causal={causal}"})


class CocoaVariant(Cocoa):
    """Ours with one setting changed, timed beside the default ``cocoa`` row on the same inputs
    (its ratio column is variant / default time: above 1, the default is faster). Only on CUDA:
    the settings choose between Triton kernels. ``kwargs`` go to ``attention``; the measurement
    (forward, backward, output check) runs inside ``setting()`` (a context manager) when given.
    Left out of the bridge sweep to keep the GPU run in its time budget."""

    variant = True

    def __init__(self, name: str, label: str, kwargs: dict | None = None, setting=None):
        self.name, self.label, self.kwargs, self.setting = name, label, dict(kwargs or {}), setting

    def prepare(self, w: AttnWorkload, mask: KeyRanges, shape: AttnShape, device) -> Prepared:
        from cocoa_kernels import attention

        if device.type != "cuda":
            raise Unavailable("a Triton kernel variant: needs CUDA")

        def call(x: AttnInputs):
            q, k, v = _heads_first(x)
            return attention(q, k, v, mask, impl="triton", **self.kwargs).transpose(1, 2)

        return Prepared(call, setting=self.setting,
                        info={"mask_mb": _tensor_bytes(mask.lo, mask.hi) / 2**20,
                              "detail": f"cocoa_kernels.attention(impl='triton'), {self.label}"})


def _pointer_forward():
    """The pointer forward (cp.async) on every GPU: the TMA forward switched off."""
    from cocoa_kernels.attention import config

    return config.forward_path("pointer")


def _warp_specialised_forward():
    """The two-pass TMA forward (full tiles warp-specialised, then the masked edges) where the
    default runs the one-pass TMA forward."""
    from cocoa_kernels.attention import config

    return config.forward_path("tma_ws")


@contextlib.contextmanager
def _autotuned():
    """Autotuning on for the block (its choices are cached in the process: the warm-up calls tune)."""
    from cocoa_kernels.attention import autotune

    before = autotune.enabled()
    autotune.enable(True)
    try:
        yield
    finally:
        autotune.enable(before)


VARIANTS = (
    CocoaVariant("cocoa_nondeterministic", "deterministic=False: one backward kernel, 5 products per tile, atomic "
                 "fp32 dQ", kwargs={"deterministic": False}),
    CocoaVariant("cocoa_pointer_fwd", "the pointer (cp.async) forward instead of the TMA one", setting=_pointer_forward),
    CocoaVariant("cocoa_tma_ws", "the two-pass TMA forward: full tiles warp-specialised, then the masked edges",
                 setting=_warp_specialised_forward),
    CocoaVariant("cocoa_autotuned", "autotuned configs (tuned during the warm-up calls, cached)", setting=_autotuned),
)
IMPLS = {impl.name: impl for impl in (Cocoa(), Flex(), Sdpa(), FlashVarlen(), *VARIANTS)}
