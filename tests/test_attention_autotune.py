"""Autotuning of the attention configs (``cocoa_kernels.attention.autotune``), all but the timing.

The space and its pruning by shared memory, the choice from an injected fake timer and fake
device (candidates launched on the call's own inputs: through the interpreter here, compiled on
a GPU), the cache (in memory, in a JSON file, with concurrent writers), the fallback when
candidates fail, the switch, and ``use_config`` pinning. ``test_estimate_matches_the_sm90a_compile``
checks the shared memory estimate against ptxas for the shipped Hopper configs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attention_cases import make_mask, make_qkv, run_with_grads, truth_and_baseline, assert_close
from conftest import DEVICE, ON_GPU
from sm90_compile import PTXAS, attention_cases
from cocoa_kernels import attention
from cocoa_kernels._backend import choose_impl
from cocoa_kernels.attention import autotune
from cocoa_kernels.attention import config as attn_config
from cocoa_kernels.attention import triton_bwd, triton_fwd
from cocoa_kernels.attention.autotune import Autotuner, Device, candidates, shared_memory_bytes
from cocoa_kernels.attention.config import AttentionConfig, KernelConfig, pick_config

HOPPER = Device("Fake H200", (9, 0), 227 * 1024)
ADA = Device("Fake L4", (8, 9), 99 * 1024)
ARCHS = {"sm90": (9, 0), "sm80": (8, 0), "sm89": (8, 9)}
DTYPES = {"bf16": 2, "fp32": 4}
SCALE = 0.125


class FakeTimer:
    """Stands in for ``do_bench``: a time per (kernel, config) (default 1.0 ms), candidates in
    ``fail`` raise as a failed compile would, and with ``launch`` every run really launches
    (through the interpreter) and its result is kept."""

    def __init__(self, times=None, fail=(), launch=False):
        self.times, self.fail, self.launch = dict(times or {}), set(fail), launch
        self.calls: list[tuple[str, KernelConfig]] = []
        self.results: list[tuple[str, KernelConfig, object]] = []

    def __call__(self, run, kernel, cfg):
        self.calls.append((kernel, cfg))
        if (kernel, cfg) in self.fail:
            raise RuntimeError("PTXASError: out of resources (simulated)")
        if self.launch:
            self.results.append((kernel, cfg, run()))
        return self.times.get((kernel, cfg), 1.0)


@pytest.fixture(autouse=True)
def _tuning_state(monkeypatch):
    """Each test starts with tuning unconfigured (no env switch) and leaves it so; nothing is
    pinned (conftest pins small tiles for every test, and a pin turns tuning off)."""
    monkeypatch.delenv(autotune.ENV_ENABLE, raising=False)
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    saved = (autotune._state.enabled, autotune._state.tuner)
    autotune._state.enabled, autotune._state.tuner = None, None
    if not ON_GPU:
        choose_impl("attention", DEVICE, "triton")  # the interpreter's bf16 fix, as attention() applies it
    with attn_config.use_config(None):
        yield
    autotune._state.enabled, autotune._state.tuner = saved


def _inputs(N=40, dtype=torch.bfloat16, B=1, Hq=2, Hkv=1, D=64, seed=0, device=DEVICE):
    """q, k, v, dO and the mask (a bridge) of one small call (on the GPU the fake timer's runs
    launch compiled kernels, here the interpreter)."""
    mask = make_mask("eos_bridge", B, N, seed=seed).to(device)
    q, k, v, do = make_qkv(B, Hq, Hkv, N, D, dtype, device, seed=seed)
    return q, k, v, do, mask


def _table(dtype=torch.bfloat16, capability=(9, 0), D=64) -> AttentionConfig:
    return pick_config(attn_config.block_d_for(D), torch.tensor([], dtype=dtype).element_size(), on_gpu=True,
                       capability=capability)


def _table_forward(q, k, v, lo, hi, table):
    """The forward's out and lse with the table's tiles, as the backward gets them saved."""
    return triton_fwd.attention_fwd(q, k, v, lo, hi, SCALE, table.fwd)


def _space(kernel, cfg: AttentionConfig, device=HOPPER, dtype=torch.bfloat16, D=64):
    size = torch.tensor([], dtype=dtype).element_size()
    return candidates(kernel, getattr(cfg, kernel), attn_config.block_d_for(D), size, device.shared_limit)


# --- the space and its pruning -------------------------------------------------------------------

@pytest.mark.parametrize("block_d", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_space_starts_with_the_table_entry(arch, dtype, block_d):
    table = pick_config(block_d, DTYPES[dtype], on_gpu=True, capability=ARCHS[arch])
    for kernel in autotune.KERNELS:
        space = candidates(kernel, getattr(table, kernel), block_d, DTYPES[dtype], 227 * 1024)
        assert space[0] == getattr(table, kernel)
        assert len(set(space)) == len(space), space
        if dtype == "fp32":  # the checking path keeps its table
            assert len(space) == 1
        else:
            assert 2 <= len(space) <= 9, f"{kernel}: {len(space)} candidates, the space should stay small"


def test_pruning_drops_what_does_not_fit_and_keeps_the_table_entry():
    table = _table(D=128)
    limit = 99 * 1024  # Ada's
    for kernel in autotune.KERNELS:
        full = candidates(kernel, getattr(table, kernel), 128, 2, 10**9)
        kept = candidates(kernel, getattr(table, kernel), 128, 2, limit)
        assert all(shared_memory_bytes(kernel, c, 128, 2) <= limit for c in kept[1:]), kernel
        assert set(kept) < set(full), f"{kernel}: nothing pruned at D = 128 in 99 KiB"
        assert set(full) - set(kept) == {c for c in full[1:] if shared_memory_bytes(kernel, c, 128, 2) > limit}
    # The Hopper forward (128x64, 3 stages: 128 KiB) does not fit in Ada's 99 KiB, but as the
    # table's entry it stays: it is the fallback, which runs anyway.
    assert shared_memory_bytes("fwd", table.fwd, 128, 2) > limit
    assert candidates("fwd", table.fwd, 128, 2, limit)[0] == table.fwd
    assert candidates("fwd", table.fwd, 128, 2, 1) == [table.fwd]


# Shared bytes Triton 3.6 allocated for sm_90a (bf16, compiled with ``sm90_compile.compile_case``;
# measurements, kept here so that the check runs in a second): the estimate is exact there, since
# wgmma reads every operand from shared memory.
MEASURED_SM90A = [
    ("fwd", 128, KernelConfig(128, 64, 8, 3), 131072), ("fwd", 128, KernelConfig(128, 128, 8, 2), 163840),
    ("fwd", 128, KernelConfig(64, 64, 4, 3), 114688), ("fwd", 64, KernelConfig(128, 32, 8, 3), 40960),
    ("dq", 128, KernelConfig(128, 32, 8, 2), 98304), ("dq", 128, KernelConfig(64, 64, 4, 3), 131072),
    ("dq", 64, KernelConfig(64, 32, 4, 2), 32768),
    ("dkdv", 128, KernelConfig(32, 128, 8, 2), 98816), ("dkdv", 128, KernelConfig(32, 128, 8, 3), 115712),
    ("dkdv", 128, KernelConfig(64, 64, 8, 2), 99328), ("dkdv", 64, KernelConfig(16, 128, 4, 2), 41216),
    # The largest candidates at D = 128: the forward's just fits the H200's 227 KiB.
    ("fwd", 128, KernelConfig(128, 128, 8, 3), 229376), ("dkdv", 128, KernelConfig(64, 128, 8, 3), 165888),
]


@pytest.mark.parametrize("kernel, block_d, cfg, shared", MEASURED_SM90A,
                         ids=[f"{k}-D{d}-{c.block_m}x{c.block_n}-s{c.num_stages}" for k, d, c, _ in MEASURED_SM90A])
def test_estimate_matches_measured_sm90a(kernel, block_d, cfg, shared):
    assert shared_memory_bytes(kernel, cfg, block_d, 2) == shared


SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.mark.skipif(not PTXAS.exists(), reason="the triton wheel has no ptxas here")
@pytest.mark.parametrize("label", ["fwd", "dq", "dkdv mha"])
def test_estimate_matches_the_sm90a_compile(label):
    """The shipped Hopper config at D = 128, compiled now (as ``tests/sm90_compile.py`` does): a
    kernel change that moves its shared memory away from the estimate (and so the pruning) fails."""
    case = next(c for c in attention_cases("bf16", "sm_90a", head_dims=(128,))
                if c.kernel == f"attention {label}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--dtype", "bf16", "--arch", "sm_90a",
                           "--case", case.name], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = KernelConfig(case.block_m, case.block_n, case.num_warps, case.num_stages)
    assert shared_memory_bytes(label.split()[0], cfg, 128, 2) == report["shared_bytes"], report


# --- choosing, on the call's own inputs ------------------------------------------------------------


def test_forward_takes_the_fastest_after_launching_every_candidate_on_the_call_inputs():
    q, k, v, do, mask = _inputs()
    lo, hi = mask.lo, mask.effective_hi()
    before = [t.clone() for t in (q, k, v, lo, hi)]
    table = _table()
    space = _space("fwd", table)
    timer = FakeTimer({("fwd", space[-1]): 0.5}, launch=True)
    cfg = Autotuner(timer, device=HOPPER).forward(table, q, k, v, lo, hi, SCALE)
    assert cfg == AttentionConfig(space[-1], table.dq, table.dkdv)
    assert [c for _, c in timer.calls] == space
    (out_truth, *_), (out_base, *_) = truth_and_baseline(q, k, v, do, mask, SCALE)
    for _, c, (out, lse) in timer.results:
        assert_close(f"forward at {c}", out, out_truth, out_base)
        assert lse.shape == (1, 2, 40) and lse.dtype == torch.float32
    for t, b in zip((q, k, v, lo, hi), before):
        assert torch.equal(t, b), "a candidate wrote into the call's tensors"


def test_backward_tunes_dq_then_dkdv_on_the_saved_tensors():
    q, k, v, do, mask = _inputs(Hq=4, Hkv=2)
    lo, hi = mask.lo, mask.effective_hi()
    table = _table()
    out, lse = _table_forward(q, k, v, lo, hi, table)
    saved = [t.clone() for t in (do, q, k, v, out, lse)]
    dq_space, dkdv_space = _space("dq", table), _space("dkdv", table)
    fast_dq, fast_dkdv = dq_space[2], dkdv_space[-1]
    timer = FakeTimer({("dq", fast_dq): 0.3, ("dkdv", fast_dkdv): 0.4}, launch=True)
    cfg = Autotuner(timer, device=HOPPER).backward(table, do, q, k, v, out, lse, lo, hi, SCALE)
    assert cfg == AttentionConfig(table.fwd, fast_dq, fast_dkdv)
    assert timer.calls == [("dq", c) for c in dq_space] + [("dkdv", c) for c in dkdv_space]
    truth, base = truth_and_baseline(q, k, v, do, mask, SCALE)
    for kernel, c, grads in timer.results:
        for name, g, t, b in zip(("dq", "dk", "dv"), grads, truth[1:], base[1:]):
            assert_close(f"{name} while tuning {kernel} at {c}", g, t, b)
    for t, b in zip((do, q, k, v, out, lse), saved):
        assert torch.equal(t, b), "a candidate wrote into the saved tensors"


def test_dkdv_is_timed_with_the_dq_just_chosen(monkeypatch):
    """The backward launcher runs both kernels: while dK/dV is tuned, dQ runs its choice."""
    launched = []
    monkeypatch.setattr(triton_bwd, "attention_bwd", lambda *args: launched.append(args[-1]))
    q, k, v, do, mask = _inputs()
    table = _table()
    fast_dq = _space("dq", table)[1]
    timer = FakeTimer({("dq", fast_dq): 0.3}, launch=True)
    Autotuner(timer, device=HOPPER).backward(table, do, q, k, v, q, q[..., 0].float(), mask.lo, mask.hi, SCALE)
    while_dkdv = [cfg for (kernel, _, _), cfg in zip(timer.results, launched) if kernel == "dkdv"]
    assert while_dkdv and all(cfg.dq == fast_dq for cfg in while_dkdv)
    assert [cfg.dkdv for cfg in while_dkdv] == _space("dkdv", table)


def test_ties_keep_the_table_entry():
    q, k, v, _, mask = _inputs()
    table = _table()
    cfg = Autotuner(FakeTimer(), device=HOPPER).forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE)
    assert cfg == table


def test_the_device_limit_prunes_what_is_timed():
    q, k, v, _, mask = _inputs(D=128)
    table = _table(D=128)
    timer = FakeTimer()
    Autotuner(timer, device=ADA).forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE)
    timed = [c for _, c in timer.calls]
    assert timed[0] == table.fwd
    assert all(shared_memory_bytes("fwd", c, 128, 2) <= ADA.shared_limit for c in timed[1:])
    assert len(timed) < len(_space("fwd", table, device=HOPPER, D=128))


# --- the cache -----------------------------------------------------------------------------------

def test_a_second_call_of_the_same_class_is_not_tuned_again():
    table = _table()
    timer = FakeTimer({("fwd", _space("fwd", table)[1]): 0.5})
    tuner = Autotuner(timer, device=HOPPER)
    q, k, v, _, mask = _inputs(N=40)
    first = tuner.forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE)
    calls = len(timer.calls)
    q, k, v, _, mask = _inputs(N=60, seed=1)  # same bucket (64), other values
    assert tuner.forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE) == first
    assert (tuner.tunings, len(timer.calls)) == (1, calls)
    q, k, v, _, mask = _inputs(N=70)  # next bucket: tuned
    tuner.forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE)
    assert tuner.tunings == 2


def test_cache_key_separates_what_changes_the_best_config():
    q, k, *_ = _inputs(N=40, Hq=4, Hkv=2)
    key = autotune.cache_key("fwd", HOPPER, q, k)
    variants = {
        "family": autotune.cache_key("bwd", HOPPER, q, k),
        "device": autotune.cache_key("fwd", ADA, q, k),
        "dtype": autotune.cache_key("fwd", HOPPER, q.float(), k.float()),
        "group": autotune.cache_key("fwd", HOPPER, q, k[:, :1]),
        "N bucket": autotune.cache_key("fwd", HOPPER, q.new_empty(1, 4, 65, 64), k),
        "B*Hq bucket": autotune.cache_key("fwd", HOPPER, q.new_empty(2, 4, 40, 64), k.new_empty(2, 2, 40, 64)),
        "head dim": autotune.cache_key("fwd", HOPPER, q.new_empty(1, 4, 40, 80), k.new_empty(1, 2, 40, 80)),
    }
    for what, other in variants.items():
        assert other != key, f"{what} does not change the key"
    # ...and what does not: N inside its bucket, head dims that pad alike.
    assert autotune.cache_key("fwd", HOPPER, q.new_empty(1, 4, 64, 64), k) == key
    assert autotune.cache_key("fwd", HOPPER, q.new_empty(1, 4, 40, 80), k.new_empty(1, 2, 40, 80)) == \
        autotune.cache_key("fwd", HOPPER, q.new_empty(1, 4, 40, 128), k.new_empty(1, 2, 40, 128))


def test_choices_persist_in_a_json_file(tmp_path):
    path = tmp_path / "sub" / "tuned.json"
    table = _table()
    fwd_fast, dq_fast, dkdv_fast = _space("fwd", table)[3], _space("dq", table)[1], _space("dkdv", table)[2]
    timer = FakeTimer({("fwd", fwd_fast): 0.1, ("dq", dq_fast): 0.1, ("dkdv", dkdv_fast): 0.1})
    q, k, v, do, mask = _inputs()
    lo, hi = mask.lo, mask.effective_hi()
    out, lse = _table_forward(q, k, v, lo, hi, table)
    tuner = Autotuner(timer, cache_path=path, device=HOPPER)
    tuner.forward(table, q, k, v, lo, hi, SCALE)
    tuner.backward(table, do, q, k, v, out, lse, lo, hi, SCALE)
    data = json.loads(path.read_text())
    assert data["format"] == "cocoa-attention-autotune/1"
    assert {tuple(sorted(e)) for e in data["entries"].values()} == {("fwd",), ("dkdv", "dq")}

    fresh = Autotuner(FakeTimer(fail={(kn, c) for kn in autotune.KERNELS for c in _space(kn, table)}),
                      cache_path=path, device=HOPPER)
    assert fresh.forward(table, q, k, v, lo, hi, SCALE).fwd == fwd_fast
    bwd = fresh.backward(table, do, q, k, v, out, lse, lo, hi, SCALE)
    assert (bwd.dq, bwd.dkdv, fresh.tunings) == (dq_fast, dkdv_fast, 0)


def _put_many(path, worker, count):
    store = autotune._Store(path)
    for i in range(count):
        store.put(f"worker{worker}-key{i}", {"fwd": KernelConfig(64, 16 << (i % 3), 4, 2)})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_writers_keep_every_entry(tmp_path):
    """Four processes write 15 entries each into one file at once: the lock and the merge keep all."""
    path = tmp_path / "tuned.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_put_many, args=(path, w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = autotune._Store(path)._read()
    assert sorted(entries) == sorted(f"worker{w}-key{i}" for w in range(4) for i in range(15))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "temporary files left behind"


@pytest.mark.parametrize("text, match", [
    ("{not json", "not JSON"),
    ('{"entries": {}}', "format"),
    ("[1, 2]", "format"),
    ('{"format": "cocoa-attention-autotune/1", "entries": {"k1": {"fwd": {"block_m": 128}}}}', "entry 'k1'"),
    ('{"format": "cocoa-attention-autotune/1", "entries": {"k2": {"fwd": {"block_m": 100, "block_n": 64, '
     '"num_warps": 4, "num_stages": 2}}}}', "entry 'k2'"),
    ('{"format": "cocoa-attention-autotune/1", "entries": {"k3": {"bwd": {"block_m": 64, "block_n": 64, '
     '"num_warps": 4, "num_stages": 2}}}}', "entry 'k3'"),
], ids=["not-json", "no-format", "a-list", "missing-fields", "tile-not-pow2", "unknown-kernel"])
def test_a_bad_cache_file_is_named_in_the_error(tmp_path, text, match):
    path = tmp_path / "tuned.json"
    path.write_text(text)
    q, k, v, _, mask = _inputs()
    with pytest.raises(ValueError, match=match) as info:
        Autotuner(FakeTimer(), cache_path=path, device=HOPPER).forward(_table(), q, k, v, mask.lo, mask.hi, SCALE)
    assert str(path) in str(info.value)


# --- failures ------------------------------------------------------------------------------------

def test_failing_candidates_are_skipped_with_one_warning(caplog):
    table = _table()
    space = _space("fwd", table)
    timer = FakeTimer({("fwd", space[1]): 0.1, ("fwd", space[2]): 0.2}, fail={("fwd", space[1]), ("fwd", space[4])})
    q, k, v, _, mask = _inputs()
    with caplog.at_level(logging.WARNING, logger=autotune.__name__):
        cfg = Autotuner(timer, device=HOPPER).forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE)
    assert cfg.fwd == space[2]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 of" in warnings[0] and "PTXASError" in warnings[0], warnings


def test_when_every_candidate_fails_the_table_is_used_and_not_persisted(tmp_path, caplog):
    table = _table()
    path = tmp_path / "tuned.json"
    timer = FakeTimer(fail={("fwd", c) for c in _space("fwd", table)})
    tuner = Autotuner(timer, cache_path=path, device=HOPPER)
    q, k, v, _, mask = _inputs()
    with caplog.at_level(logging.WARNING, logger=autotune.__name__):
        assert tuner.forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE) == table
        assert tuner.forward(table, q, k, v, mask.lo, mask.effective_hi(), SCALE) == table
    assert tuner.tunings == 1, "a failed class is remembered for the process, not retried every call"
    assert not path.exists(), "a failure must not be written for other runs"
    assert any("every candidate failed" in r.getMessage() for r in caplog.records)


def test_fp32_is_not_tuned():
    q, k, v, do, mask = _inputs(dtype=torch.float32)
    lo, hi = mask.lo, mask.effective_hi()
    table = _table(torch.float32)
    timer = FakeTimer()
    tuner = Autotuner(timer, device=HOPPER)
    assert tuner.forward(table, q, k, v, lo, hi, SCALE) == table
    assert tuner.backward(table, do, q, k, v, q, q[..., 0].float(), lo, hi, SCALE) == table
    assert (timer.calls, tuner.tunings) == ([], 0)


def test_no_tuning_under_cuda_graph_capture(monkeypatch):
    """Nothing may be timed while a graph is captured: the table, and the class stays untuned."""
    monkeypatch.setattr(autotune, "_capturing", lambda q: True)
    q, k, v, _, mask = _inputs()
    timer = FakeTimer()
    tuner = Autotuner(timer, device=HOPPER)
    assert tuner.forward(_table(), q, k, v, mask.lo, mask.effective_hi(), SCALE) == _table()
    assert (timer.calls, tuner.tunings, tuner._store.entries) == ([], 0, {})


def test_an_unwritable_cache_path_is_named_in_the_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "tuned.json"  # its folder is a file
    q, k, v, _, mask = _inputs()
    with pytest.raises(OSError, match="a-file/tuned.json"):
        Autotuner(FakeTimer(), cache_path=path, device=HOPPER).forward(_table(), q, k, v, mask.lo, mask.hi, SCALE)


def test_device_facts_fall_back_to_a_table_of_shared_memory(monkeypatch):
    """torch without ``shared_memory_per_block_optin`` (older releases): the limit by capability."""
    props = {0: SimpleNamespace(name="GPU A", major=8, minor=9),
             1: SimpleNamespace(name="GPU B", major=9, minor=0, shared_memory_per_block_optin=232448)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", props.__getitem__)
    autotune._cuda_device.cache_clear()
    try:
        assert Device.of(torch.device("cuda", 0)) == Device("GPU A", (8, 9), 99 * 1024)
        assert Device.of(torch.device("cuda", 1)) == Device("GPU B", (9, 0), 232448)
    finally:
        autotune._cuda_device.cache_clear()
    assert Device.of(torch.device("cpu")) is None


@pytest.mark.skipif(not ON_GPU, reason="times for real with do_bench")
def test_real_tuning_on_the_gpu():
    q, k, v, do, mask = _inputs(N=1000, B=2, Hq=4, Hkv=2)
    lo, hi = mask.lo, mask.effective_hi()
    table = pick_config(64, 2, on_gpu=True)
    tuner = Autotuner()
    cfg = tuner.forward(table, q, k, v, lo, hi, SCALE)
    assert cfg.fwd in candidates("fwd", table.fwd, 64, 2, Device.of(q.device).shared_limit)
    assert tuner.forward(table, q, k, v, lo, hi, SCALE) == cfg and tuner.tunings == 1


def test_no_tuning_off_cuda_without_a_device():
    q, k, v, _, mask = _inputs(device=torch.device("cpu"))
    timer = FakeTimer()
    assert Autotuner(timer).forward(_table(), q, k, v, mask.lo, mask.effective_hi(), SCALE) == _table()
    assert timer.calls == []


# --- the switch and pinning, through attention() ---------------------------------------------------

@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("off", False), ("1", True), ("TRUE", True)])
def test_env_switch(monkeypatch, value, on):
    monkeypatch.setenv(autotune.ENV_ENABLE, value)
    assert autotune.enabled() is on


def test_env_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(autotune.ENV_ENABLE, "maybe")
    with pytest.raises(ValueError, match="COCOA_AUTOTUNE"):
        autotune.enabled()


def test_enable_overrides_the_env_and_reads_the_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_ENABLE, "1")
    autotune.enable(False)
    assert not autotune.enabled()
    autotune.enable()
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / "env.json"))
    assert autotune._tuner()._store.path == tmp_path / "env.json"
    with pytest.raises(TypeError, match="bool"):
        autotune.enable("yes")


def _attention_with_grads(q, k, v, do, mask):
    return run_with_grads(lambda a, b, c: attention(a, b, c, mask, scale=SCALE, impl="triton"), q, k, v, do)


def test_attention_uses_the_tuned_configs_and_stays_correct():
    """Unpinned and switched on, a training step tunes the forward and the backward once each
    and runs the chosen tiles (different from the interpreter's table)."""
    q, k, v, do, mask = _inputs(N=50, Hq=4, Hkv=2)
    table = pick_config(64, 2, on_gpu=ON_GPU)
    chosen = {kn: _space(kn, table)[-1] for kn in autotune.KERNELS}
    timer = FakeTimer({(kn, c): 0.1 for kn, c in chosen.items()})
    tuner = Autotuner(timer, device=HOPPER)
    autotune.enable(tuner=tuner)
    got = _attention_with_grads(q, k, v, do, mask)
    again = _attention_with_grads(q, k, v, do, mask)
    assert tuner.tunings == 2
    assert {c for _, c in timer.calls} >= set(chosen.values())
    assert tuner._store.entries and all(
        choice[kn] == chosen[kn] for choice in tuner._store.entries.values() for kn in choice)
    truth, base = truth_and_baseline(q, k, v, do, mask, SCALE)
    for name, g, t, b, g2 in zip(("out", "dq", "dk", "dv"), got, truth, base, again):
        assert_close(name, g, t, b)
        assert torch.equal(g, g2), f"{name}: the cached choice gave another result"


def test_use_config_pins_and_skips_tuning():
    q, k, v, do, mask = _inputs()
    timer = FakeTimer()
    autotune.enable(tuner=Autotuner(timer, device=HOPPER))
    pinned = AttentionConfig(KernelConfig(16, 16), KernelConfig(16, 16), KernelConfig(16, 16))
    with attn_config.use_config(pinned):
        _attention_with_grads(q, k, v, do, mask)
        assert autotune.tuned_forward(pinned, q, k, v, mask.lo, mask.hi, SCALE) is pinned
    assert timer.calls == []


def test_off_by_default():
    q, k, v, do, mask = _inputs()
    timer = FakeTimer()
    autotune._state.tuner = Autotuner(timer, device=HOPPER)
    _attention_with_grads(q, k, v, do, mask)
    assert timer.calls == []
