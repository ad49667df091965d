"""``python -m bench --cpu`` (our PyTorch attention path against dense-mask SDPA at the demo's
shapes) in smoke mode: tiny sizes, one run each; checks the rows, not the speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import render, schema, workloads  # noqa: E402


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    from bench.__main__ import main

    out = tmp_path_factory.mktemp("bench_cpu")
    assert main(["--cpu", "--smoke", "--only", "cpu", "--out", str(out), "--name", "cpu.json"]) == 0
    return out / "cpu.json", json.loads((out / "cpu.json").read_text())


def test_cpu_rows_follow_the_schema_and_describe_the_machine(cpu_results):
    _, data = cpu_results
    assert schema.validate(data) == []
    assert data["config"]["cpu"] is True and data["config"]["sections"] == ["cpu"]
    info = data["device_info"]
    assert info["name"] == "cpu" and info["cores"] >= 1 and info["threads"] >= 1
    assert len(data["config"]["load_average_start"]) == 3


def test_every_cpu_workload_compares_ours_with_sdpa_at_1_and_2_threads(cpu_results):
    _, data = cpu_results
    expected = {w.name for w in workloads.cpu_attention_workloads(smoke=True)}
    assert {r["workload"] for r in data["rows"]} == expected
    assert {w.threads for w in workloads.cpu_attention_workloads(smoke=True)} == {1, 2}
    for name in expected:
        rows = {r["impl"]: r for r in data["rows"] if r["workload"] == name}
        assert set(rows) == {"cocoa", "sdpa"}, name
        ours, sdpa = rows["cocoa"], rows["sdpa"]
        assert ours["ours"] and not sdpa["ours"]
        assert ours["threads"] == sdpa["threads"] == int(name.rsplit("_t", 1)[1])
        for row in (ours, sdpa):
            for key in ("fwd_ms", "fwdbwd_ms", "fwd_cpu_ms", "fwdbwd_cpu_ms", "mask_build_ms"):
                assert row[key] is not None and row[key] >= 0, (name, row["impl"], key)
            assert "CUDA only" in row["note"]
        assert "PyTorch path" in ours["detail"]  # never the Triton interpreter, even with it on
        assert sdpa["rel_err_vs_ours"] < 1e-4, sdpa  # fp32, same mask: same attention


def test_the_demo_shapes_are_what_the_cpu_rows_measure():
    full = {w.name: w for w in workloads.cpu_attention_workloads()}
    layer, tiny = full["cpu_bridge_2x512_t2"], full["cpu_bridge_32x60_t1"]
    def layout(w):
        return w.shape.heads_q, w.shape.heads_kv, w.shape.head_dim, len(w.rows), w.n

    assert layout(layer) == (12, 2, 128, 2, 512)
    assert layout(tiny) == (4, 2, 8, 32, 60)
    lengths = [sum(a + b for a, b in row) for row in tiny.rows]
    assert max(lengths) == 60 and min(lengths) < 60  # padded rows of varied length, as the demo batches
    mask = layer.mask("cpu")
    assert tuple(mask.shape) == (2, 512) and int((mask.hi > mask.lo).sum()) == 1024


def test_render_says_these_are_cpu_rows(cpu_results, tmp_path):
    path, _ = cpu_results
    assert render.main([str(path), "--out-dir", str(tmp_path), "--no-plot"]) == 0
    md = (tmp_path / "cpu.md").read_text()
    assert "cores; rows `_t1`/`_t2` ran with 1/2 torch threads" in md
    assert "cpu_bridge_2x32_t1" in md and "**cocoa**" in md


def test_render_into_a_document_replaces_only_between_its_markers(cpu_results, tmp_path):
    path, _ = cpu_results
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- bench:cpu.json -->\nold table\n<!-- /bench:cpu.json -->\noutro\n")
    assert render.main([str(path), "--out-dir", str(tmp_path), "--no-plot", "--into", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- bench:cpu.json -->\n### Benchmarks on cpu")
    assert text.endswith("<!-- /bench:cpu.json -->\noutro\n") and "old table" not in text
    assert "cpu_bidir_4x12_t2" in text
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="needs one <!-- bench:cpu.json -->"):
        render.main([str(path), "--out-dir", str(tmp_path), "--no-plot", "--into", str(doc)])


def test_cpu_loss_rows_run_each_implementation_in_its_own_process(tmp_path):
    """``--only cpu_loss``: ours, torch's F.linear_cross_entropy (chunked and dense) and plain
    PyTorch at the demo's loss shape, each with its time, its process's peak RSS and what the
    loss added to it, the same loss value, and torch's rows marked unavailable on an older torch."""
    import torch

    from bench.__main__ import main
    from bench.cpu_loss import IMPLS

    assert main(["--cpu", "--smoke", "--only", "cpu_loss", "--out", str(tmp_path), "--name", "loss.json"]) == 0
    data = json.loads((tmp_path / "loss.json").read_text())
    assert schema.validate(data) == []
    rows = {r["impl"]: r for r in data["rows"] if r["workload"] == "lce_demo_fp32"}
    assert set(rows) == set(IMPLS) and rows["cocoa"]["ours"]
    has_torch_lce = hasattr(torch.nn, "LinearCrossEntropyOptions")
    for name, row in rows.items():
        if name.startswith("torch_lce") and not has_torch_lce:
            assert row["fwdbwd_ms"] is None and "no F.linear_cross_entropy" in row["note"], row
            continue
        assert row["fwdbwd_ms"] > 0 and row["peak_mem_mb"] > 0 and row["rss_added_mb"] >= 0, row
        assert "process's peak RSS" in row["note"], row
        if name != "cocoa":
            assert row["rel_err_vs_ours"] < 1e-5, row  # fp32, the same inputs: the same loss
