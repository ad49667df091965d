"""The project JSONL loader: fields, errors, the bad-image policy; and the built-in shapes set."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from cocoa.data import BadSampleError, BadSamples, ShapesDataset, load_jsonl


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_loads_all_fields_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    path = _write(tmp_path, [
        {"image": "imgs/a.png", "text": "a cat", "target": "sitting", "positive": {"text": "cat"},
         "negatives": [{"text": "dog"}, {"image": "imgs/a.png"}]},
        "",
        {"text": "only text"},
    ])
    a, b = load_jsonl(path)
    assert a.image == tmp_path / "imgs" / "a.png" and a.text == "a cat" and a.target == "sitting"
    assert a.positive.text == "cat" and [n.text for n in a.negatives] == ["dog", None]
    assert b.image is None and b.text == "only text" and b.negatives == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"data.jsonl:2: not valid JSON"),
        ("[1, 2]", r"data.jsonl:2: expected a JSON object, got list"),
        ({"txt": "x"}, r"data.jsonl:2: unknown keys \['txt'\]"),
        ({"image": "missing.png"}, r"data.jsonl:2: image file not found: .*missing.png"),
        ({"target": "x"}, r"data.jsonl:2: a sample needs an 'image' or a non-empty 'text'"),
        ({"text": 3}, r"data.jsonl:2: 'text' must be a string"),
        ({"text": "x", "negatives": {"text": "y"}}, r"data.jsonl:2: 'negatives' must be a list"),
        ({"text": "x", "positive": {"target": "y"}}, r"data.jsonl:2 \(positive\): unknown keys \['target'\]"),
    ],
)
def test_errors_name_the_line(tmp_path, line, message):
    path = _write(tmp_path, [{"text": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_instructions_and_image_dir(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "d.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "q", "instruction": "Find: ",
                                "positive": {"text": "p", "instruction": "Doc: "}}) + "\n")
    (s,) = load_jsonl(path, image_dir=tmp_path)  # relative to image_dir, not to the file's folder
    assert s.image == tmp_path / "a.png" and s.instruction == "Find: " and s.positive.instruction == "Doc: "
    with pytest.raises(BadSampleError, match=r"d.jsonl:1: image file not found: .*data/a.png"):
        load_jsonl(path)


def _cut(path, fmt):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_a_bad_row_not_a_crash_mid_run(tmp_path, fmt):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    _cut(tmp_path / "cut.img", fmt)
    path = _write(tmp_path, [{"image": "ok.png", "text": "a"}, {"image": "cut.img", "text": "b"},
                             {"text": "c", "negatives": [{"image": "cut.img"}]}])
    with pytest.raises(BadSampleError, match=r"data.jsonl:2: image file .*cut.img cannot be decoded"):
        load_jsonl(path)
    bad = BadSamples()
    kept = load_jsonl(path, on_bad_sample="skip", bad=bad)
    assert [s.text for s in kept] == ["a"]
    # the file is opened once; each row that names it is reported with its own line
    assert bad.count == 2 and "data.jsonl:3 (negative 0): image file" in bad.examples[1]
    with pytest.raises(ValueError, match="on_bad_sample must be one of"):
        load_jsonl(path, on_bad_sample="ignore")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_shapes_are_deterministic_and_the_splits_disjoint():
    train, again, held_out = ShapesDataset(50), ShapesDataset(50), ShapesDataset(50, split="eval")
    assert [train[i].text for i in range(50)] == [again[i].text for i in range(50)]
    assert train[3].image.tobytes() == again[3].image.tobytes()
    pairs = {(train[i].image.tobytes(), train[i].text) for i in range(50)}
    assert not any((held_out[i].image.tobytes(), held_out[i].text) in pairs for i in range(50))
    s = train[0]
    assert s.image.size == (84, 84) and s.positive is None
    r = ShapesDataset(50, task="retrieval")[0]  # stage 3: the image alone, its caption the positive
    assert r.text is None and r.positive.text == s.text and r.image.tobytes() == s.image.tobytes()
    assert len({train[i].text for i in range(50)}) > 25  # captions vary
    with pytest.raises(ValueError, match="split must be"):
        ShapesDataset(3, split="test")
