"""``cocoa eval``: MMEB-eval files, hit@1 (ties, dedupe), paired recall (the demo's metric), the CLI end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocoa.cli import main
from cocoa.data.images import BadSampleError
from cocoa.data.mmeb_eval import EvalInput, read_eval_file
from cocoa.data.mmeb_train import split_placeholder
from cocoa.evaluate import hit_at_1, paired_recall, retrieval_recall
from eval_files import mmeb_row, png, truncated_png, write_jsonl
from real_checkpoint import real_vl_checkpoint  # noqa: F401


# ----------------------------------------------------------------------------------- helpers
class FakeEmbedder:
    """``encode`` looks each item's text up in ``table`` (unit vectors by hand), so the expected
    metrics are known; it records every item it was asked to embed."""

    def __init__(self, table: dict):
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}
        self.seen = []

    def encode(self, inputs, batch_size=32, show_progress_bar=None, instruction=None, **kwargs):
        self.seen.extend(inputs)
        return np.stack([self.table[self.key(x)] for x in inputs])

    @staticmethod
    def key(item):
        if isinstance(item, dict):
            return item.get("text") or Path(item["image"]).name
        return item if isinstance(item, str) else "<image>"


# ----------------------------------------------------------------------------------- placeholders
@pytest.mark.parametrize("text, inst, expected", [
    ("<|image_1|>\nRepresent the image\n", None, (None, "\nRepresent the image\n")),
    ("Find the caption: <|image_1|> of this photo", None, ("Find the caption: ", " of this photo")),
    ("a plain caption", None, (None, "a plain caption")),
    ("<|image_1|>", None, (None, None)),
    (" \n<|image_1|>\n", "Task: ", ("Task: ", None)),
    ("Look at <|image_1|> it", "Task: ", ("Task: Look at ", " it")),
    ("", "Task: ", ("Task: ", None)),
], ids=["leading", "middle", "none", "alone", "blank-parts", "inst-then-before", "inst-only"])
def test_split_placeholder(text, inst, expected):
    assert split_placeholder(text, inst) == expected


def test_split_placeholder_refuses_two_images():
    with pytest.raises(ValueError, match="2 image placeholders; one image per input"):
        split_placeholder("<|image_1|> and <|image_2|>")


# ----------------------------------------------------------------------------------- reading files
def test_ranking_rows_from_jsonl_and_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png(tmp_path / "imgs" / "q.png")
    rows = [mmeb_row("<|image_1|> What is shown?", ["a cat", "a dog"], image="imgs/q.png", qry_inst="Task:"),
            mmeb_row("a cat", ["<|image_1|>", "<|image_1|>"], images=["imgs/q.png", "imgs/q.png"])]
    from_jsonl = read_eval_file(write_jsonl(tmp_path / "t.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    from_parquet = read_eval_file(tmp_path / "t.parquet")
    assert from_jsonl.kind == from_parquet.kind == "ranking"
    first = from_jsonl.rows[0]
    assert first.query == EvalInput(tmp_path / "imgs" / "q.png", " What is shown?", "Task:")
    assert first.candidates == [EvalInput(None, "a cat"), EvalInput(None, "a dog")]
    assert from_jsonl.rows[1].candidates[0] == EvalInput(tmp_path / "imgs" / "q.png")
    assert [(r.query, r.candidates) for r in from_parquet.rows] == [(r.query, r.candidates) for r in from_jsonl.rows]
    assert from_parquet.rows[1].where == f"{tmp_path / 't.parquet'}:2"


def test_image_dir_overrides_the_file_folder(tmp_path):
    png(tmp_path / "elsewhere" / "q.png")
    path = write_jsonl(tmp_path / "t.jsonl", [mmeb_row("<|image_1|>", ["a", "b"], image="q.png")])
    with pytest.raises(BadSampleError, match=r"t\.jsonl:1 \(query\): image file not found"):
        read_eval_file(path)
    data = read_eval_file(path, image_dir=tmp_path / "elsewhere")
    assert data.rows[0].query.image == tmp_path / "elsewhere" / "q.png"


BAD_ROWS = {  # name: (row 2 of a file, what the error says after "t.jsonl:2")
    "missing-field": ({"qry_text": "x", "qry_img_path": "", "tgt_text": ["a", "b"]},
                      r"missing field\(s\) \['tgt_img_path'\]"),
    "lengths-differ": (mmeb_row("x", ["a", "b"], images=[""]), "'tgt_text' has 2 entries but 'tgt_img_path' 1"),
    "one-candidate": (mmeb_row("x", ["a"]), "1 candidate"),
    "no-candidates": (mmeb_row("x", []), "0 candidate"),
    "empty-candidate": (mmeb_row("x", ["a", ""]), r"\(candidate 1\): has neither an image nor a text"),
    "placeholder-without-image": (mmeb_row("x", ["<|image_1|>", "b"]),
                                  r"\(candidate 0\): the text has an image placeholder but the image path is empty"),
    "two-placeholders": (mmeb_row("<|image_1|><|image_2|>", ["a", "b"], image="ok.png"),
                         r"\(query\): 2 image placeholders"),
    "missing-image": (mmeb_row("<|image_1|>", ["a", "b"], image="nope.png"), r"\(query\): image file not found"),
    "truncated-png": (mmeb_row("x", ["<|image_1|>", "b"], images=["cut.png", ""]),
                      r"\(candidate 0\): image file .*cut\.png cannot be decoded"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_names_file_and_line_or_is_skipped(tmp_path, name):
    png(tmp_path / "ok.png")
    truncated_png(tmp_path / "cut.png")
    row, message = BAD_ROWS[name]
    path = write_jsonl(tmp_path / "t.jsonl", [mmeb_row("good", ["a", "b"]), row, mmeb_row("good too", ["c", "d"])])
    with pytest.raises(BadSampleError, match=rf"t\.jsonl:2\b.*{message}"):
        read_eval_file(path)
    data = read_eval_file(path, on_bad_sample="skip")
    assert [r.number for r in data.rows] == [1, 3]
    assert data.skipped.count == 1 and "t.jsonl:2" in data.skipped.examples[0]


def test_a_bad_image_shared_by_rows_fails_each_row(tmp_path):
    truncated_png(tmp_path / "cut.png")
    rows = [mmeb_row("x", ["<|image_1|>", "b"], images=["cut.png", ""]) for _ in range(3)]
    data = read_eval_file(write_jsonl(tmp_path / "t.jsonl", rows + [mmeb_row("y", ["a", "b"])]), on_bad_sample="skip")
    assert data.skipped.count == 3 and len(data.rows) == 1
    for n, example in enumerate(data.skipped.examples, start=1):
        assert f"t.jsonl:{n} (candidate 0): image file" in example and "cannot be decoded" in example


def test_kind_detection_and_unreadable_files(tmp_path):
    png(tmp_path / "a.png")
    paired = read_eval_file(write_jsonl(tmp_path / "p.jsonl", [{"image": "a.png", "text": "cap", "id": 7}]))
    assert paired.kind == "paired" and paired.rows[0].image == tmp_path / "a.png"
    with pytest.raises(ValueError, match=r"u\.jsonl:1: cannot tell the file's kind .*'caption'"):
        read_eval_file(write_jsonl(tmp_path / "u.jsonl", [{"caption": "x"}]))
    with pytest.raises(ValueError, match="no rows"):
        read_eval_file(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(ValueError, match=r"expected a \.jsonl or \.parquet file"):
        read_eval_file(write_jsonl(tmp_path / "t.json", [mmeb_row("x", ["a", "b"])]))
    with pytest.raises(FileNotFoundError, match="evaluation file not found"):
        read_eval_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"no rows left to evaluate \(1 bad rows skipped"):
        read_eval_file(write_jsonl(tmp_path / "s.jsonl", [mmeb_row("x", ["a"])]), on_bad_sample="skip")


# ----------------------------------------------------------------------------------- hit@1 arithmetic
def _unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


TABLE = {"q": _unit(1, 0), "close": _unit(1, 0.1), "far": _unit(0, 1), "closest": _unit(1, 0.01)}


def _rows(tmp_path, rows):
    return read_eval_file(write_jsonl(tmp_path / "t.jsonl", rows)).rows


def test_hit_at_1_counts_strict_wins_only(tmp_path):
    rows = _rows(tmp_path, [
        mmeb_row("q", ["close", "far"]),             # positive wins: hit
        mmeb_row("q", ["close", "closest", "far"]),  # a negative wins: miss
        mmeb_row("q", ["close", "close", "far"]),    # a negative identical to the positive ties: miss
        mmeb_row("q", ["closest", "far", "close"]),  # hit
    ])
    assert hit_at_1(FakeEmbedder(TABLE), rows) == {"hit@1": 0.5, "n": 4}


def test_hit_at_1_ties_between_distinct_inputs_are_misses(tmp_path):
    table = {**TABLE, "twin": TABLE["close"]}  # another input with the very same vector
    rows = _rows(tmp_path, [mmeb_row("q", ["close", "twin"]), mmeb_row("q", ["close", "far"])])
    assert hit_at_1(FakeEmbedder(table), rows)["hit@1"] == 0.5


def test_hit_at_1_embeds_each_distinct_input_once(tmp_path):
    png(tmp_path / "img.png")
    rows = _rows(tmp_path, [
        mmeb_row("q", ["close", "far"]),
        mmeb_row("q", ["far", "close", "closest"]),
        mmeb_row("<|image_1|>", ["close", "far"], image="img.png"),
        mmeb_row("<|image_1|>", ["close", "far"], image="img.png", qry_inst="Other task:"),
    ])
    table = {**TABLE, "img.png": _unit(1, 0.05)}
    fake = FakeEmbedder(table)
    hit_at_1(fake, rows)
    seen = [tuple(sorted((k, str(v)) for k, v in item.items())) for item in fake.seen]
    assert len(seen) == len(set(seen)) == 6  # q, close, far, closest, the image, the image with the instruction


def test_paired_recall_by_hand():
    # captions c0..c2, images i0..i2; caption 1's best image is image 2, and image 2's best caption is caption 1
    vecs = {"c0": _unit(1, 0, 0), "c1": _unit(0, 1, 1), "c2": _unit(0, 0, 1),
            "i0.png": _unit(1, 0, 0), "i1.png": _unit(0, 1, 0), "i2.png": _unit(0, 0.5, 1)}
    fake = FakeEmbedder(vecs)
    images = [{"image": Path(f"i{i}.png")} for i in range(3)]
    out = paired_recall(fake, images, ["c0", "c1", "c2"], ks=(1, 2))
    assert out == pytest.approx({"t2i@1": 2 / 3, "t2i@2": 1.0, "i2t@1": 2 / 3, "i2t@2": 1.0})


# ----------------------------------------------------------------------------------- the CLI end to end
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo's objects eval split (12 items) exported by ``cocoa data export-eval``."""
    out = tmp_path_factory.mktemp("export")
    assert main(["data", "export-eval", "--out", str(out), "--size", "12", "--candidates", "4", "--seed", "3"]) == 0
    return out


def test_export_writes_the_demo_items(exported):
    from cocoa.export_eval import builtin_split

    data = builtin_split("objects", "eval", 12, seed=3)
    paired = [json.loads(line) for line in (exported / "objects_eval_paired.jsonl").read_text().splitlines()]
    assert [r["text"] for r in paired] == [data[i].text for i in range(12)]
    for i in (0, 11):
        on_disk = np.asarray(Image.open(exported / paired[i]["image"]).convert("RGB"))
        assert np.array_equal(on_disk, np.asarray(data[i].image))
    i2t = [json.loads(line) for line in (exported / "objects_eval_i2t.jsonl").read_text().splitlines()]
    for i, row in enumerate(i2t):
        assert row["tgt_text"][0] == data[i].text and len(row["tgt_text"]) == 4
        assert data[i].text not in row["tgt_text"][1:]


def test_export_negatives_never_repeat_the_positive_caption():
    import random

    from cocoa.export_eval import _negatives

    captions = ["a", "a", "b", "c", "a", "d"]  # ShapesDataset captions can repeat
    counts = Counter(captions)
    for seed in range(5):
        assert sorted(_negatives(captions, counts, 0, 3, random.Random(seed))) == [2, 3, 5]
    with pytest.raises(ValueError, match="item 4: only 3 items with another caption, 4 negatives wanted"):
        _negatives(captions, counts, 4, 4, random.Random(0))


def test_cocoa_eval_paired_equals_retrieval_recall(exported, real_vl_checkpoint, tmp_path):  # noqa: F811
    from cocoa import Embedder
    from cocoa.export_eval import builtin_split

    files = [exported / f"objects_eval_{k}.jsonl" for k in ("paired", "i2t", "t2i")]
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(real_vl_checkpoint), "--data", *map(str, files), "--out", str(out),
                 "--task-names", "pairs", "i2t", "t2i", "--batch-size", "8"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"tasks", "mean_hit@1", "model", "wall_s"} and result["model"] == str(real_vl_checkpoint)
    embedder = Embedder.from_pretrained(real_vl_checkpoint)
    data = builtin_split("objects", "eval", 12, seed=3)
    expected = retrieval_recall(embedder, [data[i] for i in range(12)], ks=(1, 5, 10), batch_size=8)
    assert result["tasks"]["pairs"] == {**expected, "n": 12, "skipped": 0}
    i2t = hit_at_1(embedder, read_eval_file(files[1]).rows, batch_size=8)
    t2i = hit_at_1(embedder, read_eval_file(files[2]).rows, batch_size=8)
    assert result["tasks"]["i2t"] == {**i2t, "skipped": 0} and result["tasks"]["t2i"] == {**t2i, "skipped": 0}
    assert result["mean_hit@1"] == pytest.approx((i2t["hit@1"] + t2i["hit@1"]) / 2)


def test_cocoa_eval_bad_images_error_or_skip(real_vl_checkpoint, tmp_path, capsys):  # noqa: F811
    png(tmp_path / "ok.png")
    truncated_png(tmp_path / "cut.png")
    path = write_jsonl(tmp_path / "task.jsonl", [
        mmeb_row("<|image_1|>", ["one small red circle", "two large blue squares"], image="ok.png"),
        mmeb_row("<|image_1|>", ["a photo of a dog", "one small red circle"], image="missing.png"),
        mmeb_row("a photo of a dog", ["<|image_1|>", "<|image_1|>"], images=["ok.png", "cut.png"]),
        mmeb_row("<|image_1|>", ["two large blue squares", "a photo of a dog"], image="ok.png"),
    ])
    args = ["eval", "--model", str(real_vl_checkpoint), "--data", str(path), "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match=r"cocoa eval: .*task\.jsonl:2 \(query\): image file not found"):
        main(args)
    assert main(args + ["--on-bad-sample", "skip"]) == 0
    task = json.loads((tmp_path / "r.json").read_text())["tasks"]["task"]
    assert task["n"] == 2 and task["skipped"] == 2
    assert "2 bad rows skipped" in capsys.readouterr().out


def test_cocoa_eval_flag_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [mmeb_row("x", ["a", "b"])])
    other = tmp_path / "sub"
    other.mkdir()
    same_stem = write_jsonl(other / "a.jsonl", [mmeb_row("x", ["a", "b"])])
    no_model = str(tmp_path / "no-model")  # never loaded: the flags fail first
    with pytest.raises(SystemExit, match=r"--task-names: got 1 name\(s\) for 2 --data file\(s\)"):
        main(["eval", "--model", no_model, "--data", str(path), str(same_stem), "--task-names", "x", "--out", "r.json"])
    with pytest.raises(SystemExit, match=r"\['a'\] repeat"):
        main(["eval", "--model", no_model, "--data", str(path), str(same_stem), "--out", "r.json"])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1, got 0"):
        main(["eval", "--model", no_model, "--data", str(path), "--batch-size", "0", "--out", "r.json"])
    with pytest.raises(SystemExit, match=r"cocoa eval: --model .*no-model: no such folder"):
        main(["eval", "--model", no_model, "--data", str(path), "--out", "r.json"])
