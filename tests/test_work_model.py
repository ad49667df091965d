"""bench/work_model.py: the predicted schedules of the attention kernels on 132 SMs, and the
model itself checked against counts made independently from the dense mask."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import work_model  # noqa: E402
from bench.workloads import AttnShape  # noqa: E402
from cocoa_kernels import KeyRanges  # noqa: E402
from cocoa_kernels.attention import config as attn_config  # noqa: E402
from cocoa_kernels.attention.triton_bwd import dkdv_schedule, dq_schedule  # noqa: E402
from cocoa_kernels.attention.triton_fwd import fwd_schedule  # noqa: E402

GOAL = 1.10
# Rows too short for their tiles: the bridge at 1k-4k tokens has fewer programs than SMs, or
# ~1.1-2.9 programs per SM of a few equal sizes, so some SMs must run one more big program than
# others whatever the order (the model's floor). Heavy-first reaches that floor there.
SHORT_ROWS = {"bridge_sweep_1k", "bridge_sweep_2k", "bridge_sweep_4k"}
WORKLOADS = work_model.all_workloads()


@pytest.fixture(autouse=True)
def _shipped_tiles():
    """The model predicts the GPU's configs: lift the small tiles conftest pins for the interpreter."""
    with attn_config.use_config(None):
        yield


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_every_kernel_within_goal_or_at_its_floor(workload):
    preds = work_model.predict_workload(workload)
    assert [p.kernel for p in preds] == list(work_model.KERNELS)
    for p in preds:
        assert p.floor <= p.ratio + 1e-9, p  # the model's floor is a true lower bound
        if workload.name in SHORT_ROWS:
            # A documented exception: the goal is out of reach for any order, and heavy-first
            # reaches the best that is possible.
            assert p.floor > GOAL, f"{p}: not an exception any more, drop it from SHORT_ROWS"
            assert p.ratio == pytest.approx(p.floor, abs=1e-9), p
        else:
            assert p.ratio <= GOAL, p


def test_heavy_first_order_is_a_permutation_by_decreasing_work():
    mask = KeyRanges.from_segments(torch.tensor([[0] * 70 + [1] * 30 + [2] * 60]), causal=True)
    cfg = attn_config.AttentionConfig(*(attn_config.KernelConfig(16, 32),) * 3)
    for sched in (fwd_schedule(mask.lo, mask.effective_hi(), 3, cfg.fwd),
                  dkdv_schedule(mask.lo, mask.effective_hi(), 4, 2, cfg, torch.device("cpu"))[0]):
        order = sched.order.long()
        assert sorted(order.tolist()) == list(range(sched.work.numel()))
        in_launch_order = sched.work[order]
        assert torch.all(in_launch_order[:-1] >= in_launch_order[1:])
        assert in_launch_order[0] > in_launch_order[-1]  # the case is not trivially uniform


def _hull_pairs(mask: KeyRanges, block_m: int, block_n: int) -> torch.Tensor:
    """(query tile, key tile) pairs a kernel visits, counted from the dense mask: every key tile
    that overlaps the hull of the keys the query tile's rows see. (nq, nk) bool."""
    dense = mask.to_dense()[0]
    n = dense.shape[0]
    nq, nk = -(-n // block_m), -(-n // block_n)
    pairs = torch.zeros(nq, nk, dtype=torch.bool)
    for m in range(nq):
        seen = dense[m * block_m:(m + 1) * block_m].any(0).nonzero().flatten()
        if seen.numel():
            pairs[m, int(seen[0]) // block_n:int(seen[-1]) // block_n + 1] = True
    return pairs


def _brute_makespan(work: list[int], sms: int) -> int:
    """Unit time steps: at every step, each free SM takes the next program ids in order."""
    busy_until, nxt, t = [0] * sms, 0, 0
    while nxt < len(work):
        for sm in range(sms):
            while busy_until[sm] <= t and nxt < len(work):
                busy_until[sm] = t + work[nxt]
                nxt += 1
        t += 1
    return max(busy_until)


@pytest.mark.parametrize("sms", [1, 3, 5])
def test_list_schedule_matches_a_time_stepped_simulation(sms):
    rng = random.Random(sms)
    for _ in range(20):
        work = [rng.randint(0, 9) for _ in range(rng.randint(1, 17))]
        assert work_model.list_schedule(work, sms) == _brute_makespan(work, sms), work
    assert work_model.list_schedule([], sms) == 0


def test_model_agrees_with_a_brute_force_count_on_a_tiny_bridge():
    """Work per program from the dense mask, launch order by sorting it, makespan by time steps:
    nothing shared with the launchers' tile bounds but the mask."""
    seg = torch.tensor([[0] * 37 + [1] * 29 + [2] * 30])
    target = torch.zeros_like(seg, dtype=torch.bool)
    target[0, 28:37] = True
    target[0, 60:66] = True
    target[0, 85:] = True
    mask = KeyRanges.eos_bridge(seg, target)
    shape = AttnShape(heads_q=4, heads_kv=2, head_dim=64)
    cfg = attn_config.AttentionConfig(attn_config.KernelConfig(16, 8), attn_config.KernelConfig(8, 16),
                                      attn_config.KernelConfig(8, 16))
    sms = 5
    with attn_config.use_config(cfg):
        preds = {p.kernel: p for p in work_model.predict_workload(_Tiny(mask), shape, sms=sms)}
    fwd = _hull_pairs(mask, 16, 8).sum(1).tolist() * shape.heads_q
    dq = _hull_pairs(mask, 8, 16).sum(1).tolist() * shape.heads_q
    per_key_tile = _hull_pairs(mask, 8, 16).sum(0).tolist()
    splits = attn_config.dkdv_splits(cfg, 2, 2 * len(per_key_tile), None, sms=sms)
    assert splits == 2  # 12 programs < 3 waves of 5 SMs: the group of 2 is split
    dkdv = [w * (2 // splits) for w in per_key_tile] * (shape.heads_kv * splits)
    for name, work in (("fwd", fwd), ("dq", dq), ("dkdv", dkdv)):
        p = preds[name]
        assert (p.programs, p.total_work, p.max_work) == (len(work), sum(work), max(work)), name
        assert p.makespan == _brute_makespan(sorted(work, reverse=True), sms), name
        assert p.ratio == pytest.approx(p.makespan / (sum(work) / sms)), name


class _Tiny:
    """A workload made from a given mask (the model's input is a name and a mask)."""

    def __init__(self, mask: KeyRanges):
        self.name, self._mask = "tiny", mask

    def mask(self, device):
        return self._mask.to(device)


def test_lower_bound_counts_rounds():
    assert work_model.lower_bound([5] * 4, 4) == 5
    assert work_model.lower_bound([5] * 5, 4) == 10  # one SM runs two of the five
    assert work_model.lower_bound([9, 1, 1, 1], 2) == 9  # the longest program
    assert work_model.lower_bound([3, 3, 3, 3], 3) == 6


def test_cli_json_lines(capsys):
    assert work_model.main(["--json", "--sms", "132"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(WORKLOADS) * len(work_model.KERNELS)
    row = json.loads(lines[0])
    assert {"workload", "kernel", "ratio", "floor", "makespan", "ideal", "splits"} <= set(row)
    with pytest.raises(SystemExit):
        work_model.main(["--sms", "0"])
