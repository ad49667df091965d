"""The benchmark harness in smoke mode: ``python -m bench --smoke`` (tiny sizes, CPU) writes a
results file that follows the schema, and ``bench.render`` turns it into a table (and a plot,
or says it skipped one). Nothing here is about speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import render, schema  # noqa: E402

ATTENTION_IMPLS = ("cocoa", "flex_attention", "sdpa", "flash_attn")
# Ours with one setting changed: rows on the main attention workloads (a note on the CPU: they
# need CUDA), none in the sweep.
ATTENTION_VARIANTS = ("cocoa_nondeterministic", "cocoa_pointer_fwd", "cocoa_tma_ws", "cocoa_autotuned")
LOSS_IMPLS = ("cocoa", "cocoa_filtered", "torch_compact", "torch_full", "liger", "cut_cross_entropy", "cut_cross_entropy_exact",
              "torch_lce", "torch_lce_dense")
E2E_IMPLS = ("cocoa_triton", "sdpa", "flex_attention", "cocoa_triton+lce")
# Implementations that must produce figures on any CPU (the others may be absent or need CUDA).
MEASURED_ON_CPU = {("attention", "cocoa"), ("attention", "sdpa"), ("loss", "cocoa"), ("loss", "cocoa_filtered"), ("loss", "torch_compact"),
                   ("loss", "torch_full"), ("e2e", "cocoa_triton"), ("e2e", "sdpa")}
if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13: its own fused loss is a peer everywhere
    MEASURED_ON_CPU |= {("loss", "torch_lce"), ("loss", "torch_lce_dense")}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--name", "smoke.json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"python -m bench --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    path = out / "smoke.json"
    return path, json.loads(path.read_text())


def test_results_follow_the_schema(smoke_results):
    _, data = smoke_results
    assert schema.validate(data) == []
    for key in ("device", "versions", "date", "rows"):
        assert key in data
    for key in ("torch", "triton", "transformers", "peers"):
        assert key in data["versions"]
    assert data["config"]["smoke"] is True
    for row in data["rows"]:
        assert set(schema.ROW_KEYS) <= set(row), row
        nulls = [k for k in schema.FIGURES if row[k] is None]
        if nulls:
            assert isinstance(row["note"], str) and row["note"].strip(), f"{row} has nulls {nulls} and no note"


def test_every_workload_has_a_row_for_every_impl(smoke_results):
    _, data = smoke_results
    rows = data["rows"]
    for op, impls in (("attention", ATTENTION_IMPLS), ("loss", LOSS_IMPLS), ("e2e", E2E_IMPLS)):
        workloads = {(r["workload"], r.get("group")) for r in rows if r["op"] == op}
        assert workloads, f"no {op} rows"
        for w, group in workloads:
            expected = impls + (ATTENTION_VARIANTS if op == "attention" and group == "main" else ())
            assert sorted(r["impl"] for r in rows if r["op"] == op and r["workload"] == w) == sorted(expected)
    for row in rows:
        if row["impl"] in ATTENTION_VARIANTS:
            assert row["fwd_ms"] is None and "needs CUDA" in row["note"], row
    sweep = sorted(r["n_tokens"] for r in rows if r.get("group") == "sweep" and r["impl"] == "cocoa")
    assert len(sweep) >= 2 and sweep == sorted(set(sweep))
    assert {r["workload"] for r in rows if r["op"] == "attention" and r.get("group") == "main"} == {
        "bridge_32", "bidir_packed_32", "bidir_single_32", "causal_32"}


def test_cpu_paths_are_measured_and_agree_with_ours(smoke_results):
    _, data = smoke_results
    for row in data["rows"]:
        if (row["op"], row["impl"]) in MEASURED_ON_CPU:
            assert row["fwd_ms"] is not None and row["fwdbwd_ms"] is not None, row
            assert row["peak_mem_mb"] is None and "CUDA only" in row["note"]
        if row["impl"] == "flex_attention" and row["op"] == "attention":
            assert row["fwd_ms"] is not None and row["fwdbwd_ms"] is None and "backward" in row["note"]
            assert row["mask_build_ms"] is not None
        if row.get("rel_err_vs_ours") is not None:
            # Same inputs, same mask: a peer that disagrees was handed the wrong mask.
            assert row["rel_err_vs_ours"] < 2e-2, row
    checked = [r for r in data["rows"] if r.get("rel_err_vs_ours") is not None]
    assert {r["impl"] for r in checked} >= {"sdpa", "flex_attention", "torch_compact", "torch_full"}


def test_render_writes_a_table_with_every_impl(smoke_results, tmp_path):
    path, data = smoke_results
    assert render.main([str(path), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "smoke.md").read_text()
    assert "| workload | impl | fwd ms | fwd+bwd ms | peak MiB" in md
    for impl in {r["impl"] for r in data["rows"]}:
        assert impl in md
    assert "Smoke run" in md and "peer/ours" in md
    if importlib.util.find_spec("matplotlib") is None:
        assert "Plot skipped: matplotlib is not installed." in md
        assert not (tmp_path / "smoke.png").exists()
    else:
        assert (tmp_path / "smoke.png").stat().st_size > 0 and "![ratios and N sweep](smoke.png)" in md


def test_render_without_matplotlib_still_writes_the_table(smoke_results, tmp_path, monkeypatch):
    path, _ = smoke_results
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    done = render.render(str(path), str(tmp_path))
    assert done["plot"] is None and "skipped" in done["plot_note"]
    assert "cocoa" in Path(done["markdown"]).read_text()


def test_validate_reports_missing_keys_and_unexplained_nulls():
    good = schema.new_row("loss", "w", "x", fwd_ms=1.0, fwdbwd_ms=2.0, peak_mem_mb=3.0, tflops_fwd=1.0, tflops_bwd=1.0)
    data = {"device": "d", "date": "2026-01-01", "rows": [good],
            "versions": {"torch": "1", "triton": "1", "transformers": "1", "peers": {}}}
    assert schema.validate(data) == []
    unexplained = schema.new_row("attention", "w", "y")
    missing = {k: v for k, v in good.items() if k != "peak_mem_mb"}
    data["rows"] += [unexplained, missing, dict(good, fwd_ms=float("nan"))]
    problems = schema.validate(data)
    assert any("do not say why" in p or "does not say why" in p for p in problems)
    assert any("missing keys ['peak_mem_mb']" in p for p in problems)
    assert any("not a finite" in p for p in problems)


def test_pytest_default_run_does_not_collect_bench(pytestconfig):
    assert pytestconfig.getini("testpaths") == ["tests"]


def test_rows_past_the_time_budget_are_recorded_as_skipped(tmp_path, capsys):
    from bench.__main__ import main

    assert main(["--smoke", "--only", "loss,e2e", "--budget-s", "0.001", "--out", str(tmp_path), "--name", "b.json"]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert schema.validate(data) == []
    assert {r["op"] for r in data["rows"]} == {"loss", "e2e"}
    for row in data["rows"]:
        assert row["fwd_ms"] is None and "time budget" in row["note"], row


def test_budget_gives_a_late_section_half_its_share():
    from bench.budget import Budget

    budget = Budget(100.0, ["attention", "loss"], shares={"attention": 0.5, "loss": 0.5})
    assert not budget.expired("attention")
    budget.deadlines["attention"] = budget.start - 1  # attention overran into loss's share
    assert budget.expired("attention")
    budget.deadlines["loss"] = budget.start + 1e-3  # ... and loss would have no time left
    budget.begin("loss")
    assert not budget.expired("loss")
    assert budget.deadlines["loss"] <= budget.start + 100.0
    assert Budget(None, ["loss"]).expired("loss") is False


def test_cocoa_bench_forwards_to_the_harness(capsys):
    from cocoa.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--repo", str(Path(__file__).resolve().parents[1]), "--", "--help"])
    assert exit_info.value.code == 0
    assert "python -m bench" in capsys.readouterr().out
