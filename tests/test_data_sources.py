"""Training data in the formats people have: MMEB-train rows (JSONL, parquet), tables through a
column mapping (parquet, a save_to_disk datasets folder read with pyarrow alone), sources mixed by
weight per stage, per-sample instructions, the bad-image policy, and a short stage-3 run."""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cocoa.cli import main
from cocoa.data import BadSampleError, DataSources, Mixture, Sample, parse_data
from cocoa.data.collators import Stage3Collator
from cocoa.data.encoding import InputEncoder
from cocoa.data.sources import load_source
from cocoa.embed import default_image_processor
from cocoa.tiny import char_tokenizer, tiny_config
from cocoa.train import StageConfig, stage_datasets, train_from_sources

RED, BLUE = (200, 30, 30), (30, 30, 200)


def _png(path, color=RED, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _truncated(path, fmt):
    """A valid image of ``fmt`` cut in half: the header reads, the pixel data does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, fmt)  # noise: no tiny compressed stream
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _mmeb_rows():
    return [
        # image -> text (classification style): the placeholder comes first, no hard negative
        {"qry": "<|image_1|>\nRepresent the given image for classification\n", "qry_image_path": "imgs/red.png",
         "pos_text": "a red square", "pos_image_path": "", "neg_text": "", "neg_image_path": ""},
        # text -> image with a text hard negative
        {"qry": "Find me an image that matches: blue", "qry_image_path": "",
         "pos_text": "<|image_1|>\nRepresent the given image.\n", "pos_image_path": "imgs/blue.png",
         "neg_text": "a red square", "neg_image_path": ""},
        # text before the placeholder goes before the image (the instruction slot)
        {"qry": "Question: <|image_1|> what colour?", "qry_image_path": "imgs/red.png",
         "pos_text": "red", "pos_image_path": "", "neg_text": "", "neg_image_path": ""},
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_mmeb(tmp_path, fmt, rows=None):
    _png(tmp_path / "imgs" / "red.png", RED)
    _png(tmp_path / "imgs" / "blue.png", BLUE)
    rows = _mmeb_rows() if rows is None else rows
    if fmt == "jsonl":
        return _write_jsonl(tmp_path / "mmeb.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmeb.parquet")
    return tmp_path / "mmeb.parquet"


def _save_to_disk(folder, table):
    """What datasets' ``Dataset.save_to_disk`` writes: one Arrow IPC *stream* file plus its JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_fingerprint": "x",
                                                   "_format_type": None, "_split": None}))
    return folder


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def _encoder():
    return InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())


# --------------------------------------------------------------------------- MMEB-train rows
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_mmeb_rows_become_queries_with_positives_and_negatives(tmp_path, fmt):
    path = _write_mmeb(tmp_path, fmt)
    source = load_source(parse_data(str(path))[0])
    a, b, c = (source.get(k) for k in range(3))
    assert a.image == tmp_path / "imgs" / "red.png" and a.instruction is None
    assert a.text == "\nRepresent the given image for classification\n"  # placeholder gone, newlines kept
    assert a.positive == Sample(text="a red square") and a.negatives == []
    assert b.image is None and b.text == "Find me an image that matches: blue"
    assert b.positive.image == tmp_path / "imgs" / "blue.png" and b.positive.text == "\nRepresent the given image.\n"
    assert [n.text for n in b.negatives] == ["a red square"]
    assert c.instruction == "Question: " and c.text == " what colour?" and c.image == tmp_path / "imgs" / "red.png"


def test_mmeb_image_dir_and_row_instructions(tmp_path):
    _png(tmp_path / "elsewhere" / "x.png")
    rows = [{"qry": "<|image_1|>\nwhat is it\n", "qry_image_path": "x.png", "pos_text": "a box",
             "pos_image_path": "", "neg_text": "a ball", "neg_image_path": "", "qry_inst": "Classify: ",
             "pos_inst": "Label: ", "id": 7}]  # other fields are ignored
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    s = load_source(parse_data({"path": str(path), "image_dir": str(tmp_path / "elsewhere")})[0]).get(0)
    assert s.image == tmp_path / "elsewhere" / "x.png"
    assert s.instruction == "Classify: " and s.positive.instruction == "Label: "
    assert s.negatives[0].instruction == "Label: "  # a negative is a candidate: the positive's instruction
    # the spec's instruction is the default for rows without qry_inst
    rows[0].pop("qry_inst")
    _write_jsonl(path, rows)
    spec = {"path": str(path), "image_dir": str(tmp_path / "elsewhere"), "instruction": "Find: "}
    assert load_source(parse_data(spec)[0]).get(0).instruction == "Find: "


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("change, message", [
    ({"qry": "<|image_1|> and <|image_2|>"}, r":2 \(query\): 'qry' has 2 image placeholders"),
    ({"qry_image_path": ""}, r":2 \(query\): 'qry' has an image placeholder but 'qry_image_path' is empty"),
    ({"pos_text": "", "pos_image_path": ""}, r":2: the positive has neither text nor image"),
    ({"qry_image_path": "imgs/none.png"}, r":2 \(query\): image file not found: .*none.png"),
], ids=["two-placeholders", "placeholder-without-image", "empty-positive", "missing-image"])
def test_bad_mmeb_rows_name_the_row(tmp_path, fmt, change, message):
    path = _write_mmeb(tmp_path, fmt, [_mmeb_rows()[1], {**_mmeb_rows()[0], **change}])
    with pytest.raises(BadSampleError, match=rf"mmeb\.{fmt}{message}"):
        load_source(parse_data(str(path))[0])


def test_mmeb_field_of_the_wrong_type_is_an_error_even_when_skipping(tmp_path):
    path = _write_mmeb(tmp_path, "jsonl", [{**_mmeb_rows()[0], "pos_text": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"mmeb.jsonl:1: MMEB field 'pos_text' must be a string, got list"):
        load_source(parse_data({"path": str(path), "on_bad_sample": "skip"})[0])


# --------------------------------------------------------------------------- column mappings, datasets folders
def test_datasets_folder_with_image_bytes_through_a_column_mapping(tmp_path):
    table = pa.Table.from_pylist([
        {"caption": "red", "img": {"bytes": _png_bytes(RED), "path": None}, "label": 0},
        {"caption": "blue", "img": {"bytes": None, "path": "blue.png"}, "label": 1},
    ])
    _png(tmp_path / "ds" / "blue.png", BLUE)  # a path-only struct: relative to the folder
    folder = _save_to_disk(tmp_path / "ds", table)
    source = load_source(parse_data({"path": str(folder), "columns": {"text": "caption", "image": "img"}})[0])
    red, blue = source.get(0), source.get(1)
    assert red.text == "red" and red.image.convert("RGB").getpixel((3, 3)) == RED  # decoded from the bytes
    assert blue.image == tmp_path / "ds" / "blue.png"
    assert red.positive is None


def test_a_table_with_our_column_names_needs_no_mapping(tmp_path):
    _png(tmp_path / "r.png", RED)
    rows = [{"image": "r.png", "text": "query", "positive_text": "its match", "negative_text": "not it",
             "positive_instruction": "Doc: ", "instruction": "Query: "}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    s = load_source(parse_data(str(tmp_path / "t.parquet"))[0]).get(0)
    assert (s.image, s.text, s.instruction) == (tmp_path / "r.png", "query", "Query: ")
    assert s.positive == Sample(text="its match", instruction="Doc: ")
    assert s.negatives == [Sample(text="not it", instruction="Doc: ")]


@pytest.mark.parametrize("spec, message", [
    ({"columns": {"text": "caption_en"}}, r"t.parquet: 'columns' names column\(s\) \['caption_en'\] the file does not"),
    ({"columns": {"txt": "caption"}}, r"'columns' has unknown field\(s\) \['txt'\]"),
    ({"columns": {"target": "caption"}}, r"'columns' must map 'text' or 'image'"),
    ({}, r"t.parquet: cannot tell how to read this file: its fields are \['caption', 'n'\]"),
], ids=["missing-column", "unknown-field", "no-input", "undetectable"])
def test_column_mapping_errors_name_the_file_and_column(tmp_path, spec, message):
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "n": 1}]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=message):
        load_source(parse_data({"path": str(tmp_path / "t.parquet"), **spec})[0])


def test_a_datasets_dict_folder_asks_for_a_split(tmp_path):
    _save_to_disk(tmp_path / "dd" / "train", pa.Table.from_pylist([{"text": "x"}]))
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match=r"a DatasetDict folder .* give one split's folder, e.g. .*dd/train"):
        load_source(parse_data(str(tmp_path / "dd"))[0])


@pytest.mark.parametrize("spec, message", [
    ({"path": "x.jsonl", "wieght": 2}, r"data\[1\]: unknown key\(s\) \['wieght'\]"),
    ({"path": "x.jsonl", "weight": 0}, r"data\[1\]: 'weight' must be a positive number, got 0"),
    ({"path": "x.jsonl", "format": "csv"}, r"data\[1\]: 'format' must be one of cocoa, mmeb, columns"),
    ({"path": "x.jsonl", "format": "mmeb", "columns": {"text": "a"}}, r"'columns' goes with format 'columns'"),
    ({"path": "x.jsonl", "on_bad_sample": "ignore"}, r"data\[1\]: on_bad_sample must be one of"),
    ({"weight": 1}, r"data\[1\]: needs a 'path'"),
    (["x.jsonl"], r"data\[1\]: a list inside a list"),
], ids=["typo", "zero-weight", "format", "columns-with-mmeb", "policy", "no-path", "nested"])
def test_spec_errors_name_the_item(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_data(["builtin", spec])


# --------------------------------------------------------------------------- stages and mixing
def test_stage_views_pairs_for_stage_3_and_separate_inputs_for_stages_0_to_2(tmp_path):
    _png(tmp_path / "r.png")
    rows = [{"image": "r.png", "text": "caption one", "positive_text": "match one"},
            {"text": "a text alone"}]  # no positive: an input for stages 0-2, not a stage-3 pair
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    sources = DataSources()
    spec = {"path": str(path), "format": "columns"}
    assert [s.text for s in sources.stage_dataset(spec, 1)] == ["caption one", "match one", "a text alone"]
    pairs = sources.stage_dataset(spec, 3)
    assert len(pairs) == 1 and pairs[0].positive.text == "match one"
    # the project's JSONL: a line is one input for stages 0-2 (its positive is for stage 3)
    project = _write_jsonl(tmp_path / "p.jsonl", [{"text": "q", "positive": {"text": "p"}}, {"text": "alone"}])
    assert [s.text for s in sources.stage_dataset(str(project), 2)] == ["q", "alone"]
    assert [s.positive.text for s in sources.stage_dataset(str(project), 3)] == ["p"]
    with pytest.raises(ValueError, match=r"stage 3 needs rows with a positive; this source has none"):
        sources.stage_dataset(str(_write_jsonl(tmp_path / "none.jsonl", [{"text": "x"}])), 3)


def _texts(n):
    return [{"text": f"item {i}", "positive_text": f"match {i}"} for i in range(n)]


def test_mixture_follows_the_weights_and_is_a_pure_function_of_the_index(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{**r, "text": "A " + r["text"]} for r in _texts(30)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{**r, "text": "B " + r["text"]} for r in _texts(10)])
    spec = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]
    mix = DataSources().stage_dataset(spec, 3, seed=5)
    assert isinstance(mix, Mixture) and len(mix) == 40
    # proportions over many draws (the index may pass len: source_of is defined for any i)
    draws = [mix.source_of(i)[0] for i in range(4000)]
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03
    again = DataSources().stage_dataset(spec, 3, seed=5)  # a fresh load: the same items, in the same places
    assert [mix[i].text for i in range(40)] == [again[i].text for i in range(40)]
    other = DataSources().stage_dataset(spec, 3, seed=6)
    assert [mix[i].text for i in range(40)] != [other[i].text for i in range(40)]
    # items come from every part of both sources
    texts = {mix.source_of(i) for i in range(4000)}
    assert {k for j, k in texts if j == 0} == set(range(30)) and {k for j, k in texts if j == 1} == set(range(10))


def test_per_stage_data_replaces_the_run_data(tmp_path):
    path = _write_mmeb(tmp_path, "jsonl")
    stages = [StageConfig(stage=1), StageConfig(stage=3)]
    datasets = stage_datasets(stages, "builtin", stage_data={3: str(path)})
    assert len(datasets[1]) == 4096 and datasets[1][0].positive is None  # builtin captions
    assert len(datasets[3]) == 3 and datasets[3][1].negatives[0].text == "a red square"


# --------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("reader", ["cocoa", "mmeb", "columns"])
def test_truncated_images_stop_the_load_or_are_skipped_and_counted(tmp_path, reader, image_format):
    good = _png(tmp_path / "good.png")
    bad = _truncated(tmp_path / f"bad.{image_format.lower()}", image_format)
    if reader == "cocoa":
        rows = [{"image": good.name, "text": "fine"}, {"image": bad.name, "text": "broken"}]
    elif reader == "mmeb":
        rows = [{"qry": "<|image_1|> q", "qry_image_path": p.name, "pos_text": "t"} for p in (good, bad)]
    else:
        rows = [{"image": p.name, "text": "t"} for p in (good, bad)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    spec = {"path": str(path), **({"format": "columns"} if reader == "columns" else {})}
    with pytest.raises(BadSampleError, match=rf"d.jsonl:2.*: image file .*{bad.name} cannot be decoded"):
        load_source(parse_data(spec)[0])
    source = load_source(parse_data(spec)[0], on_bad_sample="skip")
    assert source.n == 1 and source.bad.count == 1 and bad.name in source.bad.examples[0]


def test_truncated_image_bytes_in_a_datasets_folder(tmp_path):
    cut = _png_bytes(RED)[:40]
    folder = _save_to_disk(tmp_path / "ds", pa.Table.from_pylist([
        {"text": "ok", "image": {"bytes": _png_bytes(BLUE), "path": None}},
        {"text": "cut", "image": {"bytes": cut, "path": None}}]))
    with pytest.raises(BadSampleError, match=r"ds:2: image bytes cannot be decoded"):
        load_source(parse_data(str(folder))[0])
    assert load_source(parse_data({"path": str(folder), "on_bad_sample": "skip"})[0]).n == 1


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path):
    _truncated(tmp_path / "bad.png", "PNG")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "bad.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"d.jsonl: no usable rows \(1 bad rows skipped"):
        load_source(parse_data(str(path))[0], on_bad_sample="skip")


def test_train_logs_skips_once_per_source(tmp_path, caplog):
    _png(tmp_path / "good.png")
    _truncated(tmp_path / "bad.jpg", "JPEG")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "good.png", "text": "a", "positive": {"text": "b"}},
                                               {"image": "bad.jpg", "text": "c", "positive": {"text": "d"}}])
    stages = [StageConfig(stage=s, on_bad_sample="skip") for s in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="cocoa.train"):
        datasets = stage_datasets(stages, str(path))
    assert len(datasets[1]) == 1 and len(datasets[3]) == 1  # the good row
    warnings = [r.getMessage() for r in caplog.records if "bad rows skipped" in r.getMessage()]
    assert len(warnings) == 1 and "1 bad rows skipped" in warnings[0] and "bad.jpg" in warnings[0]
    with pytest.raises(ValueError, match=r"d.jsonl:2: image file .*bad.jpg cannot be decoded"):
        stage_datasets([StageConfig(stage=1)], str(path))  # the default: error


# --------------------------------------------------------------------------- instructions in stage 3
def test_stage3_uses_the_sample_instruction_else_the_stage_one():
    encoder = _encoder()
    tok = encoder.tokenizer

    def ids(batch, part, row):
        n = int(batch[part]["attention_mask"][row].sum())
        return batch[part]["input_ids"][row, :n].tolist()

    def text_ids(text):
        return tok(text, add_special_tokens=False).input_ids

    samples = [Sample(text="cat", positive=Sample(text="a cat", instruction="Doc: ")),
               Sample(text="dog", instruction="Own: ", positive=Sample(text="a dog")),
               Sample(text="eel", instruction="", positive=Sample(text="an eel"))]
    batch = Stage3Collator(encoder, instruction="Stage: ")(samples)
    eos = [encoder.eos_token_id]
    assert ids(batch, "query", 0) == text_ids("Stage: cat") + eos
    assert ids(batch, "query", 1) == text_ids("Own: dog") + eos
    assert ids(batch, "query", 2) == text_ids("eel") + eos  # an empty instruction: none
    assert ids(batch, "positive", 0) == text_ids("Doc: a cat") + eos
    assert ids(batch, "positive", 1) == text_ids("a dog") + eos  # positives get no stage instruction
    assert batch["query"]["eos_index"].tolist() == [len(ids(batch, "query", i)) - 1 for i in range(3)]


def test_stage3_instruction_goes_before_the_image():
    encoder = _encoder()
    image = Image.new("RGB", (56, 56), RED)
    batch = Stage3Collator(encoder)([Sample(image=image, text="x", instruction="Q",
                                            positive=Sample(text="y"))])
    row = batch["query"]["input_ids"][0].tolist()
    cfg = encoder.config
    assert row[0] == encoder.tokenizer.convert_tokens_to_ids("Q") and row[1] == cfg.vision_start_token_id
    assert row[-2:] == [encoder.tokenizer.convert_tokens_to_ids("x"), encoder.eos_token_id]


def test_mmeb_text_round_trips_through_the_char_tokenizer():
    tok = char_tokenizer()
    text = "\nRepresent the given image for classification\n\n\tdone"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    # the printable characters keep their ids (8 specials first)
    assert tok.convert_tokens_to_ids([" ", "a", "~"]) == [8, 8 + ord("a") - 32, 8 + ord("~") - 32]


# --------------------------------------------------------------------------- end to end
def test_stage3_trains_on_mmeb_rows(tmp_path):
    path = _write_mmeb(tmp_path, "parquet")
    torch.manual_seed(0)
    stages = [StageConfig(stage=3, steps=2, batch_size=2, lr=1e-3, instruction="Represent: ")]
    result = train_from_sources(stages, "tiny", str(path), tmp_path / "run")
    assert result["3"]["steps"] == 2 and all(torch.isfinite(torch.tensor(result["3"]["loss"])))


def test_train_cli_takes_per_stage_data_and_image_dir(tmp_path):
    _write_mmeb(tmp_path, "jsonl", [{**r, "qry_image_path": r["qry_image_path"].removeprefix("imgs/"),
                                     "pos_image_path": r["pos_image_path"].removeprefix("imgs/")}
                                    for r in _mmeb_rows()])
    captions = _write_jsonl(tmp_path / "captions.jsonl", [{"image": "red.png", "text": "red"},
                                                          {"image": "blue.png", "text": "blue"}])
    config = {"model": "tiny", "data": "builtin", "image_dir": str(tmp_path / "imgs"), "out": str(tmp_path / "run"),
              "stages": [{"stage": 1, "steps": 1, "batch_size": 2, "data": str(captions)},
                         {"stage": 3, "steps": 1, "batch_size": 2,
                          "data": [{"path": str(tmp_path / "mmeb.jsonl"), "weight": 2}, "builtin"]}]}
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 0
    for stage in (1, 3):
        assert json.loads((tmp_path / "run" / f"stage{stage}" / "final" / "stage.json").read_text())["steps"] == 1
    # a bad data file stops the run before training, as one line naming the row
    _truncated(tmp_path / "imgs" / "red.png", "PNG")
    with pytest.raises(SystemExit, match=r"cocoa train: .*captions.jsonl:1: image file .*red.png cannot be decoded"):
        main(["train", "--stage", "1", "--steps", "1", "--data", str(captions), "--image-dir", str(tmp_path / "imgs"),
              "--out", str(tmp_path / "run2")])


def test_train_flags_reach_the_data_loader(tmp_path, monkeypatch):
    import cocoa.train

    calls = []
    monkeypatch.setattr(cocoa.train, "train_from_sources", lambda stages, model, data, out, **kw: calls.append(
        (stages, data, kw)) or {})
    base = ["train", "--stage", "3", "--out", str(tmp_path)]
    assert main(base + ["--data", "a.jsonl", "b.parquet", "--image-dir", "imgs", "--on-bad-sample", "skip"]) == 0
    stages, data, kw = calls[-1]
    assert data == ["a.jsonl", "b.parquet"] and kw["image_dir"] == "imgs" and stages[0].on_bad_sample == "skip"
    assert main(base + ["--data", "a.jsonl"]) == 0
    stages, data, kw = calls[-1]
    assert data == "a.jsonl" and kw["image_dir"] is None and stages[0].on_bad_sample == "error"
