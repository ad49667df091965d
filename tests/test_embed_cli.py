"""``cocoa embed``: input rows (plain, project JSONL, MMEB-eval sides), ids, .npy/.parquet outputs, bad rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cocoa.cli import main
from cocoa.data.images import BadSampleError
from cocoa.data.mmeb_eval import EvalInput
from cocoa.embed_io import embed_inputs, ids_file, read_embed_inputs, write_embeddings
from eval_files import mmeb_row, png, truncated_png, write_jsonl
from real_checkpoint import real_vl_checkpoint  # noqa: F401


class CountingEmbedder:
    """Each item's vector is (its index in the call, length of its text); records the calls."""

    def __init__(self):
        self.calls = []

    def encode(self, inputs, batch_size=32, show_progress_bar=None, instruction=None, **kwargs):
        self.calls.append((list(inputs), instruction))
        return np.array([[i, len(x.get("text") or "")] for i, x in enumerate(inputs)], dtype=np.float32)


# ----------------------------------------------------------------------------------- reading inputs
def test_rows_ids_and_project_jsonl(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "first", "text": "a caption", "instruction": "Query:"},
        {"image": "imgs/a.png"},  # no id: its line number
        {"image": "imgs/a.png", "text": "two", "target": "t", "positive": {"text": "p"}, "negatives": []},
    ])
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line 2: ids are line numbers
    data = read_embed_inputs(path)
    assert data.ids == ["first", 3, 4]
    assert data.inputs == [EvalInput(None, "a caption", "Query:"), EvalInput(tmp_path / "imgs" / "a.png"),
                           EvalInput(tmp_path / "imgs" / "a.png", "two")]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": 10, "text": "x"}, {"id": 11, "text": "y"}]), tmp_path / "r.parquet")
    data = read_embed_inputs(tmp_path / "r.parquet")
    assert data.ids == [10, 11] and [x.text for x in data.inputs] == ["x", "y"]


def test_mmeb_sides(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [mmeb_row("q1", ["a", "b"]), mmeb_row("q2", ["b", "c", "a"])])
    qry = read_embed_inputs(path)
    assert qry.ids == [1, 2] and [x.text for x in qry.inputs] == ["q1", "q2"]
    tgt = read_embed_inputs(path, side="tgt")
    assert tgt.ids == ["1:0", "1:1", "2:0", "2:1", "2:2"]
    assert [x.text for x in tgt.inputs] == ["a", "b", "b", "c", "a"]


@pytest.mark.parametrize("rows, side, error, message", [
    ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], None, ValueError,
     r"rows\.jsonl:2: id 1 repeats that of .*rows\.jsonl:1"),
    ([{"txt": "a"}], None, BadSampleError, r"rows\.jsonl:1: unknown key\(s\) \['txt'\]"),
    ([{"id": 1.5, "text": "a"}], None, BadSampleError, "'id' must be an int or a string"),
    ([{"id": 1}], None, BadSampleError, "needs an 'image' or a non-empty 'text'"),
    ([{"text": "a"}], "tgt", ValueError, "--side tgt: only for MMEB-eval files"),
], ids=["duplicate-id", "unknown-key", "float-id", "empty-row", "side-on-plain-rows"])
def test_bad_rows(tmp_path, rows, side, error, message):
    with pytest.raises(error, match=message):
        read_embed_inputs(write_jsonl(tmp_path / "rows.jsonl", rows), side=side)


def test_bad_images_error_or_skip(tmp_path):
    truncated_png(tmp_path / "cut.png")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok"}, {"image": "missing.png"}, {"image": "cut.png"}])
    with pytest.raises(BadSampleError, match=r"rows\.jsonl:2: image file not found"):
        read_embed_inputs(path)
    data = read_embed_inputs(path, on_bad_sample="skip")
    assert data.ids == [1] and data.skipped.count == 2 and "rows.jsonl:3" in data.skipped.examples[1]


# ----------------------------------------------------------------------------------- embedding and writing
def test_each_distinct_input_embedded_once_in_caller_order():
    inputs = [EvalInput(None, "aa"), EvalInput(None, "b"), EvalInput(None, "aa"), EvalInput(None, "b", "Q:")]
    fake = CountingEmbedder()
    vectors = embed_inputs(fake, inputs, instruction="Default:")
    (seen, instruction), = fake.calls
    assert seen == [{"text": "aa"}, {"text": "b"}, {"text": "b", "instruction": "Q:"}] and instruction == "Default:"
    assert vectors.tolist() == [[0, 2], [1, 1], [0, 2], [2, 1]]


def test_write_npy_and_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert write_embeddings(tmp_path / "v.npy", [3, "x", 5], vectors) == [tmp_path / "v.npy", tmp_path / "v.ids.json"]
    assert np.array_equal(np.load(tmp_path / "v.npy"), vectors)
    assert json.loads(ids_file(tmp_path / "v.npy").read_text()) == ["3", "x", "5"]  # mixed ids: all strings
    write_embeddings(tmp_path / "v.parquet", [3, 4, 5], vectors)
    table = pq.read_table(tmp_path / "v.parquet")
    column_type = table.schema.field("embedding").type
    assert pa.types.is_list(column_type) and column_type.value_type == pa.float32()
    assert table.column("id").to_pylist() == [3, 4, 5]
    assert np.array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), vectors)
    with pytest.raises(ValueError, match=r"--out .*v\.csv: expected a file ending in one of \.npy, \.parquet, \.pt"):
        write_embeddings(tmp_path / "v.csv", [1, 2, 3], vectors)


# ----------------------------------------------------------------------------------- the CLI end to end
def test_cocoa_embed_npy_and_parquet_match_the_embedder(real_vl_checkpoint, tmp_path):  # noqa: F811
    import pyarrow.parquet as pq

    from cocoa import Embedder

    png(tmp_path / "a.png", seed=1)
    rows = [{"id": "cap", "text": "one small red circle"}, {"image": "a.png", "text": "a photo of a dog"},
            {"image": "a.png", "instruction": "Represent the given text for retrieval."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["embed", "--model", str(real_vl_checkpoint), "--data", str(path),
                 "--out", str(tmp_path / "v.npy")]) == 0
    vectors = np.load(tmp_path / "v.npy")
    assert json.loads((tmp_path / "v.ids.json").read_text()) == ["cap", "2", "3"]
    expected = Embedder.from_pretrained(real_vl_checkpoint).encode(
        [{k: tmp_path / v if k == "image" else v for k, v in r.items() if k != "id"} for r in rows])
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)
    assert main(["embed", "--model", str(real_vl_checkpoint), "--data", str(path),
                 "--out", str(tmp_path / "v.parquet")]) == 0
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column("id").to_pylist() == ["cap", "2", "3"]
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), expected, rtol=0, atol=1e-5)


def test_cocoa_embed_mmeb_candidates_and_bad_rows(real_vl_checkpoint, tmp_path, capsys):  # noqa: F811
    png(tmp_path / "ok.png")
    truncated_png(tmp_path / "cut.png")
    path = write_jsonl(tmp_path / "m.jsonl", [
        mmeb_row("a photo of a dog", ["<|image_1|>", "one small red circle"], images=["ok.png", ""]),
        mmeb_row("x", ["<|image_1|>", "b"], images=["cut.png", ""]),
        mmeb_row("y", ["one small red circle", "<|image_1|>"], images=["", "ok.png"]),
    ])
    args = ["embed", "--model", str(real_vl_checkpoint), "--data", str(path), "--side", "tgt",
            "--out", str(tmp_path / "t.npy")]
    with pytest.raises(SystemExit, match=r"cocoa embed: .*m\.jsonl:2 \(candidate 0\): image file .*cannot be decoded"):
        main(args)
    assert main(args + ["--on-bad-sample", "skip"]) == 0
    assert "1 bad rows skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.ids.json").read_text()) == ["1:0", "1:1", "3:0", "3:1"]
    vectors = np.load(tmp_path / "t.npy")
    np.testing.assert_array_equal(vectors[0], vectors[3])  # the same image candidate, embedded once
    np.testing.assert_array_equal(vectors[1], vectors[2])


def test_cocoa_embed_checks_flags_before_loading_the_model(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    no_model = str(tmp_path / "no-model")
    with pytest.raises(SystemExit, match=r"cocoa embed: --out .*v\.txt: expected a file ending in one of"):
        main(["embed", "--model", no_model, "--data", str(path), "--out", str(tmp_path / "v.txt")])
    with pytest.raises(SystemExit, match="cocoa embed: data file not found"):
        main(["embed", "--model", no_model, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "v.npy")])
