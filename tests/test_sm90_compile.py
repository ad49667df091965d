"""Every 16-bit kernel configuration we ship, compiled here without a GPU for Ampere (sm_80), Ada
(sm_89) and Hopper (sm_90a): no register spills, shared memory within the arch's per-block
limit, tensor-core dots fed by asynchronous copies (kernels with a matrix product), and for the
attention forward and dQ a SASS count of the key loop. fp16 shares bf16's configs; the fp32
configs are the checking path and do spill (``python tests/sm90_compile.py`` prints them too).
Each case name compiles, for every arch that runs it, in one child process without
``TRITON_INTERPRET``."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm90_compile import (
    ARCHS, NVDISASM, PTXAS, all_cases, consumer_loop_instructions_per_key, loop_instructions_per_key, sass_loops,
)

from cocoa_kernels.attention.config import check_warp_specialised_pass

# The attention table depends on the arch (Hopper's tiles spill on mma.sync), so each arch has
# its own cases; a case of the same name on several archs compiles once for all of them.
CASES = [(c, arch) for arch in ARCHS for c in all_cases("bf16", arch)]
SCRIPT = Path(__file__).with_name("sm90_compile.py")


def _compile(name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), "--json", "--dtype", "bf16", "--case", name], env=env,
                          capture_output=True, text=True, timeout=900)


def _ws_unsupported() -> str | None:
    """Why the installed triton cannot compile the warp-specialised pass, or None."""
    try:
        check_warp_specialised_pass()
    except RuntimeError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def _reports(name: str) -> dict:
    done = _compile(name)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    return {r["arch"]: r for r in reports}


def _report_or_skip(case, arch: str) -> dict:
    if case.kernel == "attention fwd tma ws" and (why := _ws_unsupported()):
        pytest.skip(why)  # test_warp_specialised_gate_matches_the_compiler checks the gate
    return _reports(case.name)[arch]


def _id(case, arch) -> str:
    return f"{case.name.split(' (')[0].replace(' ', '-')}-{arch}"


@pytest.mark.skipif(not (PTXAS.exists() and NVDISASM.exists()), reason="the triton wheel has no ptxas/nvdisasm here")
@pytest.mark.parametrize("case, arch", CASES, ids=[_id(c, a) for c, a in CASES])
def test_shipped_config_compiles_without_spills(case, arch):
    report = _report_or_skip(case, arch)
    row = f"{case.name} on {arch}: {report}"
    assert report["spill_bytes"] == 0, row
    assert report["shared_bytes"] <= ARCHS[arch][1], row
    if case.gemm:
        assert report["mma"] > 0, f"no tensor-core dot: {row}"
        assert report["cp_async"] + report["tma_loads"] > 0, f"no asynchronous copies: {row}"
    if case.key_loop or case.ws_loop:
        # A full-tile key costs at least its share of the loop's tensor-core instructions.
        assert 0 < report["loop_instructions_per_key"] < 100, row
    else:
        assert report["loop_instructions_per_key"] is None, row


TMA_CASES = [c for c, arch in CASES if c.kernel == "attention fwd tma"]


@pytest.mark.skipif(not (PTXAS.exists() and NVDISASM.exists()), reason="the triton wheel has no ptxas/nvdisasm here")
@pytest.mark.parametrize("case", TMA_CASES, ids=[_id(c, "sm_90a") for c in TMA_CASES])
def test_tma_forward_loop_cost(case):
    """Issue 12's bar for the Hopper forward: tiles arrive by TMA, no spills, and the full-tile
    loop costs at most 4.0 SASS instructions per key (the pointer forward: ~6.1 at 128x64)."""
    report = _reports(case.name)["sm_90a"]
    row = f"{case.name}: {report}"
    assert report["tma_loads"] > 0 and report["cp_async"] == 0, row
    assert report["spill_bytes"] == 0, row
    assert report["loop_instructions_per_key"] <= 4.0, row


WS_CASES = [c for c, arch in CASES if c.kernel == "attention fwd tma ws"]


@pytest.mark.skipif(not (PTXAS.exists() and NVDISASM.exists()), reason="the triton wheel has no ptxas/nvdisasm here")
@pytest.mark.parametrize("case", WS_CASES, ids=[_id(c, "sm_90a") for c in WS_CASES])
def test_warp_specialised_full_tile_pass(case):
    """The opt-in two-pass forward's first pass is what it is for: triton 3.6 did warp-specialise
    it (producer and consumer warps trade registers), tiles arrive by TMA, no spills, and each
    consumer's key loop stays within the one-pass kernel's 4.0 instructions per key."""
    report = _report_or_skip(case, "sm_90a")
    row = f"{case.name}: {report}"
    assert report["warp_specialized"], row
    assert report["tma_loads"] > 0 and report["cp_async"] == 0 and report["spill_bytes"] == 0, row
    assert report["loop_instructions_per_key"] <= 4.0, row


@pytest.mark.skipif(not (PTXAS.exists() and NVDISASM.exists()), reason="the triton wheel has no ptxas/nvdisasm here")
def test_warp_specialised_gate_matches_the_compiler():
    """``check_warp_specialised_pass`` lets the pass launch exactly on the triton releases that
    compile it: where it refuses, the compile really fails (so a release that fixes the pass shows
    up here, to be added to ``WARP_SPECIALISED_TRITON``); where it allows, the compile succeeds."""
    done = _compile(WS_CASES[0].name)
    if _ws_unsupported():
        assert done.returncode != 0 and "PassManager::run failed" in done.stderr, done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]


def test_tma_forward_cases_cover_every_head_dim():
    """Only Hopper runs the TMA forward (one pass; edges after the warp-specialised full tiles;
    the full tiles), at every head dim the API takes."""
    for kernel in ("attention fwd tma", "attention fwd tma edges", "attention fwd tma ws"):
        assert sorted(c.head_dim for c, _ in CASES if c.kernel == kernel) == [64, 80, 96, 128], kernel
        assert {arch for c, arch in CASES if c.kernel == kernel} == {"sm_90a"}, kernel


def _sass(*loop_bodies: list[str]) -> str:
    """nvdisasm-style text: a prologue, one loop per body (closed by a branch back), EXIT, and
    the self-branch trap that follows EXIT."""
    lines, addr = ["        /*0000*/                   MOV R1, c[0x0][0x28] ;"], 0
    for i, body in enumerate(loop_bodies):
        lines.append(f".L_x_{i}:")
        for ins in body + [f"@P0 BRA `(.L_x_{i})"]:
            addr += 16
            lines.append(f"        /*{addr:04x}*/                   {ins} ;")
    lines += ["        /*0ff0*/                   EXIT ;", ".L_x_99:",
              "        /*1000*/                   BRA `(.L_x_99);"]
    return "\n".join(lines)


MASKED = ["FMUL R5, R5, R6", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "ISETP.GE.AND P2, PT, R2, R3, PT",
          "FSEL R4, R4, -INF , P2"]
FULL = ["HMMA.16816.F32.BF16 R4, R8, R12, R4", "NOP", "IADD3 R2, R2, 0x40, RZ"]


def test_sass_loop_parser_takes_the_middle_loop():
    """Three loops (masked, full, masked) and the trap after EXIT, which is not a loop."""
    sass = _sass(MASKED, FULL, MASKED)
    assert [len(body) for body in sass_loops(sass)] == [5, 4, 5]
    assert loop_instructions_per_key(sass, block_n=2) == 3 / 2  # branch counted, NOP not
    with pytest.raises(RuntimeError, match="not the unmasked loop"):  # the middle loop must be the cheapest
        loop_instructions_per_key(_sass(FULL, MASKED, MASKED), block_n=2)
    with pytest.raises(RuntimeError, match="expected the 3 key loops"):
        loop_instructions_per_key(_sass(MASKED, FULL), block_n=2)
    # A loop without tensor-core instructions (index arithmetic) is not a key loop.
    assert loop_instructions_per_key(_sass(MASKED, ["IADD3 R2, R2, 0x40, RZ"], FULL, MASKED), block_n=2) == 3 / 2


def test_sass_loop_parser_skips_out_of_line_barrier_waits():
    """TMA kernels wait on barriers with a retry spin placed after EXIT that branches back into
    the loop it left: the span from that loop to the spin contains EXIT and is not a loop."""
    sass = _sass(MASKED, FULL + ["@!P1 BRA `(.L_x_50)"], MASKED)
    resume = sass.index(".L_x_1:") + len(".L_x_1:")
    sass = (sass[:resume] + "\n.L_x_51:" + sass[resume:]
            + "\n.L_x_50:\n        /*1010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R3], R4 ;"
            + "\n        /*1020*/              @!P1 BRA `(.L_x_50) ;"
            + "\n        /*1030*/                   BRA `(.L_x_51) ;")
    assert [len(body) for body in sass_loops(sass)] == [5, 5, 5, 2]  # the spin is a loop, the span back is not
    assert loop_instructions_per_key(sass, block_n=2) == 4 / 2


def test_consumer_loop_parser_takes_the_innermost_loops():
    """The warp-specialised kernel's key loop appears once per consumer warp group; a loop around
    the warp-group dispatch that contains one of them is not counted; the longer consumer counts."""
    consumer = ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ", "MUFU.EX2 R3, R3", "NOP"]
    sass = _sass(consumer, consumer + ["FADD R3, R3, R4"])
    assert consumer_loop_instructions_per_key(sass, block_n=2) == 4 / 2  # 3 + branch, NOP not counted
    outer = sass.replace(".L_x_0:", ".L_x_7:\n.L_x_0:", 1).replace(
        "        /*0ff0*/                   EXIT ;", "        /*0fe0*/              @P3 BRA `(.L_x_7) ;\n"
        "        /*0ff0*/                   EXIT ;")
    assert len(sass_loops(outer)) == len(sass_loops(sass)) + 1
    assert consumer_loop_instructions_per_key(outer, block_n=2) == 4 / 2
    with pytest.raises(RuntimeError, match="expected 2 consumer key loops"):
        consumer_loop_instructions_per_key(_sass(consumer), block_n=2)
