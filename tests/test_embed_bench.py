"""bench/embed_throughput.py at a tiny size: every arm runs and gives the packed arm's vectors."""

from __future__ import annotations

from bench import embed_throughput


def test_arms_agree_and_render():
    result = embed_throughput.run("tiny", "cpu", n=5, batch_size=2, repeats=1)
    assert [r["arm"] for r in result["rows"]] == ["packed", "padded_sorted", "padded"]
    for row in result["rows"]:
        assert row["min_cosine_vs_packed"] >= 0.9999 and row["inputs_per_s"] > 0
    assert result["rows"][0]["tokens"] >= 5 and result["model"]["hidden"] == 64
    table = embed_throughput.markdown(result)
    assert "| padded_sorted |" in table and "inputs/s" in table
