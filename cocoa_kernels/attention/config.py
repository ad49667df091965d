"""Tile sizes and launch parameters for the attention kernels.

Tables keyed on head dim and GPU generation: Hopper (H100/H200, chosen in bf16) and, for
Ampere/Ada, tiles that compile there without spills; the interpreter gets small tiles so CPU
tests stay quick. Tests pin a config with :func:`use_config` so that
multi-tile paths (masked edges, unmasked middles, partial last tiles) run at small N.
``autotune.py`` (opt-in, ``COCOA_AUTOTUNE=1``) times candidates around these entries per call
class; the tables stay the default, the fallback, and the first candidate.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .._pinned import Pinned


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig
    # Programs that share one K/V head's dK/dV (each takes GROUP / splits of its query heads and
    # writes an fp32 partial, summed afterwards). None: as few as give every SM several programs
    # (see ``dkdv_splits``); tests pin it to run the split path at small sizes.
    dkdv_splits: int | None = None
    # Programs that share one tile's loop (forward and dQ: its key tiles; dK/dV: its query tiles),
    # each writing an fp32 partial merged afterwards. None: as many as give every SM
    # ``LOOP_SPLIT_MIN_WAVES`` programs (see ``loop_splits``); tests pin it at small sizes.
    loop_splits: int | None = None
    # Tiles of the opt-in non-deterministic backward (``triton_bwd``, ACCUMULATE_DQ). None: the
    # ``_FUSED_BWD_*`` tables on a GPU, this config's dkdv tiles in the interpreter.
    fused_bwd: KernelConfig | None = None


_INTERPRETER = AttentionConfig(KernelConfig(32, 32), KernelConfig(32, 32), KernelConfig(32, 32))

# Padded head dim (64 or 128) -> configs for 16-bit inputs. The backward kernels keep the
# dimension they loop over short (keys for dQ, queries for dK/dV) and the resident one long, as
# the Triton tutorial does. Shared memory at D = 128, bf16, forward: Q 32 KiB + 3 stages of K and
# V tiles (16 KiB each) = 128 KiB of the H200's 228 KiB.
_GPU_16BIT = {
    64: AttentionConfig(
        fwd=KernelConfig(128, 64, num_warps=8, num_stages=3),  # 4 warps: 255 registers, spills (sm_90a compile)
        # 128x64 at 8 warps: 3.70 SASS instructions per key per warp (29.6 per key for the 8) vs
        # 33.0 for 128x32 at 4 warps; 188 registers, 0 spills (sm_90a compile). 4 warps spill.
        dq=KernelConfig(128, 64, num_warps=8, num_stages=2),
        dkdv=KernelConfig(32, 128, num_warps=8, num_stages=3),  # 4 warps spill at D = 64 (sm_90 compile)
    ),
    128: AttentionConfig(
        fwd=KernelConfig(128, 64, num_warps=8, num_stages=3),
        # 128x64: 4.73 SASS instructions per key against 6.59 at 128x32 (0 spills; 240 registers
        # at D = 128, 255 at D = 80/96, which pad to 128: no headroom left there).
        dq=KernelConfig(128, 64, num_warps=8, num_stages=2),
        dkdv=KernelConfig(32, 128, num_warps=8, num_stages=2),
    ),
}
# Ampere and Ada (sm_80/86/89): mma.sync keeps the dot operands in registers, where Hopper's wgmma
# reads them from shared memory, so the Hopper tiles spill there; and Ada has 99 KiB of shared
# memory per block. Chosen by compiling for sm_80 and sm_89 (tests/sm90_compile.py).
_GPU_16BIT_MMA_V2 = {
    64: AttentionConfig(
        fwd=KernelConfig(128, 64, num_warps=8, num_stages=3),
        dq=KernelConfig(128, 32, num_warps=8, num_stages=2),  # 4 warps spill on sm_80
        dkdv=KernelConfig(32, 128, num_warps=8, num_stages=2),  # 3 stages spill on sm_80
    ),
    128: AttentionConfig(  # Hopper's 128x64 forward and 32x128 dK/dV spill here at D = 80 to 128
        fwd=KernelConfig(128, 32, num_warps=8, num_stages=3),
        dq=KernelConfig(128, 32, num_warps=8, num_stages=2),
        dkdv=KernelConfig(32, 64, num_warps=8, num_stages=2),
    ),
}
# fp32 is for checking and small runs, not speed. Its products use "tf32x3" (three TF32 tensor-core
# products, about fp32 accuracy): exact-fp32 "ieee" dots fall back to FMA loops on Hopper, spill
# tens of KB of registers and take minutes to compile. Small tiles keep the split operands in budget.
_GPU_FP32 = AttentionConfig(
    fwd=KernelConfig(32, 32, num_warps=4, num_stages=2),
    dq=KernelConfig(32, 32, num_warps=4, num_stages=2),
    dkdv=KernelConfig(32, 32, num_warps=4, num_stages=2),
)

_pinned: Pinned[AttentionConfig] = Pinned()


def block_d_for(head_dim: int) -> int:
    """Head dim padded to the power of two the kernels tile with (at least 16 for tl.dot)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def pick_config(
    block_d: int, element_size: int, on_gpu: bool, capability: tuple[int, int] | None = None
) -> AttentionConfig:
    """The config for a launch; ``capability`` (major, minor) of the GPU, default the current
    device's: Hopper and later get ``_GPU_16BIT``, Ampere and Ada ``_GPU_16BIT_MMA_V2``."""
    if _pinned.config is not None:
        return _pinned.config
    if not on_gpu:
        return _INTERPRETER
    if element_size >= 4:
        return _GPU_FP32
    return _by_arch(_GPU_16BIT, _GPU_16BIT_MMA_V2, block_d, capability)


def _by_arch(hopper: dict, mma_v2: dict, block_d: int, capability: tuple[int, int] | None):
    """A 16-bit table's entry for the padded head dim: ``hopper`` from sm_90 on, ``mma_v2``
    (Ampere, Ada) before; ``capability`` default the current device's."""
    if capability is None:
        capability = _capability(torch.cuda.current_device())
    table = hopper if capability >= (9, 0) else mma_v2
    return table[64 if block_d <= 64 else 128]


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, looked up once per device."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# dK/dV programs per SM the split aims for. The work per key tile is uneven (a bridge's EOS tile
# is seen by every query of its segment, a block-B tile by a quarter of them), and programs taken
# heaviest first even out only when every SM runs several: with about 2 programs per SM the
# bridge at 16k tokens predicts 1.21x the ideal makespan, with 3 or more <= 1.01x
# (``python -m bench.work_model``). The per-tile work is on the device; reading it here would
# stall the launch, so the split follows the count of programs, sized for that imbalance.
DKDV_MIN_WAVES = 3


def dkdv_splits(cfg: AttentionConfig, group: int, programs: int, device: torch.device, sms: int | None = None) -> int:
    """How many programs share each K/V head in the dK/dV kernel: a divisor of ``group``.

    One program per (key tile, K/V head) gives too few programs to balance when B * H_kv * N is
    small (B 1, 2 K/V heads and 16k tokens make 256 programs for 132 SMs), so the group's query
    heads are then split over the smallest number of programs that reaches ``DKDV_MIN_WAVES``
    programs per SM (or the whole group). ``sms``: the SM count (default: the device's; off the
    GPU, no split). Pinned by ``cfg.dkdv_splits`` (rounded down to a divisor)."""
    divisors = [d for d in range(1, group + 1) if group % d == 0]
    if cfg.dkdv_splits is not None:
        return max(d for d in divisors if d <= max(1, cfg.dkdv_splits))
    if sms is None:
        if device.type != "cuda":
            return 1
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return next((d for d in divisors if programs * d >= DKDV_MIN_WAVES * sms), group)


# Programs per SM below which a kernel splits each tile's loop over several programs (flash-decoding
# style: fp32 partials merged by the launcher). Short rows give fewer tiles than SMs: the bridge at
# 1k tokens runs 96 forward programs on 132 SMs, 1.61x the ideal makespan; split to 3 programs per
# SM every short-row kernel predicts <= 1.09x (``python -m bench.work_model``). Each extra program
# repeats its prologue and writes an fp32 partial that a merge pass reads back: charging one loop
# iteration for each (``ratio_overhead``), 3 pieces beat 4 or 5 at 1k-4k tokens in every kernel
# (the bridge's forward at 1k: 1.49x with 3, 1.82x with 4, 1.91x with 5, 1.59x unsplit), hence the cap.
LOOP_SPLIT_MIN_WAVES = 3
LOOP_SPLIT_MAX = 3


def loop_splits(programs: int, max_iterations: int, device: torch.device, sms: int | None = None,
                cfg: AttentionConfig | None = None) -> int:
    """How many programs share each tile's loop: the fewest that give ``programs * splits >=
    LOOP_SPLIT_MIN_WAVES * sms``, at most ``LOOP_SPLIT_MAX`` and ``max_iterations`` (a bound on a
    tile's loop iterations: more pieces would be empty). ``sms``: default the device's; off the GPU, 1. Pinned by
    ``cfg.loop_splits`` (``cfg`` None: the config pinned by :func:`use_config`, if any)."""
    cfg = _pinned.config if cfg is None else cfg
    if cfg is not None and cfg.loop_splits is not None:
        return max(1, cfg.loop_splits)
    if sms is None:
        if device.type != "cuda":
            return 1
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = -(-LOOP_SPLIT_MIN_WAVES * sms // max(1, programs))
    return max(1, min(wanted, LOOP_SPLIT_MAX, max_iterations))


# The Hopper forward through tensor descriptors (``triton_fwd_tma``: sm_90 and later, 16-bit
# inputs), padded head dim -> tiles. TMA moves tiles without pointer tensors in registers, so
# 128x128 fits at D = 128 without spills: 201 registers, 161 KiB shared with 2 stages (3 take 225
# of the 227 KiB), 3.84 SASS instructions per key in the full-tile loop; at D = 64, 3 stages,
# 185 registers, 3.59 per key. 4 warps spill at D = 128 (tests/sm90_compile.py).
_GPU_16BIT_TMA = {
    64: KernelConfig(128, 128, num_warps=8, num_stages=3),
    128: KernelConfig(128, 128, num_warps=8, num_stages=2),
}


# The full-tile pass of the warp-specialised Hopper forward (``triton_fwd_ws``, opt-in through
# ``forward_path("tma_ws")``): its only loop is the unmasked one, which triton 3.6 warp-specialises
# at 4 warps (a TMA producer warp and two consumer warp groups of 64 rows; at 8 warps, or with the
# masked loops in the same kernel, it does not). Same 128x128 tiles as the TMA forward, whose
# kernel then runs the masked edges and merges. D = 128: 168 registers, 224 of the 227 KiB of
# shared memory with 2 stages, 3.52 SASS instructions per key per consumer warp (3.84 unspecialised);
# D = 64: 3 stages (tests/sm90_compile.py).
_GPU_16BIT_TMA_WS = {
    64: KernelConfig(128, 128, num_warps=4, num_stages=3),
    128: KernelConfig(128, 128, num_warps=4, num_stages=2),
}


# Which forward runs where several could: "auto" (the TMA one where ``op._triton_forward`` takes
# it, else the pointer one), "pointer" (the cp.async one everywhere, as on pre-Hopper GPUs) or
# "tma_ws" (where auto would take the TMA forward: its full tiles in a warp-specialised pass, the
# masked edges in a second, merged; elsewhere as auto). Not measured on a GPU yet, hence opt-in.
# Benchmarks time them side by side; :func:`forward_path` sets it for a block.
FORWARD_PATHS = ("auto", "pointer", "tma_ws")

# The triton releases whose compiler warp-specialises the full-tile pass: 3.6. From 3.7.1 on (3.7.1,
# 3.8.0 and 3.9.0 tried, 2026-12-08), its NVGPUWarpSpecialization pass fails on the kernel
# ("PassManager::run failed"); `python tests/sm90_compile.py --arch sm_90a` shows it.
WARP_SPECIALISED_TRITON = ((3, 6),)


def check_warp_specialised_pass() -> None:
    """Raise if the installed triton cannot compile the warp-specialised pass (checked before a
    ``forward_path("tma_ws")`` forward launches on a GPU; the interpreter runs it on any release)."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) not in WARP_SPECIALISED_TRITON:
        tested = ", ".join(f"{a}.{b}" for a, b in WARP_SPECIALISED_TRITON)
        raise RuntimeError(f"forward_path('tma_ws'): the warp-specialised pass compiles with triton {tested}; "
                           f"the installed triton {triton.__version__} fails to compile it. Install triton {tested} "
                           "or use forward_path('auto') (the one-pass TMA forward)")
_forward_path: Pinned[str] = Pinned()


def forward_path(path: str):
    """``with forward_path("pointer"):`` runs every Triton forward in the block on the pointer
    kernel, ``"tma_ws"`` on the warp-specialised TMA forward where the TMA forward applies;
    ``"auto"`` restores the automatic choice."""
    if path not in FORWARD_PATHS:
        raise ValueError(f"forward_path: path must be one of {FORWARD_PATHS}, got {path!r}")
    return _forward_path.use(path)


def current_forward_path() -> str:
    return _forward_path.config or "auto"


def tma_fwd_config(block_d: int, on_gpu: bool) -> KernelConfig:
    """Tiles of the TMA forward: a pinned config's ``fwd`` (tests), the interpreter's small tiles
    off the GPU, else ``_GPU_16BIT_TMA`` (its inputs are 16-bit on a GPU)."""
    if _pinned.config is not None:
        return _pinned.config.fwd
    if not on_gpu:
        return _INTERPRETER.fwd
    return _GPU_16BIT_TMA[64 if block_d <= 64 else 128]


def tma_ws_config(block_d: int, on_gpu: bool) -> KernelConfig:
    """Tiles and launch of the warp-specialised full-tile pass: a pinned config's ``fwd`` tiles
    (tests) at 4 warps (at 8, triton 3.6 drops the specialisation without a word), the
    interpreter's small tiles off the GPU, else ``_GPU_16BIT_TMA_WS``. Its tiles must be those of
    :func:`tma_fwd_config` (the two passes share the tile bounds)."""
    if _pinned.config is not None:
        return dataclasses.replace(_pinned.config.fwd, num_warps=4)
    if not on_gpu:
        return _INTERPRETER.fwd
    return _GPU_16BIT_TMA_WS[64 if block_d <= 64 else 128]


# Pin every launch inside a ``with use_config(config):`` block to ``config`` (for tests and tuning).
use_config = _pinned.use


def pinned_config() -> AttentionConfig | None:
    """The config :func:`use_config` pins now, if any (``autotune`` skips tuning then)."""
    return _pinned.config


# The non-deterministic backward (``attention(..., deterministic=False)``): the dK/dV kernel with
# ACCUMULATE_DQ holds K, V and the dK, dV accumulators of a key tile and also computes a
# [BLOCK_M, D] slice of dQ per step. Chosen by compiling for sm_80, sm_89 and sm_90a
# (tests/sm90_compile.py), padded head dim 64 or 128 -> tiles for 16-bit inputs.
_FUSED_BWD_16BIT = {
    64: KernelConfig(32, 128, num_warps=8, num_stages=3),
    128: KernelConfig(32, 128, num_warps=8, num_stages=2),
}
_FUSED_BWD_16BIT_MMA_V2 = {
    64: KernelConfig(32, 128, num_warps=8, num_stages=2),
    128: KernelConfig(32, 64, num_warps=8, num_stages=2),
}
# fp32 (tf32x3): 32 keys a tile need 128.5 KiB of shared memory at D = 128 (over Ada's 99) and
# spill; 16 keys compile without spills for sm_80, sm_89 and sm_90a at 80.5 KiB.
_FUSED_BWD_FP32 = KernelConfig(32, 16, num_warps=8, num_stages=2)


def fused_bwd_config(
    cfg: AttentionConfig, block_d: int, element_size: int, on_gpu: bool, capability: tuple[int, int] | None = None
) -> KernelConfig:
    """Tiles of the fused backward: ``cfg.fused_bwd`` when set (a pinned config), else the
    tables above on a GPU, else (interpreter) ``cfg.dkdv``, the small tiles tests pin."""
    if cfg.fused_bwd is not None:
        return cfg.fused_bwd
    if not on_gpu:
        return cfg.dkdv
    if element_size >= 4:
        return _FUSED_BWD_FP32
    return _by_arch(_FUSED_BWD_16BIT, _FUSED_BWD_16BIT_MMA_V2, block_d, capability)
