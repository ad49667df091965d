"""Tile sizes and launch parameters for the attention kernels.

Tables keyed on head dim and GPU generation: Hopper (H100/H200, chosen in bf16) and, for
Ampere/Ada, tiles that compile there without spills; the interpreter gets small tiles so CPU
tests stay quick. Tests pin a config with :func:`use_config` so that
multi-tile paths (masked edges, unmasked middles, partial last tiles) run at small N.
"""

from __future__ import annotations

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


_INTERPRETER = AttentionConfig(KernelConfig(32, 32), KernelConfig(32, 32), KernelConfig(32, 32))

# Padded head dim (64 or 128) -> configs for 16-bit inputs. The backward kernels keep the
# dimension they loop over short (keys for dQ, queries for dK/dV) and the resident one long, as
# the Triton tutorial does. Shared memory at D = 128, bf16, forward: Q 32 KiB + 3 stages of K and
# V tiles (16 KiB each) = 128 KiB of the H200's 228 KiB.
_GPU_16BIT = {
    64: AttentionConfig(
        fwd=KernelConfig(128, 64, num_warps=8, num_stages=3),  # 4 warps: 255 registers, spills (sm_90a compile)
        dq=KernelConfig(128, 32, num_warps=4, num_stages=3),
        dkdv=KernelConfig(32, 128, num_warps=8, num_stages=3),  # 4 warps spill at D = 64 (sm_90 compile)
    ),
    128: AttentionConfig(
        fwd=KernelConfig(128, 64, num_warps=8, num_stages=3),
        dq=KernelConfig(128, 32, num_warps=8, num_stages=2),
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
    if capability is None:
        capability = _capability(torch.cuda.current_device())
    table = _GPU_16BIT if capability >= (9, 0) else _GPU_16BIT_MMA_V2
    return table[64 if block_d <= 64 else 128]


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


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


# Pin every launch inside a ``with use_config(config):`` block to ``config`` (for tests and tuning).
use_config = _pinned.use
