"""``python -m bench.work_model [--json]``: how evenly each attention kernel's programs fill the
GPU, predicted from the kernels' own tile bounds and launch order, without a GPU.

For every attention workload (``bench.workloads``) and kernel (forward, dQ, dK/dV) it takes the
schedule the launcher builds (``fwd_schedule``, ``dq_schedule``, ``dkdv_schedule``: the same
tile bounds, loop extents, dK/dV head splits, loop pieces of short rows and program order the
kernel is launched with; for the forward, the TMA kernel's tiles where ``op`` picks it), and
plays a greedy list schedule: program ids are handed out in increasing order, each to the first
SM that is free. It prints the makespan divided by the ideal (total work / SMs), and a floor no
order can beat (``lower_bound``: too few programs, or too many equal ones, for the SMs).

Assumptions, stated because the figures rest on them:

- work = loop iterations (one key tile for forward and dQ; one (query tile, query head) pair
  for dK/dV). Every iteration of a kernel costs the same; masked edge iterations cost a little
  more on a GPU. ``ratio`` ignores the prologue/epilogue of a program (loading Q or K/V, writing
  the output), so short programs look cheaper than they are; ``ratio_overhead`` charges each
  program ``overhead`` iterations for it (default 1, ``--overhead``), and a launch that writes
  fp32 partials (dK/dV head splits, loop pieces) a merge pass that reads each partial tile at the
  same cost, spread evenly over the SMs; its ideal is the unsplit launch's work plus one overhead
  per output tile. Splitting a short row's loop trades the ``ratio`` it gains against that;
- smaller tiles would also give short rows more programs, but Hopper's wgmma wants 64 rows per
  warpgroup (32-row tiles fall back to mma.sync) and every iteration would cost more per key: a
  cost the model does not see, so the launchers split loops instead of shrinking tiles;
- 132 SMs (H100/H200 SXM) and one resident program (CTA) per SM: the shipped 16-bit configs
  use 8 warps or more than half an SM's shared memory at D = 128, so a second CTA rarely fits,
  and with one CTA per SM the dispatch order is the whole story;
- the hardware hands out program ids in increasing order (x fastest), which is what CUDA's
  block scheduler does in practice for a 1-D grid, though it is not documented.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import asdict, dataclass

import torch

from cocoa_kernels.attention.config import block_d_for, pick_config
from cocoa_kernels.attention.triton_bwd import dkdv_schedule, dq_schedule
from cocoa_kernels.attention.triton_common import TileSchedule
from cocoa_kernels.attention.triton_fwd import fwd_loop_splits, fwd_schedule
from cocoa_kernels.attention.triton_fwd_tma import tma_forward_tiles

from .workloads import FULL_ATTN, AttnShape, AttnWorkload, attention_workloads, sweep_workloads

SMS = 132
KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class Prediction:
    workload: str
    kernel: str
    programs: int
    splits: int  # dK/dV programs per K/V head and key tile (1 for forward and dQ)
    loop_splits: int  # pieces each tile's loop is split into (1 unless the grid is short)
    sms: int
    total_work: int
    max_work: int
    ideal: float  # total_work / sms
    makespan: int
    ratio: float  # makespan / ideal
    floor: float  # lower_bound / ideal: no launch order (no schedule at all) does better
    overhead: float  # iterations charged per program for its prologue/epilogue, and per partial tile merged
    ratio_overhead: float  # with those charges, against the unsplit launch's ideal (see the module doc)

    def row(self) -> str:
        return (f"{self.workload:22s} {self.kernel:5s} programs {self.programs:5d}  splits {self.splits} "
                f"x{self.loop_splits:2d}  makespan/ideal {self.ratio:5.3f}  (floor {self.floor:5.3f})  "
                f"with overhead {self.overhead:g}: {self.ratio_overhead:5.3f}")


def list_schedule(work_in_launch_order: list[int], sms: int) -> int:
    """Makespan of handing programs, in order, each to the SM that frees first (lowest index on
    ties). ``sms`` >= 1."""
    if sms < 1:
        raise ValueError(f"sms must be >= 1, got {sms}")
    free = [(0, sm) for sm in range(sms)]
    makespan = 0
    for w in work_in_launch_order:
        t, sm = heapq.heappop(free)
        heapq.heappush(free, (t + w, sm))
        makespan = max(makespan, t + w)
    return makespan


def lower_bound(work: list[int], sms: int) -> int:
    """A makespan no schedule of these programs on ``sms`` SMs can beat: the total over the SMs,
    and, for every k >= 0, (k + 1) times the (k * sms + 1)-th longest program (of the k * sms + 1
    longest programs, some SM runs k + 1). k = 0 is the longest program itself; k = 1 is what
    144 equal programs on 132 SMs cost: two rounds, however they are ordered."""
    ordered = sorted(work, reverse=True)
    rounds = max(((k + 1) * ordered[k * sms] for k in range(-(-len(ordered) // sms))), default=0)
    return max(-(-sum(ordered) // sms), rounds)


def predict(workload: str, kernel: str, sched: TileSchedule, splits: int, sms: int = SMS,
            overhead: float = 1.0) -> Prediction:
    work = sched.work[sched.order.long()].tolist()  # program id p runs tile order[p]
    total, longest = sum(work), max(work, default=0)
    ideal = total / sms
    makespan = list_schedule(work, sms)
    partials = splits * sched.loop_splits
    outputs = len(work) // partials  # output tiles: the programs of the unsplit launch
    charged = list_schedule([w + overhead for w in work], sms)
    if partials > 1:
        charged += outputs * partials * overhead / sms
    ideal_charged = (total + outputs * overhead) / sms
    return Prediction(workload, kernel, len(work), splits, sched.loop_splits, sms, total, longest, ideal, makespan,
                      makespan / ideal if total else 1.0, lower_bound(work, sms) / ideal if total else 1.0,
                      overhead, charged / ideal_charged if ideal_charged else 1.0)


def schedules(lo: torch.Tensor, hi: torch.Tensor, shape: AttnShape, sms: int = SMS) -> dict:
    """kernel -> (schedule, splits) for one mask, with the config the GPU would pick."""
    element = torch.finfo(shape.dtype).bits // 8
    cfg = pick_config(block_d_for(shape.head_dim), element, on_gpu=True, capability=(9, 0))  # H100/H200
    gpu = torch.device("cuda")
    dkdv, splits = dkdv_schedule(lo, hi, shape.heads_q, shape.heads_kv, cfg, gpu, sms=sms)
    return {"fwd": (_forward_schedule(lo, hi, shape, cfg, gpu, sms), 1),
            "dq": (dq_schedule(lo, hi, shape.heads_q, cfg, gpu, sms=sms), 1),
            "dkdv": (dkdv, splits)}


def _forward_schedule(lo, hi, shape: AttnShape, cfg, gpu, sms: int) -> TileSchedule:
    """The forward ``op._triton_forward`` launches on Hopper for the workloads' contiguous inputs
    (meta tensors of their shapes ask ``tma_forward_tiles``): the TMA kernel at its own tiles,
    never split, else the pointer kernel with the loop pieces of a short grid."""
    B, N = lo.shape

    def inputs(heads: int) -> torch.Tensor:
        return torch.empty(B, N, heads, shape.head_dim, dtype=shape.dtype, device="meta").transpose(1, 2)

    tiles = tma_forward_tiles(inputs(shape.heads_q), inputs(shape.heads_kv), inputs(shape.heads_kv), lo,
                              capability=(9, 0), sms=sms)
    if tiles is not None:
        return fwd_schedule(lo, hi, shape.heads_q, tiles)
    pieces = fwd_loop_splits(lo, shape.heads_q, cfg.fwd, gpu, sms=sms)
    return fwd_schedule(lo, hi, shape.heads_q, cfg.fwd, pieces)


def predict_workload(w: AttnWorkload, shape: AttnShape = FULL_ATTN, sms: int = SMS,
                     overhead: float = 1.0) -> list[Prediction]:
    mask = w.mask("cpu")
    lo, hi = mask.lo, mask.effective_hi()
    if shape.batch != 1:
        lo, hi = lo.expand(shape.batch, -1).contiguous(), hi.expand(shape.batch, -1).contiguous()
    return [predict(w.name, k, sched, splits, sms, overhead)
            for k, (sched, splits) in schedules(lo, hi, shape, sms).items()]


def all_workloads() -> list[AttnWorkload]:
    return attention_workloads() + sweep_workloads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.work_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per (workload, kernel) line")
    p.add_argument("--sms", type=int, default=SMS, help=f"streaming multiprocessors (default {SMS})")
    p.add_argument("--overhead", type=float, default=1.0,
                   help="loop iterations a program's prologue/epilogue costs, for ratio_overhead (default 1)")
    args = p.parse_args(argv)
    if args.sms < 1:
        p.error(f"--sms must be >= 1, got {args.sms}")
    if not args.overhead >= 0:
        p.error(f"--overhead must be >= 0, got {args.overhead}")
    for w in all_workloads():
        for pred in predict_workload(w, sms=args.sms, overhead=args.overhead):
            print(json.dumps(asdict(pred)) if args.json else pred.row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
