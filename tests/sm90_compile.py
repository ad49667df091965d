"""Compile the shipped kernel configurations for Ampere (sm_80), Ada (sm_89) and Hopper (sm_90a)
without a GPU, and read what ptxas reports: registers, spilled bytes, shared memory, whether the
tensor-core (wgmma on sm_90a, mma.sync before) and asynchronous-copy (cp.async, TMA) paths were
taken, and from the SASS, the instructions one key costs in the attention key loop.

The Triton interpreter checks arithmetic, not what only a compiled kernel shows: a tile whose
shared memory exceeds the SM's, a config that spills registers, a dot that silently leaves the
tensor cores. ``triton.compile`` with a CUDA target needs no GPU or driver, and the ptxas that
ships inside the triton wheel assembles the PTX, so these facts can be checked here and in CI.

Launch-time specialisation is reproduced: pointers aligned to 16 bytes, strides of the last
dimension equal to 1 (constexpr), the other strides and the head dim divisible by 16 (Triton
marks integer arguments divisible by 16 at launch; the shapes we ship have that property).
Host-side tensor descriptors (the TMA forward, ``triton_fwd_tma``) are ``tensordesc<type[block]>``
arguments, as a launch with a ``TensorDescriptor`` specialises them.

``loop_instructions_per_key`` (forward and dQ): the SASS instructions of one iteration of the
steady-state unmasked key loop (the middle of the kernel's three loops: masked edge, full tiles,
masked edge; an instruction is issued once per warp) divided by the BLOCK_N keys it consumes. For
the warp-specialised full-tile pass (``triton_fwd_ws``), whose only key loop runs in two consumer
warp groups, the longer of the two consumer loops.
SASS comes from ``nvdisasm`` in the triton wheel, run on the cubin Triton built.

``python tests/sm90_compile.py`` prints the table for every case and arch; ``--json`` prints one
JSON object per (case, arch) instead; ``--case NAME --arch ARCH`` limit what is compiled (the tests
run one case name per process, without ``TRITON_INTERPRET``: under the interpreter
``@triton.jit`` functions cannot be compiled). ``--dtype`` picks the element types (default bf16
and fp32: the two tables we ship; fp16 uses bf16's configs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cocoa_kernels.attention import config as attn_config  # noqa: E402
from cocoa_kernels.attention import triton_bwd as attn_bwd  # noqa: E402
from cocoa_kernels.attention import triton_fwd as attn_fwd  # noqa: E402
from cocoa_kernels.attention import triton_fwd_tma as attn_fwd_tma  # noqa: E402
from cocoa_kernels.attention import triton_fwd_ws as attn_fwd_ws  # noqa: E402
from cocoa_kernels.losses import config as loss_config  # noqa: E402
from cocoa_kernels.losses import triton_bwd as loss_bwd  # noqa: E402
from cocoa_kernels.losses import triton_fwd as loss_fwd  # noqa: E402
from cocoa_kernels.losses import triton_sparse as loss_sparse  # noqa: E402

# arch -> (compute capability, the most shared memory one block may use: CUDA's
# sharedMemPerBlockOptin on A100, on Ada/consumer Ampere, and on H100/H200)
ARCHS = {"sm_80": (80, 163 * 1024), "sm_89": (89, 99 * 1024), "sm_90a": (90, 227 * 1024)}
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS = _BIN / "ptxas"  # the wheel's ptxas for sm_80/89 (and, up to triton 3.8, for sm_90a too)
NVDISASM = _BIN / "nvdisasm"


def ptxas_for(capability: int) -> Path:
    """The ptxas the installed triton assembles this capability's PTX with: from triton 3.9 on,
    Hopper and newer use the wheel's newer ``ptxas-blackwell`` (its PTX version is too new for the
    older ``ptxas``), so the report reads what triton's own compile does."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return PTXAS
    return Path(get_ptxas(capability).path)
_TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Case:
    """One kernel specialisation: which pointer arguments hold which element type, the constexpr
    values, integer arguments known to be divisible by 16, and the launch options; then what the
    report names it by (``kernel``, ``dtype``, ``head_dim``, the tile: for the loss, rows x
    vocabulary columns)."""

    name: str
    fn: object
    pointers: dict  # argument name -> "bf16" | "fp16" | "fp32" | "i32"
    constexprs: dict
    divisible: tuple
    num_warps: int
    num_stages: int
    kernel: str = ""
    dtype: str = ""
    head_dim: int | None = None
    block_m: int | None = None
    block_n: int | None = None
    key_loop: bool = False  # a three-loop attention kernel over key tiles (forward, dQ)
    ws_loop: bool = False  # the warp-specialised full-tile pass: one key loop per consumer warp group
    gemm: bool = True  # a tensor-core kernel (the loss's live-list builder is not)
    # argument name -> (element type, block shape) of a host-side TMA tensor descriptor
    descriptors: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    name: str
    kernel: str
    arch: str
    dtype: str
    head_dim: int | None
    block_m: int | None
    block_n: int | None
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas counts them
    shared_bytes: int
    shared_limit: int  # the arch's per-block maximum
    mma: int  # tensor-core instructions in the PTX: wgmma.mma_async (sm_90a) or mma.sync
    cp_async: int
    tma_loads: int  # cp.async.bulk.tensor loads in the PTX
    warp_specialized: bool
    loop_instructions_per_key: float | None  # forward and dQ only

    def row(self) -> str:
        per_key = "" if self.loop_instructions_per_key is None else f"  instr/key {self.loop_instructions_per_key:5.2f}"
        return (f"{self.name:44s} {self.arch:6s} regs {self.registers:3d}  spills {self.spill_bytes:5d} B  "
                f"shared {self.shared_bytes / 1024:6.1f}/{self.shared_limit // 1024} KiB  mma {self.mma:3d}  "
                f"cp.async {self.cp_async:3d}  tma {self.tma_loads}{per_key}")


def _signature(case: Case):
    args = case.fn.arg_names
    signature, constexprs = {}, {}
    for name in args:
        if name in case.constexprs:
            signature[name] = "constexpr"
            constexprs[(args.index(name),)] = case.constexprs[name]
        elif name in case.descriptors:
            kind, block = case.descriptors[name]
            signature[name] = f"tensordesc<{kind}[{','.join(map(str, block))}]>"
        elif name in case.pointers:
            kind = case.pointers[name]
            signature[name] = "*i32" if kind == "i32" else _TRITON_TYPES[kind]
        elif name in ("scale", "scale_log2", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(args)
             if signature[name].startswith("*") or name in case.divisible}
    return signature, constexprs, attrs


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_loops(sass: str) -> list[list[str]]:
    """The bodies (instruction lists) of the loops in ``nvdisasm`` output, in address order: a
    branch back to an earlier label closes a loop. Self-branches (the trap after EXIT) are not loops,
    nor is a span with an EXIT in it: that is an out-of-line block placed after the kernel's end
    (a TMA barrier's retry spin) jumping back into the code it came from."""
    return [body for _, body in _sass_loop_spans(sass)]


def _sass_loop_spans(sass: str) -> list[tuple[tuple[int, int], list[str]]]:
    """``sass_loops`` with each loop's [first, last + 1) instruction indices."""
    labels, instructions, loops = {}, [], []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = _SASS_LINE.search(line)
        if not ins:
            continue
        instructions.append(ins.group(1))
        target = _BRANCH.search(ins.group(1))
        if target and target.group(1) in labels and labels[target.group(1)] < len(instructions) - 1:
            body = instructions[labels[target.group(1)]:]
            if not any(ins.split()[-1] == "EXIT" for ins in body):
                loops.append(((labels[target.group(1)], len(instructions)), body))
    return loops


def consumer_loop_instructions_per_key(sass: str, block_n: int) -> float:
    """SASS instructions (NOPs excluded) per key of the warp-specialised full-tile pass: its key
    loop is emitted once per consumer warp group, so the innermost loops with tensor-core
    instructions (a loop around the warp-group dispatch contains one of them) must be two; the
    longer one counts."""
    spans = [(span, body) for span, body in _sass_loop_spans(sass) if any("MMA" in ins for ins in body)]
    inner = [body for span, body in spans
             if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o, _ in spans)]
    if len(inner) != 2:
        raise RuntimeError(f"expected 2 consumer key loops in the warp-specialised SASS, found {len(inner)}")
    return max(sum(1 for ins in body if not ins.split()[0].endswith("NOP")) for body in inner) / block_n


def loop_instructions_per_key(sass: str, block_n: int) -> float:
    """SASS instructions (NOPs excluded) of the unmasked key loop's body per key. The forward and
    dQ kernels run three key loops in this order: masked edge, full tiles, masked edge."""
    loops = [body for body in sass_loops(sass) if any("MMA" in ins for ins in body)]
    if len(loops) != 3:
        raise RuntimeError(f"expected the 3 key loops (masked, full, masked) in the SASS, found {len(loops)} "
                           "loops with tensor-core instructions; the kernel's structure changed")
    first, full, last = (sum(1 for ins in body if not ins.split()[0].endswith("NOP")) for body in loops)
    if full >= min(first, last):
        raise RuntimeError(f"the middle key loop ({full} instructions) is not shorter than the masked ones "
                           f"({first}, {last}): it is not the unmasked loop; the kernel's structure changed")
    return full / block_n


def compile_case(case: Case, arch: str = "sm_90a") -> Report:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    capability, shared_limit = ARCHS[arch]
    signature, constexprs, attrs = _signature(case)
    kernel = triton.compile(ASTSource(case.fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([str(ptxas_for(capability)), "-v", f"--gpu-name={arch}", src, "-o", src + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
        per_key = None
        if case.key_loop or case.ws_loop:
            with open(src + ".triton.cubin", "wb") as f:  # the cubin Triton built and would launch
                f.write(kernel.asm["cubin"])
            sass = subprocess.run([str(NVDISASM), "-c", src + ".triton.cubin"], capture_output=True, text=True,
                                  check=True).stdout
            count = consumer_loop_instructions_per_key if case.ws_loop else loop_instructions_per_key
            per_key = count(sass, case.block_n)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return Report(
        name=case.name, kernel=case.kernel, arch=arch, dtype=case.dtype, head_dim=case.head_dim,
        block_m=case.block_m, block_n=case.block_n, num_warps=case.num_warps, num_stages=case.num_stages,
        registers=int(registers.group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=kernel.metadata.shared,
        shared_limit=shared_limit,
        mma=ptx.count("wgmma.mma_async") + ptx.count("mma.sync"),
        cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        tma_loads=ptx.count("cp.async.bulk.tensor"),
        # Warp-specialised kernels hand registers between producer and consumer warps.
        warp_specialized="setmaxnreg" in ptx,
        loop_instructions_per_key=per_key,
    )


def _strides(fn, constexprs) -> tuple[dict, tuple]:
    """Last-dimension strides become constexpr 1; the others are divisible by 16."""
    for name in fn.arg_names:
        if name.startswith("stride_") and name.endswith(("d", "wh", "hh")):
            constexprs[name] = 1
    return constexprs, tuple(n for n in fn.arg_names if n.startswith("stride_") and n not in constexprs)


def attention_cases(dtype: str = "bf16", arch: str = "sm_90a", head_dims=(64, 80, 96, 128)) -> list[Case]:
    """fwd, dq and dk/dv for each head dim with the GPU table's config; dk/dv twice: one program
    per K/V head of an MHA model (GROUP = SPLITS = 1, specialised) and the split path of GQA
    (runtime GROUP and SPLITS, fp32 partial outputs)."""
    cases = []
    element = 4 if dtype == "fp32" else 2
    for D in head_dims:
        block_d = attn_config.block_d_for(D)
        cfg = attn_config.pick_config(block_d, element, on_gpu=True, capability=divmod(ARCHS[arch][0], 10))
        base = dict(BLOCK_D=block_d, EVEN_D=block_d == D, DOT_PRECISION="tf32x3" if dtype == "fp32" else "tf32")
        data = {n: dtype for n in ("Q", "K", "V", "Out", "O", "DO", "DQ", "DK", "DV")}
        data.update({n: "fp32" for n in ("Lse", "Delta")}, **{n: "i32" for n in ("Lo", "Hi", "Bounds", "Order")})
        kernels = (("fwd", attn_fwd._attn_fwd_kernel, cfg.fwd, {}, data),
                   ("dq", attn_bwd._attn_bwd_dq_kernel, cfg.dq, {}, data),
                   ("dkdv mha", attn_bwd._attn_bwd_dkdv_kernel, cfg.dkdv,
                    {"GROUP": 1, "SPLITS": 1, "ACCUMULATE_DQ": False}, data),
                   ("dkdv gqa split", attn_bwd._attn_bwd_dkdv_kernel, cfg.dkdv, {"ACCUMULATE_DQ": False},
                    {**data, "DK": "fp32", "DV": "fp32"}))
        for label, fn, k, fixed, pointers in kernels:
            constexprs, divisible = _strides(fn, dict(base, BLOCK_M=k.block_m, BLOCK_N=k.block_n, **fixed))
            cases.append(Case(f"attention {label} {dtype} D={D} ({k.block_m}x{k.block_n}, w{k.num_warps})",
                              fn, pointers, constexprs, divisible + ("D",), k.num_warps, k.num_stages,
                              kernel=f"attention {label}", dtype=dtype, head_dim=D, block_m=k.block_m,
                              block_n=k.block_n, key_loop=label in ("fwd", "dq")))
    return cases


def fused_bwd_cases(dtype: str = "bf16", arch: str = "sm_90a", head_dims=(64, 80, 96, 128)) -> list[Case]:
    """The opt-in non-deterministic backward (the dK/dV kernel with ``ACCUMULATE_DQ``: dQ added
    atomically into fp32) for each head dim with its table's tiles; GROUP and SPLITS at runtime
    (the GQA path)."""
    cases = []
    element = 4 if dtype == "fp32" else 2
    capability = divmod(ARCHS[arch][0], 10)
    for D in head_dims:
        block_d = attn_config.block_d_for(D)
        cfg = attn_config.pick_config(block_d, element, on_gpu=True, capability=capability)
        k = attn_config.fused_bwd_config(cfg, block_d, element, on_gpu=True, capability=capability)
        constexprs, divisible = _strides(attn_bwd._attn_bwd_dkdv_kernel, dict(
            BLOCK_D=block_d, EVEN_D=block_d == D, DOT_PRECISION="tf32x3" if dtype == "fp32" else "tf32",
            BLOCK_M=k.block_m, BLOCK_N=k.block_n, ACCUMULATE_DQ=True))
        pointers = {n: dtype for n in ("Q", "K", "V", "DO", "DK", "DV")}
        pointers.update({n: "fp32" for n in ("DQ", "Lse", "Delta")},
                        **{n: "i32" for n in ("Lo", "Hi", "Bounds", "Order")})
        cases.append(Case(f"attention fused bwd {dtype} D={D} ({k.block_m}x{k.block_n}, w{k.num_warps})",
                          attn_bwd._attn_bwd_dkdv_kernel, pointers, constexprs, divisible + ("D",),
                          k.num_warps, k.num_stages, kernel="attention fused bwd", dtype=dtype, head_dim=D,
                          block_m=k.block_m, block_n=k.block_n))
    return cases


def loss_cases(dtype: str = "bf16") -> list[Case]:
    """The forward, the logit-gradient kernel (full and partial last column tile; exact and
    filtered) and the filtered backward's block-sparse products and live-list builder."""
    cfg = loss_config.pick_config(True, torch.float32 if dtype == "fp32" else torch.bfloat16)
    pointers = {n: dtype for n in ("Hidden", "HC", "Weight", "Bias", "DZ", "DW")}
    pointers.update({n: "i32" for n in ("Rows", "SlotTargets", "Targets", "Count", "Live", "OrderH", "OrderW",
                                        "CountH", "CountW")},
                    **{n: "fp32" for n in ("Lse", "DLoss", "Part", "DH")})
    precision = "ieee" if dtype == "fp32" else "tf32"
    dlogits = dict(HAS_BIAS=False, EVEN_H=True, GROUP_M=loss_bwd._GROUP_M)
    cases = []
    for label, fn, k, flags in (
        ("fwd", loss_fwd._lce_fwd_kernel, cfg.fwd, dict(HAS_BIAS=False, EVEN_H=True)),
        ("dlogits", loss_bwd._lce_dlogits_kernel, cfg.dz, dict(dlogits, MASK_V=False, FILTER=False)),
        ("dlogits partial tile", loss_bwd._lce_dlogits_kernel, cfg.dz, dict(dlogits, MASK_V=True, FILTER=False)),
        ("dlogits filtered", loss_bwd._lce_dlogits_kernel, cfg.dz, dict(dlogits, MASK_V=True, FILTER=True)),
        ("sparse dw", loss_sparse._dw_sparse_kernel, cfg.products, {}),
        ("sparse dh", loss_sparse._dh_sparse_kernel, cfg.products, {}),
        ("live lists", loss_sparse._live_lists_kernel, loss_config.KernelConfig(1, 1024, 1, 4, 1), dict(BLOCK=1024)),
    ):
        constexprs = dict(flags, BLOCK_M=k.block_m, BLOCK_V=k.block_v, BLOCK_H=k.block_h, DOT_PRECISION=precision)
        constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
        constexprs, divisible = _strides(fn, constexprs)
        divisible += tuple(n for n in ("H", "v0", "n_cols") if n in fn.arg_names)
        cases.append(Case(f"loss {label} {dtype} ({k.block_m}x{k.block_v}x{k.block_h}, w{k.num_warps})",
                          fn, pointers, constexprs, divisible, k.num_warps, k.num_stages,
                          kernel=f"loss {label}", dtype=dtype, block_m=k.block_m, block_n=k.block_v,
                          gemm=fn is not loss_sparse._live_lists_kernel))
    return cases


def tma_attention_cases(dtype: str = "bf16", arch: str = "sm_90a", head_dims=(64, 80, 96, 128)) -> list[Case]:
    """The Hopper forward through tensor descriptors, for each head dim with its table's tiles:
    only on sm_90a and for 16-bit inputs, the only ones it runs. Three kernels: the one-pass
    ``triton_fwd_tma`` kernel, and the opt-in two-pass forward's warp-specialised full-tile pass
    (``triton_fwd_ws``) and edge pass (the one-pass kernel with ``FULL_DONE``)."""
    if arch != "sm_90a" or dtype == "fp32":
        return []
    kernel_args = {"Lse": "fp32", "Part": "fp32", "LsePart": "fp32",
                   **{n: "i32" for n in ("Lo", "Hi", "Bounds", "Order")}}
    kernels = (  # label, kernel, its tile table, extra constexprs, the loop measured per key
        ("fwd tma", attn_fwd_tma._attn_fwd_tma_kernel, attn_config.tma_fwd_config, {"FULL_DONE": False}, "key"),
        ("fwd tma edges", attn_fwd_tma._attn_fwd_tma_kernel, attn_config.tma_fwd_config, {"FULL_DONE": True}, None),
        ("fwd tma ws", attn_fwd_ws._attn_fwd_full_ws_kernel, attn_config.tma_ws_config, {}, "ws"),
    )
    cases = []
    for D in head_dims:
        block_d = attn_config.block_d_for(D)
        for label, fn, table, flags, loop in kernels:
            k = table(block_d, on_gpu=True)
            q_block, kv_block = (dtype, [1, 1, k.block_m, block_d]), (dtype, [1, 1, k.block_n, block_d])
            descriptors = {"desc_q": q_block, "desc_o": q_block, "desc_k": kv_block, "desc_v": kv_block}
            cases.append(Case(f"attention {label} {dtype} D={D} ({k.block_m}x{k.block_n}, w{k.num_warps})", fn,
                              {n: t for n, t in kernel_args.items() if n in fn.arg_names},
                              dict(flags, BLOCK_M=k.block_m, BLOCK_N=k.block_n, BLOCK_D=block_d, DOT_PRECISION="tf32"),
                              ("stride_pb", "stride_ph", "stride_pn", "D"), k.num_warps, k.num_stages,
                              kernel=f"attention {label}", dtype=dtype, head_dim=D, block_m=k.block_m,
                              block_n=k.block_n, key_loop=loop == "key", ws_loop=loop == "ws",
                              descriptors={n: d for n, d in descriptors.items() if n in fn.arg_names}))
    return cases


def all_cases(dtype: str, arch: str = "sm_90a") -> list[Case]:
    """The cases whose configs a GPU of ``arch`` runs (the attention table depends on it)."""
    return (attention_cases(dtype, arch) + tma_attention_cases(dtype, arch)
            + fused_bwd_cases(dtype, arch) + loss_cases(dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per (case, arch) instead of the table")
    p.add_argument("--case", default=None, help="compile only the case of this name")
    p.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    p.add_argument("--dtype", default="bf16,fp32", help="comma-separated, of bf16, fp16, fp32")
    args = p.parse_args(argv)
    archs = [a for a in args.arch.split(",") if a]
    dtypes = [d for d in args.dtype.split(",") if d]
    for name, values, known in (("--arch", archs, ARCHS), ("--dtype", dtypes, _TRITON_TYPES)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"{name}: expected a comma-separated list of {', '.join(known)}, got {bad or values}")
    if os.environ.get("TRITON_INTERPRET"):
        p.error("unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    jobs = [(c, arch) for arch in archs for dtype in dtypes for c in all_cases(dtype, arch)
            if args.case in (None, c.name)]
    if not jobs:
        p.error(f"--case: no case named {args.case!r} for --arch {args.arch} and --dtype {args.dtype}")
    for case, arch in jobs:
        report = compile_case(case, arch)
        print(json.dumps(asdict(report)) if args.json else report.row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
