"""Training from a checkpoint folder saved the way real ones are (tests/real_checkpoint.py: bf16
weights, byte-level BPE tokenizer without mask token, Qwen2-VL image processor): the three stages
in bf16 mixed precision on CPU autocast with gradient checkpointing and accumulation through
``cocoa train --config``, the mask token, bad input, and the exported backbone in ``Embedder``
and ``cocoa embed``. (Accumulation against the large batch: tests/test_grad_accum.py.)"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from real_checkpoint import real_text_checkpoint, real_vl_checkpoint  # noqa: F401
from safetensors import safe_open
from transformers import AutoTokenizer

import cocoa
from cocoa.cli import main
from cocoa.data import ShapesDataset
from cocoa.data.encoding import InputEncoder
from cocoa.embed import Embedder
from cocoa.model import CocoaModel
from cocoa.train import CocoaTrainer

STAGE = {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_ratio": 0, "precision": "bf16", "gradient_checkpointing": True,
         "grad_accum": 2, "max_pixels": 56 * 56}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def pipeline(real_vl_checkpoint, tmp_path_factory):  # noqa: F811
    """Stages 1-3 from the real-format folder via ``cocoa train --config``, with what the model
    saw on every forward (autocast, weight dtypes, checkpointing) and the warnings logged."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    config = {"model": str(real_vl_checkpoint), "data": "builtin", "out": str(out),
              "stages": [{"stage": 1, **STAGE, "pack_budget": 64}, {"stage": 2, **STAGE}, {"stage": 3, **STAGE}]}
    path = out.parent / "config.json"
    path.write_text(json.dumps(config))
    seen = []
    original = CocoaModel._hidden

    def spy(self, batch):
        hidden = original(self, batch)
        if self.training:
            seen.append({"autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": torch.get_autocast_dtype("cpu"),
                         "weights": {p.dtype for p in self.parameters()},
                         "checkpointing": self.is_activation_checkpointing})
        return hidden

    records = _Records()
    logging.getLogger("cocoa").addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CocoaModel, "_hidden", spy)
            assert main(["train", "--config", str(path)]) == 0
    finally:
        logging.getLogger("cocoa").removeHandler(records)
    return {"out": out, "seen": seen, "log": records.messages}


def test_three_stages_train_in_bf16_autocast_with_fp32_master_weights(pipeline):
    seen = pipeline["seen"]
    assert len(seen) == 2 + 2 + 2 * 2  # one step of two micro-batches per stage; stage 3 embeds query and positive
    for forward in seen:
        assert forward["autocast"] and forward["autocast_dtype"] == torch.bfloat16
        assert forward["weights"] == {torch.float32}  # loaded from a bf16 checkpoint, trained in fp32
        assert forward["checkpointing"]
    parts = {1: {"text", "image"}, 2: {"text"}, 3: {"contrastive"}}
    for stage in (1, 2, 3):
        record = json.loads((pipeline["out"] / f"stage{stage}" / "final" / "stage.json").read_text())
        assert record["steps"] == 1 and len(record["loss"]) == 1 and torch.isfinite(torch.tensor(record["loss"])).all()
        assert set(record["loss_parts"]) == parts[stage]
        assert record["config"]["precision"] == "bf16" and record["config"]["grad_accum"] == 2
        with safe_open(pipeline["out"] / f"stage{stage}" / "final" / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_the_mask_token_is_added_once_and_saved_with_every_export(pipeline, real_vl_checkpoint):  # noqa: F811
    original = AutoTokenizer.from_pretrained(real_vl_checkpoint)
    assert original.mask_token is None
    added = [m for m in pipeline["log"] if "added '<|mask|>'" in m]
    assert len(added) == 1 and f"from {len(original)} to {len(original) + 1} rows" in added[0]
    for stage in (1, 2, 3):
        folder = pipeline["out"] / f"stage{stage}" / "final" / "backbone"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == len(original)
        config = json.loads((folder / "config.json").read_text())
        assert config["text_config"]["vocab_size"] == len(original) + 1


def test_exported_backbone_embeds_with_embedder_and_cli(pipeline, tmp_path):
    image = ShapesDataset(1)[0].image
    image.save(tmp_path / "shape.png")
    items = [{"text": "two large blue squares at the top left"}, {"image": "shape.png"},
             {"image": "shape.png", "text": "one small red circle"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    folder = pipeline["out"] / "stage3" / "final" / "backbone"
    embedder = Embedder.from_pretrained(folder)
    expected = embedder.encode([{k: tmp_path / v if k == "image" else v for k, v in i.items()} for i in items],
                               convert_to_tensor=True)
    assert expected.shape == (3, 64) and torch.allclose(expected.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert main(["embed", "--model", str(folder), "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(tmp_path / "vectors.pt")]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "vectors.pt"), expected, atol=1e-5, rtol=0)
    for stage in (1, 2):  # every stage's export is loadable too
        vector = Embedder.from_pretrained(pipeline["out"] / f"stage{stage}" / "final" / "backbone").encode("a text")
        assert vector.shape == (64,) and np.isfinite(vector).all()


def test_a_stage_starts_from_an_earlier_stage_with_the_added_mask_token(pipeline, real_vl_checkpoint):  # noqa: F811
    """``--init`` a stage-2 output: its tokenizer (with ``<|mask|>``) replaces the folder's and the
    embedding grows to match before the weights load."""
    out = pipeline["out"].parent / "from_init"
    assert main(["train", "--stage", "3", "--model", str(real_vl_checkpoint), "--init",
                 str(pipeline["out"] / "stage2" / "final"), "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--max-pixels", str(56 * 56)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "stage3" / "final" / "backbone")
    assert tokenizer.mask_token == "<|mask|>"


def test_pure_bf16_model_has_a_bf16_pixel_head_and_no_dtype_error(real_vl_checkpoint):  # noqa: F811
    """Loaded in the checkpoint's dtype (bf16) and run without autocast, the heads follow it."""
    from cocoa.data.collators import Stage1Collator
    from cocoa.embed import load_image_processor

    backbone = cocoa.load_model(str(real_vl_checkpoint))
    model = CocoaModel(backbone)
    assert backbone.dtype == torch.bfloat16 and model.pixel_head.out.weight.dtype == torch.bfloat16
    assert "in_chans" not in backbone.config.vision_config.to_dict()  # transformers 5's in_channels only
    encoder = InputEncoder(AutoTokenizer.from_pretrained(real_vl_checkpoint), backbone.config,
                           load_image_processor(real_vl_checkpoint))
    collate = Stage1Collator(encoder, mask_token_id=encoder.tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    loss, parts = model(stage=1, return_parts=True, **collate(list(ShapesDataset(2))))
    loss.backward()
    assert set(parts) == {"text", "image"} and torch.isfinite(loss)
    assert model.pixel_head.out.weight.grad.dtype == torch.bfloat16


def test_mask_token_uses_spare_rows_or_an_existing_token(real_text_checkpoint):  # noqa: F811
    from transformers import Qwen2ForCausalLM

    from cocoa.stage_inputs import SettingError
    from cocoa.tokens import ensure_mask_token

    tokenizer = AutoTokenizer.from_pretrained(real_text_checkpoint)
    n = len(tokenizer)
    model = Qwen2ForCausalLM.from_pretrained(real_text_checkpoint, dtype=torch.float32)
    model.resize_token_embeddings(n + 8)  # like Qwen2-VL-2B: spare rows past the tokenizer
    assert ensure_mask_token(tokenizer, model, "<|vision_pad|>") == tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    assert len(tokenizer) == n and tokenizer.mask_token == "<|vision_pad|>"  # an existing token: nothing added
    with pytest.raises(SettingError, match="mask_token: '<|nope|>' is not in the tokenizer's vocabulary"):
        ensure_mask_token(tokenizer, model, "<|nope|>")

    tokenizer = AutoTokenizer.from_pretrained(real_text_checkpoint)
    mask_id = ensure_mask_token(tokenizer, model)
    table = model.get_input_embeddings().weight
    assert mask_id == n and table.shape[0] == n + 8  # a spare row serves: no resize
    torch.testing.assert_close(table[mask_id], table[:n].mean(0))  # the untrained row is given the mean
    assert ensure_mask_token(tokenizer, model) == mask_id and len(tokenizer) == n + 1  # once


# ---------------------------------------------------------------------------------------------- bad input
def _without(folder, tmp_path, *names):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(*names))
    return copy


BAD_INPUT = {
    "no tokenizer": (lambda vl, text, tmp: {"model": str(_without(vl, tmp, "tokenizer*"))}, {}, ["model:", "no tokenizer"]),
    "no image processor": (lambda vl, text, tmp: {"model": str(_without(vl, tmp, "preprocessor_config.json"))}, {},
                           ["model:", "no image processor"]),
    "text-only model given images": (lambda vl, text, tmp: {"model": str(text)}, {}, ["data:", "text-only model"]),
    "max_pixels below one merged patch": (None, {"max_pixels": 27 * 28}, ["max_pixels", "784"]),
    "grad_accum below 1": (None, {"grad_accum": 0}, ["grad_accum", ">= 1"]),
    "unknown precision": (None, {"precision": "int8"}, ["precision", "bf16, fp16, fp32", "'int8'"]),
    "mask token not in vocabulary": (None, {"mask_token": "<|nope|>"}, ["mask_token", "'<|nope|>'", "vocabulary"]),
    "unknown stage key": (None, {"learning_rate": 1e-3}, ["'learning_rate'", "valid keys", "precision", "grad_accum"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_training_naming_the_setting(case, real_vl_checkpoint, real_text_checkpoint,  # noqa: F811
                                                            tmp_path, monkeypatch):
    source, stage_keys, expected = BAD_INPUT[case]
    run = {"model": str(real_vl_checkpoint), "data": "builtin", "out": str(tmp_path / "run")}
    if source is not None:
        run.update(source(real_vl_checkpoint, real_text_checkpoint, tmp_path))
    run["stages"] = [{"stage": 1, "steps": 1, "batch_size": 2, **stage_keys}]
    (tmp_path / "config.json").write_text(json.dumps(run))
    monkeypatch.setattr(CocoaTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as error:
        main(["train", "--config", str(tmp_path / "config.json")])
    message = str(error.value)
    assert message.startswith("cocoa train: ") and "\n" not in message
    for part in expected:
        assert part in message


def test_unknown_run_key_in_a_config_is_one_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny", "epochs": 3, "stages": [{"stage": 1}]}))
    with pytest.raises(SystemExit, match="unknown key\\(s\\) 'epochs'; valid keys: model, data, image_dir, out, init"):
        main(["train", "--config", str(tmp_path / "config.json")])


def test_grad_accum_flag_below_one_is_one_message(monkeypatch):
    monkeypatch.setattr(CocoaTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit, match="grad_accum must be an integer >= 1, got 0"):
        main(["train", "--stage", "1", "--out", "unused", "--grad-accum", "0"])
