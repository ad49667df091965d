"""Compile the shipped kernel configurations for Hopper (sm_90a) without a GPU, and read what
ptxas reports: registers, spilled bytes, shared memory, and whether the tensor-core (wgmma) and
asynchronous-copy (cp.async) paths were taken.

The Triton interpreter checks arithmetic, not what only a compiled kernel shows: a tile whose
shared memory exceeds the SM's, a config that spills registers, a dot that silently leaves the
tensor cores. ``triton.compile`` with a CUDA target needs no GPU or driver, and the ptxas that
ships inside the triton wheel assembles the PTX, so these facts can be checked here and in CI.

Launch-time specialisation is reproduced: pointers aligned to 16 bytes, strides of the last
dimension equal to 1 (constexpr), the other strides and the head dim divisible by 16 (Triton
marks integer arguments divisible by 16 at launch; the shapes we ship have that property).

``python tests/sm90_compile.py`` prints the table for every case; ``--json NAME`` compiles one case
and prints its report as JSON (the tests run it so, in a process without ``TRITON_INTERPRET``:
under the interpreter ``@triton.jit`` functions cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cocoa_kernels.attention import config as attn_config  # noqa: E402
from cocoa_kernels.attention import triton_bwd as attn_bwd  # noqa: E402
from cocoa_kernels.attention import triton_fwd as attn_fwd  # noqa: E402
from cocoa_kernels.losses import config as loss_config  # noqa: E402
from cocoa_kernels.losses import triton_bwd as loss_bwd  # noqa: E402
from cocoa_kernels.losses import triton_fwd as loss_fwd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # the most shared memory one block may use on sm_90
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
_TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Case:
    """One kernel specialisation: which pointer arguments hold which element type, the constexpr
    values, integer arguments known to be divisible by 16, and the launch options."""

    name: str
    fn: object
    pointers: dict  # argument name -> "bf16" | "fp16" | "fp32" | "i32"
    constexprs: dict
    divisible: tuple
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Report:
    name: str
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas counts them
    shared_bytes: int
    wgmma: int
    cp_async: int

    def row(self) -> str:
        return (f"{self.name:44s} regs {self.registers:3d}  spills {self.spill_bytes:5d} B  "
                f"shared {self.shared_bytes / 1024:6.1f} KiB  wgmma {self.wgmma:3d}  cp.async {self.cp_async:3d}")


def compile_case(case: Case) -> Report:
    args = case.fn.arg_names
    signature, constexprs = {}, {}
    for name in args:
        if name in case.constexprs:
            signature[name] = "constexpr"
            constexprs[(args.index(name),)] = case.constexprs[name]
        elif name in case.pointers:
            kind = case.pointers[name]
            signature[name] = "*i32" if kind == "i32" else _TRITON_TYPES[kind]
        elif name in ("scale", "scale_log2"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(args)
             if signature[name].startswith("*") or name in case.divisible}
    kernel = triton.compile(ASTSource(case.fn, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                            options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([str(PTXAS), "-v", "--gpu-name=sm_90a", src, "-o", src + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return Report(
        name=case.name,
        registers=int(registers.group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=kernel.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"),
        cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
    )


def _strides(fn, constexprs) -> tuple[dict, tuple]:
    """Last-dimension strides become constexpr 1; the others are divisible by 16."""
    for name in fn.arg_names:
        if name.startswith("stride_") and name.endswith(("d", "wh", "hh")):
            constexprs[name] = 1
    return constexprs, tuple(n for n in fn.arg_names if n.startswith("stride_") and n not in constexprs)


def attention_cases(dtype: str = "bf16", head_dims=(64, 80, 96, 128)) -> list[Case]:
    """fwd, dq and dk/dv for each head dim with the GPU table's config; dk/dv twice: one program
    per K/V head of an MHA model (GROUP = SPLITS = 1, specialised) and the split path of GQA
    (runtime GROUP and SPLITS, fp32 partial outputs)."""
    cases = []
    element = 4 if dtype == "fp32" else 2
    for D in head_dims:
        block_d = attn_config.block_d_for(D)
        cfg = attn_config.pick_config(block_d, element, on_gpu=True)
        base = dict(BLOCK_D=block_d, EVEN_D=block_d == D, DOT_PRECISION="tf32x3" if dtype == "fp32" else "tf32")
        data = {n: dtype for n in ("Q", "K", "V", "Out", "O", "DO", "DQ", "DK", "DV")}
        data.update({n: "fp32" for n in ("Lse", "Delta")}, **{n: "i32" for n in ("Lo", "Hi", "Bounds")})
        kernels = (("fwd", attn_fwd._attn_fwd_kernel, cfg.fwd, {}, data),
                   ("dq", attn_bwd._attn_bwd_dq_kernel, cfg.dq, {}, data),
                   ("dkdv mha", attn_bwd._attn_bwd_dkdv_kernel, cfg.dkdv, {"GROUP": 1, "SPLITS": 1}, data),
                   ("dkdv gqa split", attn_bwd._attn_bwd_dkdv_kernel, cfg.dkdv, {},
                    {**data, "DK": "fp32", "DV": "fp32"}))
        for label, fn, k, fixed, pointers in kernels:
            constexprs, divisible = _strides(fn, dict(base, BLOCK_M=k.block_m, BLOCK_N=k.block_n, **fixed))
            cases.append(Case(f"attention {label} {dtype} D={D} ({k.block_m}x{k.block_n}, w{k.num_warps})",
                              fn, pointers, constexprs, divisible + ("D",), k.num_warps, k.num_stages))
    return cases


def loss_cases(dtype: str = "bf16") -> list[Case]:
    """The forward and the logit-gradient kernel (full and partial last column tile)."""
    cfg = loss_config.pick_config(True, torch.float32 if dtype == "fp32" else torch.bfloat16)
    pointers = {n: dtype for n in ("Hidden", "HC", "Weight", "Bias", "DZ")}
    pointers.update({n: "i32" for n in ("Rows", "SlotTargets", "Targets", "Count")},
                    **{n: "fp32" for n in ("Lse", "DLoss", "Part")})
    precision = "ieee" if dtype == "fp32" else "tf32"
    cases = []
    for label, fn, k, flags in (
        ("fwd", loss_fwd._lce_fwd_kernel, cfg.fwd, dict(HAS_BIAS=False, EVEN_H=True)),
        ("dlogits", loss_bwd._lce_dlogits_kernel, cfg.dz,
         dict(HAS_BIAS=False, MASK_V=False, EVEN_H=True, GROUP_M=loss_bwd._GROUP_M)),
        ("dlogits partial tile", loss_bwd._lce_dlogits_kernel, cfg.dz,
         dict(HAS_BIAS=False, MASK_V=True, EVEN_H=True, GROUP_M=loss_bwd._GROUP_M)),
    ):
        constexprs = dict(flags, BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h, DOT_PRECISION=precision)
        constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
        constexprs, divisible = _strides(fn, constexprs)
        cases.append(Case(f"loss {label} {dtype} ({k.block_m}x{k.block_v}x{k.block_h}, w{k.num_warps})",
                          fn, pointers, constexprs, divisible + ("H", "v0"), k.num_warps, k.num_stages))
    return cases


def all_cases(dtype: str) -> list[Case]:
    return attention_cases(dtype) + loss_cases(dtype)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("sm90_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        (case,) = [c for dtype in ("bf16", "fp16", "fp32") for c in all_cases(dtype) if c.name == sys.argv[2]]
        print(json.dumps(asdict(compile_case(case))))
    else:
        for dtype in ("bf16", "fp32"):
            for case in all_cases(dtype):
                print(compile_case(case).row(), flush=True)
