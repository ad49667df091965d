"""``cocoa demo`` / ``cocoa experiment`` at tiny steps: the report's schema, caching, diagnostics."""

import json

import pytest
import torch

from cocoa.cli import main
from cocoa.demo import ARMS, METRICS
from cocoa.diagnostics import linear_probe, mean_pairwise_cosine

TINY = ["--steps", "3", "2", "2", "4", "--threads", "1",
        "--set", "batch_size=4", "--set", "unlabelled=64", "--set", "labelled=16", "--set", "eval_size=8",
        "--set", "val_size=8", "--set", "probe_train=16", "--set", "curve_every=2", "--set", "enforce_gate=false"]


def _check_arm(arm: dict, seeds: list[str], stages: set[str]):
    assert set(arm) >= {"seeds", "mean", "std"}
    assert sorted(arm["seeds"]) == sorted(seeds)
    for run in arm["seeds"].values():
        assert set(run["recall"]) == set(METRICS) and all(0.0 <= v <= 1.0 for v in run["recall"].values())
        assert set(run["stages"]) == stages
        assert all(isinstance(s["loss"], list) and s["loss"] for s in run["stages"].values())
        d = run["diagnostics"]
        assert set(d) >= {"bridge_swap_gap", "bridge_carried_nothing", "probe", "eos_mean_cosine", "pixel"}
        assert set(d["bridge_swap_gap"]) == {"own", "swapped", "gap"}
        assert {"obj1.color", "obj2.shape", "mean"} <= set(d["probe"])
        assert set(d["pixel"]) == {"mse", "constant"}
        assert run["curve"]["steps"] == [2, 4] and len(run["curve"]["t2i@1"]) == 2
        assert run["curve"]["t2i@1"][-1] == run["recall"]["t2i@1"]
    assert set(arm["mean"]) == set(METRICS) and set(arm["std"]) == set(METRICS)


def test_demo_report_schema_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "0", "1", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"device", "wall_s", "config", "arms", "verdict"}
    assert report["device"] == "cpu" and report["config"]["seeds"] == [0, 1]
    assert report["config"]["stage3_steps"] == 4 and report["config"]["batch_size"] == 4
    assert set(report["arms"]) == set(ARMS)
    _check_arm(report["arms"]["contrastive_only"], ["0", "1"], {"0", "3"})
    _check_arm(report["arms"]["cocoa"], ["0", "1"], {"0", "1", "2", "3"})
    _check_arm(report["arms"]["compute_control"], ["0", "1"], {"0", "0-extra", "3"})
    co = report["arms"]["compute_control"]["seeds"]["0"]["stages"]
    assert len(co["0-extra"]["loss"]) == 2 + 2  # the control's extra captioning = stages 1 + 2
    for arm in ARMS:  # every arm starts from the same stage 0
        for seed in ("0", "1"):
            assert report["arms"][arm]["seeds"][seed]["stages"]["0"]["loss"] == report["stage0"][seed]["loss"]
    assert isinstance(report["verdict"], str) and "gate failed" in report["verdict"]  # 3 steps read no image
    assert (out / "curves.png").is_file()
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "contrastive_only" in printed
    # a rerun reuses every cached piece and reports the same numbers
    assert main(["demo", "--out", str(out), "--seeds", "0", "1", *TINY]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["arms"] == report["arms"]


def test_experiment_grid_with_lr_choice(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--seeds", "0", "--pools", "8", "16", "--lrs", "1e-3", "3e-3",
                 *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["pools"] == [8, 16] and report["config"]["lrs"] == [1e-3, 3e-3]
    assert set(report["pools"]) == {"8", "16"}
    for pool in report["pools"].values():
        assert set(pool["arms"]) == set(ARMS) and isinstance(pool["verdict"], str)
    for arm in ARMS:
        choice = report["lr_choice"][arm]
        assert set(choice["tried"]) == {"0.001", "0.003"} and choice["lr"] in (1e-3, 3e-3)
        best = max(choice["tried"], key=lambda lr: choice["tried"][lr]["score"])
        assert float(best) == choice["lr"]
        assert all(run["stage3_lr"] == choice["lr"] for p in report["pools"].values()
                   for run in p["arms"][arm]["seeds"].values())
    assert (out / "curves_pool8.png").is_file() and (out / "curves_pool16.png").is_file()
    summary = (out / "summary.md").read_text()  # the tables, rendered from the report
    assert summary.count("| cocoa | ") == 2 + 1 and "stage-0 gate" in summary


def test_demo_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--set"):
        main(["demo", "--out", str(tmp_path), "--set", "no_such_field=1"])
    with pytest.raises(SystemExit, match="labelled"):
        main(["demo", "--out", str(tmp_path), "--set", "labelled=100", "--set", "unlabelled=10"])


def test_probe_and_cosine_can_tell_apart():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (120,), generator=gen)
    separable = torch.nn.functional.one_hot(labels, 8).float() + 0.05 * torch.randn(120, 8, generator=gen)
    assert linear_probe(separable[:80], labels[:80], separable[80:], labels[80:])["accuracy"] == 1.0
    noise = torch.randn(120, 8, generator=gen)
    assert linear_probe(noise[:80], labels[:80], noise[80:], labels[80:])["accuracy"] < 0.7
    assert mean_pairwise_cosine(torch.ones(5, 4)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
