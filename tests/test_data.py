"""The JSONL loader's errors and the built-in shapes set."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cocoa.data import ShapesDataset, load_jsonl


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


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_shapes_are_deterministic_and_the_splits_disjoint():
    train, again, held_out = ShapesDataset(50), ShapesDataset(50), ShapesDataset(50, split="eval")
    assert [train[i].text for i in range(50)] == [again[i].text for i in range(50)]
    assert list(train[3].image.getdata()) == list(again[3].image.getdata())
    pairs = {(tuple(train[i].image.getdata()), train[i].text) for i in range(50)}
    assert not any((tuple(held_out[i].image.getdata()), held_out[i].text) in pairs for i in range(50))
    s = train[0]
    assert s.image.size == (84, 84) and s.positive is None
    r = ShapesDataset(50, task="retrieval")[0]  # stage 3: the image alone, its caption the positive
    assert r.text is None and r.positive.text == s.text and list(r.image.getdata()) == list(s.image.getdata())
    assert len({train[i].text for i in range(50)}) > 25  # captions vary
    with pytest.raises(ValueError, match="split must be"):
        ShapesDataset(3, split="test")
