"""Autotuning of the attention kernels' tile configs: opt-in, cached, the table as fallback.

**Off by default.** The first call of each new shape class then compiles and times up to nine
variants of every kernel (on the first training step: tens of seconds of compilation per class,
more on a loaded machine), and the bitwise result of a run would depend on which variant won a
timing. Switch it on with ``COCOA_AUTOTUNE=1`` in the environment or :func:`enable`; keep the
choices across processes with ``COCOA_AUTOTUNE_CACHE=/path/choices.json`` (or
``enable(cache_path=...)``). Tuning once and sharing that file makes later runs reproducible and
gives every rank the same configs. Off, or when a launch is pinned by ``config.use_config``, or
under CUDA graph capture, or when every candidate fails, the launch uses the shipped table
(``config.pick_config``) exactly as without this module.

The space, per kernel (forward; dQ; dK/dV), for a given (GPU capability, dtype, padded head dim):
the table's entry for that triple first, then for 16-bit inputs the ``_SPACE_16BIT`` tiles below
with each of the ``_STAGES_16BIT`` pipeline depths, dropping every candidate whose
:func:`shared_memory_bytes` exceeds the device's per-block limit
(``shared_memory_per_block_optin``): at most 9 per kernel. The table's entry is never dropped: it
is the fallback and runs anyway. fp32 inputs keep the table (nothing to tune).

The timing: each kernel's candidates are timed on the call's own inputs through the usual
launchers (``triton_fwd.attention_fwd``, ``triton_bwd.attention_bwd``), which write into fresh
buffers, so the call's tensors are only read: the forward on q, k, v and the mask; the backward on
the saved tensors. The backward launcher runs dQ then dK/dV (dK/dV reads dQ's row statistic), so
its kernels are tuned one after the other: dQ with the table's dK/dV, then dK/dV with the dQ just
chosen (the other kernel adds the same time to every candidate). A candidate that fails to
compile or launch is skipped (one warning per kernel and class lists them). The timer is
``triton.testing.do_bench`` (median) by default and injectable (``Autotuner(timer=...)``). The
non-deterministic fused backward (``deterministic=False``) keeps its own table, untuned.

The cache key (:func:`cache_key`) holds what changes the fastest config and is known on the host
without reading the device: GPU name and capability, dtype, padded head dim, GQA group, N and
B * Hq (each rounded up to a power of two: tile counts and waves), the Triton version, and the
kernel family (forward or backward). Not the mask family: ``lo``/``hi`` are on the device, and
summarising them would stall every launch on a host synchronisation; a training stage keeps one
family per call site, so a process sees few families per key, and the cost of a shared key is a
config tuned on a neighbouring family, never a wrong result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import AttentionConfig, KernelConfig, block_d_for, pinned_config

log = logging.getLogger(__name__)

ENV_ENABLE = "COCOA_AUTOTUNE"
ENV_CACHE = "COCOA_AUTOTUNE_CACHE"
KERNELS = ("fwd", "dq", "dkdv")
_FILE_FORMAT = "cocoa-attention-autotune/1"

# (block_m, block_n, num_warps) per kernel; fwd and dq keep block_m query rows resident and step
# over keys block_n at a time, dkdv keeps block_n keys resident and steps over block_m query rows.
# Around the shipped tiles (the Triton tutorial's shapes): the loop step halved and doubled, a
# smaller resident tile; each tried with every pipeline depth of _STAGES_16BIT.
_SPACE_16BIT = {
    "fwd": ((128, 32, 8), (128, 64, 8), (128, 128, 8), (64, 64, 4)),
    "dq": ((128, 32, 8), (128, 64, 8), (64, 32, 4), (64, 64, 4)),
    "dkdv": ((32, 64, 8), (32, 128, 8), (64, 64, 8), (64, 128, 8)),
}
_STAGES_16BIT = (2, 3)
# fp32 is not tuned: it is the checking path, its tf32x3 products spill at every tile size (the
# table takes the smallest), and its shared memory does not follow the estimate below.

# Shared memory per block when torch does not report it (older torch): CUDA's
# sharedMemPerBlockOptin by capability major.minor; unknown ones get the smallest (Ada's).
_SHARED_LIMIT_BY_CAPABILITY = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                               (9, 0): 227 * 1024}


def shared_memory_bytes(kernel: str, cfg: KernelConfig, block_d: int, element_size: int) -> int:
    """Estimated shared memory of one program of ``kernel`` at ``cfg``: the tiles the dots read
    from shared memory, the resident ones once and the streamed ones once per pipeline stage.

    fwd: Q resident, K and V streamed. dq: Q and dO resident, K and V streamed. dkdv: K and V
    resident, Q and dO streamed with their rows' lse and delta (fp32; Triton rounds that small
    buffer's stage count up to a power of two). Against what Triton 3.6 allocates (compiled as
    ``tests/sm90_compile.py`` does, 16-bit): exact on sm_90a, where wgmma reads every operand
    from shared memory (44 tiles at D = 64 and 128, every 16-bit candidate at D = 128 among
    them); on sm_80 (mma.sync, as on sm_86/89; 34 tiles) high by 4 to 64 KiB and never low, as
    resident tiles stay in registers there, so a few tiles that would fit Ada's 99 KiB are not
    tried. Not a model of fp32's tf32x3 kernels (off by -64 to +32 KiB), which are not tuned."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    rows = cfg.block_m * block_d * element_size  # one (block_m, D) tile: Q or dO
    keys = cfg.block_n * block_d * element_size  # one (block_n, D) tile: K or V
    if kernel == "fwd":
        return rows + cfg.num_stages * 2 * keys
    if kernel == "dq":
        return 2 * rows + cfg.num_stages * 2 * keys
    row_stats = 2 * _pow2_at_least(cfg.num_stages) * cfg.block_m * 4
    return 2 * keys + cfg.num_stages * 2 * rows + row_stats


def candidates(kernel: str, default: KernelConfig, block_d: int, element_size: int,
               shared_limit: int) -> list[KernelConfig]:
    """The configs tried for ``kernel``: ``default`` (the table's) first, then the space's
    candidates whose shared memory estimate fits ``shared_limit`` bytes, without repeats; for
    fp32 inputs ``default`` alone."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    out = [default]
    if element_size >= 4:
        return out
    for block_m, block_n, warps in _SPACE_16BIT[kernel]:
        for num_stages in _STAGES_16BIT:
            cfg = KernelConfig(block_m, block_n, num_warps=warps, num_stages=num_stages)
            if cfg not in out and shared_memory_bytes(kernel, cfg, block_d, element_size) <= shared_limit:
                out.append(cfg)
    return out


@dataclass(frozen=True)
class Device:
    """What tuning needs to know about the GPU that runs the kernels."""

    name: str
    capability: tuple[int, int]
    shared_limit: int  # bytes of shared memory one program may use (sharedMemPerBlockOptin)

    @classmethod
    def of(cls, device: torch.device) -> "Device | None":
        """The CUDA device's facts; None off CUDA (the interpreter: nothing to time)."""
        if device.type != "cuda":
            return None
        return _cuda_device(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:
        limit = _SHARED_LIMIT_BY_CAPABILITY.get(capability, min(_SHARED_LIMIT_BY_CAPABILITY.values()))
    return Device(props.name, capability, int(limit))


def cache_key(family: str, device: Device, q: torch.Tensor, k: torch.Tensor) -> str:
    """The key of a choice: ``family`` ("fwd" or "bwd") and what changes the fastest config
    (module docstring). q: (B, Hq, N, D); k: (B, Hkv, N, D)."""
    import triton

    B, Hq, N, D = q.shape
    major, minor = device.capability
    dtype = str(q.dtype).removeprefix("torch.")
    return (f"{family}|{device.name}|sm{major}{minor}|{dtype}|D{block_d_for(D)}|group{Hq // k.shape[1]}"
            f"|N{_pow2_at_least(N)}|BH{_pow2_at_least(B * Hq)}|triton{triton.__version__}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


Timer = Callable[[Callable[[], object], str, KernelConfig], float]


def do_bench_timer(run: Callable[[], object], kernel: str, cfg: KernelConfig) -> float:
    """Median milliseconds of ``run`` by ``triton.testing.do_bench`` (which warms up first, so the
    compilation is not timed). ``kernel`` and ``cfg`` name the candidate; unused here."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")


class _Store:
    """Choices in memory, mirrored to a JSON file when a path is given. The file is rewritten
    whole through a temporary file and ``os.replace`` (a reader never sees half a file), after
    re-reading it under an exclusive ``flock`` on ``<path>.lock`` (where ``fcntl`` exists), so
    concurrent writers merge their entries instead of dropping each other's."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, KernelConfig]] = {}

    def get(self, key: str) -> dict[str, KernelConfig] | None:
        if key not in self.entries and self.path is not None:
            self.entries.update(self._read())  # another process may have tuned it meanwhile
        return self.entries.get(key)

    def put(self, key: str, choice: dict[str, KernelConfig], persist: bool = True) -> None:
        self.entries[key] = choice
        if persist and self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._locked():
                    merged = {**self._read(), key: choice}
                    self.entries.update(merged)
                    self._write(merged)
            except OSError as e:
                raise OSError(f"autotune cache {self.path} ({ENV_CACHE}): cannot write it: {e}") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: atomic replace only; a racing writer may drop an entry
            yield
            return
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, KernelConfig]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        where = f"autotune cache {self.path} ({ENV_CACHE})"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e}); delete the file or point {ENV_CACHE} elsewhere") from e
        data = data if isinstance(data, dict) else {}
        entries = data.get("entries")
        if data.get("format") != _FILE_FORMAT or not isinstance(entries, dict):
            raise ValueError(f"{where}: expected an object with \"format\": {_FILE_FORMAT!r} and \"entries\"")
        return {key: _parse_choice(where, key, value) for key, value in entries.items()}

    def _write(self, entries: dict[str, dict[str, KernelConfig]]) -> None:
        data = {"format": _FILE_FORMAT,
                "entries": {key: {kernel: dataclasses.asdict(cfg) for kernel, cfg in choice.items()}
                            for key, choice in sorted(entries.items())}}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _parse_choice(where: str, key: str, value) -> dict[str, KernelConfig]:
    expected = ("an object mapping kernels (fwd, dq, dkdv) to {block_m, block_n, num_warps, num_stages}, "
                "tiles powers of two >= 16, warps a power of two <= 16, stages >= 1")
    try:
        choice = {kernel: KernelConfig(**fields) for kernel, fields in value.items()}
    except (AttributeError, TypeError) as e:
        raise ValueError(f"{where}: entry {key!r}: expected {expected}, got {value!r}") from e
    def pow2(x, low, high):
        return isinstance(x, int) and low <= x <= high and x & (x - 1) == 0

    for kernel, cfg in choice.items():
        ok = (pow2(cfg.block_m, 16, 1024) and pow2(cfg.block_n, 16, 1024) and pow2(cfg.num_warps, 1, 16)
              and isinstance(cfg.num_stages, int) and cfg.num_stages >= 1)
        if kernel not in KERNELS or not ok:
            raise ValueError(f"{where}: entry {key!r}: expected {expected}, got {value!r}")
    return choice


class Autotuner:
    """Tunes and remembers configs. ``timer(run, kernel, cfg)`` returns the time of ``run()``
    (default :func:`do_bench_timer`); ``cache_path`` mirrors the choices to a JSON file;
    ``device`` overrides the GPU's facts (tests; also lets the interpreter tune with a fake timer).
    ``tunings`` counts the tunings run (cache misses)."""

    def __init__(self, timer: Timer = do_bench_timer, cache_path: str | os.PathLike | None = None,
                 device: Device | None = None):
        self.timer = timer
        self.device = device
        self.tunings = 0
        self._store = _Store(cache_path)
        self._lock = threading.Lock()

    def forward(self, default: AttentionConfig, q, k, v, lo, hi, scale: float) -> AttentionConfig:
        """``default`` with its forward config replaced by the fastest for this call's class."""
        device = self.device or Device.of(q.device)
        if device is None:
            return default
        space = candidates("fwd", default.fwd, block_d_for(q.shape[-1]), q.element_size(), device.shared_limit)
        if len(space) == 1:
            return default

        def tune(key: str):
            from .triton_fwd import attention_fwd as launch

            best = self._fastest(key, "fwd", space, lambda c: launch(q, k, v, lo, hi, scale, c))
            return {"fwd": best or default.fwd}, best is not None

        choice = self._choice(cache_key("fwd", device, q, k), q, tune)
        return default if choice is None else dataclasses.replace(default, fwd=choice["fwd"])

    def backward(self, default: AttentionConfig, do, q, k, v, out, lse, lo, hi, scale: float) -> AttentionConfig:
        """``default`` with its dQ and dK/dV configs replaced by the fastest for this call's class."""
        device = self.device or Device.of(q.device)
        if device is None:
            return default
        block_d, size, limit = block_d_for(q.shape[-1]), q.element_size(), device.shared_limit
        dq_space = candidates("dq", default.dq, block_d, size, limit)
        dkdv_space = candidates("dkdv", default.dkdv, block_d, size, limit)
        if len(dq_space) == len(dkdv_space) == 1:
            return default

        def tune(key: str):
            from .triton_bwd import attention_bwd as launch

            def run(cfg: AttentionConfig):
                return launch(do, q, k, v, out, lse, lo, hi, scale, cfg)

            dq = self._fastest(key, "dq", dq_space, lambda c: run(dataclasses.replace(default, dq=c)))
            dq_cfg = dq or default.dq
            dkdv = self._fastest(key, "dkdv", dkdv_space,
                                 lambda c: run(dataclasses.replace(default, dq=dq_cfg, dkdv=c)))
            return {"dq": dq_cfg, "dkdv": dkdv or default.dkdv}, dq is not None and dkdv is not None

        choice = self._choice(cache_key("bwd", device, q, k), q, tune)
        return default if choice is None else dataclasses.replace(default, dq=choice["dq"], dkdv=choice["dkdv"])

    def _choice(self, key: str, q: torch.Tensor, tune) -> dict[str, KernelConfig] | None:
        """The cached choice for ``key``, else ``tune(key)``'s (kept; written to the file unless
        every candidate of a kernel failed); None under CUDA graph capture (nothing is timed)."""
        with self._lock:
            choice = self._store.get(key)
            if choice is None:
                if _capturing(q):
                    return None
                self.tunings += 1
                choice, persist = tune(key)
                self._store.put(key, choice, persist=persist)
        return choice

    def _fastest(self, key: str, kernel: str, space: list[KernelConfig],
                 run_with: Callable[[KernelConfig], object]) -> KernelConfig | None:
        """The candidate of least time (the earlier on ties: the table's first); None when every
        candidate failed. Failures are any exception of the run or the timer (compile errors,
        out of resources), so that a bad candidate never stops a training run."""
        timed, failed = [], []
        for index, cfg in enumerate(space):
            try:
                ms = float(self.timer(functools.partial(run_with, cfg), kernel, cfg))
            except Exception as e:  # noqa: BLE001 - any failure of a candidate only skips it
                failed.append(f"{cfg} ({type(e).__name__}: {str(e)[:200]})")
                continue
            if math.isnan(ms):
                failed.append(f"{cfg} (timer returned NaN)")
                continue
            timed.append((ms, index, cfg))
        if failed:
            log.warning("cocoa attention autotune %s [%s]: %d of %d candidates failed and were skipped: %s",
                        kernel, key, len(failed), len(space), "; ".join(failed))
        if not timed:
            log.warning("cocoa attention autotune %s [%s]: every candidate failed; using the table's %s",
                        kernel, key, space[0])
            return None
        return min(timed)[2]


def _capturing(q: torch.Tensor) -> bool:
    """Inside CUDA graph capture nothing may be timed or synchronised: use the table."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


class _State:
    enabled: bool | None = None  # None: read COCOA_AUTOTUNE
    tuner: Autotuner | None = None  # None: built on first use, cache path from COCOA_AUTOTUNE_CACHE


_state = _State()


def enable(on: bool = True, *, cache_path: str | os.PathLike | None = None, tuner: Autotuner | None = None) -> None:
    """Switch tuning on (or off with ``on=False``) for this process, overriding ``COCOA_AUTOTUNE``.
    ``cache_path``: the JSON file of choices (default ``COCOA_AUTOTUNE_CACHE``, else memory only);
    ``tuner``: a ready :class:`Autotuner` instead (a custom timer). Either replaces the current
    tuner and its in-memory choices."""
    if not isinstance(on, bool):
        raise TypeError(f"enable: on must be a bool, got {type(on).__name__}")
    if tuner is not None and cache_path is not None:
        raise ValueError("enable: pass cache_path or tuner, not both (a tuner has its own cache_path)")
    _state.enabled = on
    if tuner is not None:
        _state.tuner = tuner
    elif cache_path is not None:
        _state.tuner = Autotuner(cache_path=cache_path)


def enabled() -> bool:
    """Whether launches are tuned: :func:`enable`'s setting, else ``COCOA_AUTOTUNE``."""
    if _state.enabled is not None:
        return _state.enabled
    value = os.environ.get(ENV_ENABLE, "").strip().lower()
    if value in ("", "0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"{ENV_ENABLE} must be one of 1/true/on/yes or 0/false/off/no (or unset), got {value!r}")


def _tuner() -> Autotuner:
    if _state.tuner is None:
        _state.tuner = Autotuner(cache_path=os.environ.get(ENV_CACHE) or None)
    return _state.tuner


def tuned_forward(default: AttentionConfig, q, k, v, lo, hi, scale: float) -> AttentionConfig:
    """The config a forward launch uses: ``default`` (the table's, or the pinned one) unless
    tuning is on and nothing is pinned."""
    if not enabled() or pinned_config() is not None:
        return default
    return _tuner().forward(default, q, k, v, lo, hi, scale)


def tuned_backward(default: AttentionConfig, do, q, k, v, out, lse, lo, hi, scale: float) -> AttentionConfig:
    """The config a backward launch uses (as :func:`tuned_forward`)."""
    if not enabled() or pinned_config() is not None:
        return default
    return _tuner().backward(default, do, q, k, v, out, lse, lo, hi, scale)
