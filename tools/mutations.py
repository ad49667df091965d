"""Plant one-line bugs, one at a time, and report which the test suite catches.

    python tools/mutations.py [--only NAME ...] [--json OUT]

Each mutation edits one line of a copy of the working tree (tracked and untracked, not ignored),
then runs the tests that should catch it (a subset of the suite, for time: a bug a subset catches
the suite catches) under ``TRITON_INTERPRET=1``. A mutation "survives" when those tests pass:
the suite has a gap there. Every mutation here must be caught; the last run is
``docs/mutations.json``, and README.md ("Tests that can fail") quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


SDPA_EQUALITY = ("tests/test_integration.py", "-k", "matches_sdpa")  # the tests that compared ours with ours
REFUSALS = ("tests/test_integration_masks.py",)
KERNELS = ("tests/test_attention.py", "-k", "mask_families_gqa and triton")
MUTATIONS = [
    # the integration (issue 26: the sdpa-equality tests compared our attention with itself)
    Mutation("integration: padding ignored", "cocoa/integration.py",
             "valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)",
             "valid = torch.ones_like(attention_mask[:, -length:], device=device, dtype=torch.bool)", SDPA_EQUALITY),
    Mutation("integration: causality flipped", "cocoa/integration.py",
             "causal = mask_function is causal_mask_function",
             "causal = mask_function is not causal_mask_function", SDPA_EQUALITY),
    Mutation("integration: additive mask read as mask == 0", "cocoa/integration.py",
             "        refuse(bias.any(-1), lambda b, i: (",
             "        refuse(bias.any(-1) & False, lambda b, i: (", REFUSALS),
    Mutation("integration: per-head mask keeps head 0", "cocoa/integration.py",
             "    if attention_mask.shape[1] != 1:", "    if False:", REFUSALS),
    # the model (issue 26's gap: embed without normalisation passed the whole suite)
    Mutation("model: embedding not normalised", "cocoa/model.py",
             "return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float(), dim=-1)",
             "return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()",
             ("tests/test_model.py",)),
    Mutation("model: temperature ignored", "cocoa/model.py",
             "logits = q @ candidates.T / self.loss_config.temperature", "logits = q @ candidates.T",
             ("tests/test_model.py",)),
    Mutation("model: other ranks' positives misaligned", "cocoa/model.py",
             "target = torch.arange(q.shape[0], device=q.device) + offset",
             "target = torch.arange(q.shape[0], device=q.device)", ("tests/test_distributed.py",)),
    # training (issue 26's gap: a resume one batch off passed the fast tests)
    Mutation("train: a resume skips one batch more", "cocoa/train.py",
             "        return epochs_trained, batches_trained_in_epoch\n",
             "        return epochs_trained, batches_trained_in_epoch + (batches_trained_in_epoch > 0)\n",
             ("tests/test_train.py", "-k", "resume")),
    Mutation("train: a resume repeats the last batch's masks", "cocoa/train.py",
             "self.data_collator.batches = epochs_trained * (self._batches_per_epoch or 0) + batches_trained_in_epoch",
             "self.data_collator.batches = epochs_trained * (self._batches_per_epoch or 0) + max(batches_trained_in_epoch - 1, 0)",
             ("tests/test_train.py", "-k", "resume")),
    # the kernels (issue 26's gap: the packed test masks never ran dK/dV's full and last tiles)
    Mutation("dK/dV: full-tile loop skipped", "cocoa_kernels/attention/triton_bwd.py",
             "lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, f0, f1,",
             "lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, f0, f0,", KERNELS),
    Mutation("dK/dV: last query tile skipped", "cocoa_kernels/attention/triton_bwd.py",
             "lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, e0, e1,",
             "lse_head0, delta_head0, lo_base, hi_base, cols, offs_m, offs_d, e0, e1 - BLOCK_M,", KERNELS),
    Mutation("forward: scale dropped from the exponent", "cocoa_kernels/attention/triton_fwd.py",
             "N, Hq, Hq // Hkv, D, splits, scale * LOG2E,", "N, Hq, Hq // Hkv, D, splits, LOG2E,", KERNELS),
    Mutation("backward: Delta written only by loop piece 1", "cocoa_kernels/attention/triton_bwd.py",
             "mask=mask_if(split == 0, row_ok))", "mask=mask_if(split == 1, row_ok))", KERNELS),
    # masks
    Mutation("mask: block B does not see the bridge", "cocoa_kernels/mask.py",
             "lo = torch.where(is_target, a_end - 1, start)", "lo = torch.where(is_target, a_end, start)",
             ("tests/test_mask.py",)),
    Mutation("mask: causal limit one key late", "cocoa_kernels/mask.py",
             "limit = torch.arange(1, N + 1, device=self.hi.device, dtype=torch.int32)",
             "limit = torch.arange(2, N + 2, device=self.hi.device, dtype=torch.int32)",
             ("tests/test_mask.py", "tests/test_attention_cpu.py")),
    # the loss
    Mutation("loss: shift scores the label before", "cocoa_kernels/losses/__init__.py",
             "return F.pad(labels[:, k:], (0, k), value=ignore_index)",
             "return F.pad(labels[:, : labels.shape[1] - k], (k, 0), value=ignore_index)",
             ("tests/test_linear_cross_entropy.py", "-k", "torch")),
]


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(mutation: Mutation, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        target = tree / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return {"name": mutation.name, "result": "stale (the line is not in the file once)", "seconds": 0}
        target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tree)}
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *mutation.tests], cwd=tree, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            result = "caught" if done.returncode != 0 else "SURVIVED"
        except subprocess.TimeoutExpired:
            result = "timeout"
        return {"name": mutation.name, "result": result, "tests": " ".join(mutation.tests),
                "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="names (substrings) of the mutations to run")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    rows = []
    for m in chosen:
        rows.append(run(m, args.timeout))
        print(f"{rows[-1]['result']:>9}  {rows[-1]['seconds']:>6.1f} s  {m.name}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    survived = [r for r in rows if r["result"] != "caught"]
    print(f"{len(rows) - len(survived)} of {len(rows)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
