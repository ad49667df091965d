"""Stage runner, resume, the train CLI and the demo, on the tiny built-in backbone (CPU)."""

from __future__ import annotations

import json
import shutil

import torch

import cocoa
from cocoa.cli import main
from cocoa.data import ShapesDataset
from cocoa.data.encoding import InputEncoder
from cocoa.embed import default_image_processor
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config
from cocoa.train import StageConfig, run_stage


def _setup(seed=0):
    torch.manual_seed(seed)
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    return CocoaModel(cocoa.load_model(tiny_config())), encoder, ShapesDataset(64)


def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = StageConfig(stage=2, steps=4, batch_size=4, lr=1e-3, save_steps=2)
    model, encoder, data = _setup()
    full = run_stage(cfg, model, encoder, data, tmp_path / "run", resume=False)
    assert full["steps"] == 4 and len(full["loss"]) == 4
    assert (tmp_path / "run" / "checkpoint-2" / "backbone" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()

    # Interrupted after step 2: drop what came later and resume with a freshly initialised model.
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    shutil.rmtree(tmp_path / "run" / "final")
    loaded = []
    original_load = CocoaModel.load
    monkeypatch.setattr(CocoaModel, "load", lambda self, d: (loaded.append(str(d)), original_load(self, d))[1])
    model2, _, _ = _setup(seed=123)
    resumed = run_stage(cfg, model2, encoder, data, tmp_path / "run")
    assert loaded == [str(tmp_path / "run" / "checkpoint-2")]  # weights from the last checkpoint
    assert resumed["steps"] == 4 and len(resumed["loss"]) == 4
    # the log up to the checkpoint comes back with it, and steps 3-4 are the uninterrupted run's
    # exactly (same weights, batches, masks): a resume that skipped or repeated a batch differs
    assert resumed["loss"] == full["loss"]
    for name, p in model2.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_train_cli_chains_stages_from_a_config(tmp_path):
    config = {"model": "tiny", "data": "builtin", "out": str(tmp_path / "chain"),
              "stages": [{"stage": 1, "steps": 2, "batch_size": 4, "lr": 1e-3},
                         {"stage": 2, "steps": 2, "batch_size": 4, "lr": 1e-3},
                         {"stage": 3, "steps": 2, "batch_size": 4, "lr": 1e-4}]}
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path)]) == 0
    for stage in (1, 2, 3):
        record = json.loads((tmp_path / "chain" / f"stage{stage}" / "final" / "stage.json").read_text())
        assert record["steps"] == 2 and len(record["loss"]) == 2
    # the last stage's folder is a loadable embedding model
    out = tmp_path / "vectors.pt"
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one small red circle at the top left"}\n{"text": "two blue squares"}\n')
    assert main(["embed", "--model", str(tmp_path / "chain" / "stage3" / "final" / "backbone"),
                 "--data", str(data), "--out", str(out)]) == 0
    vectors = torch.load(out)
    assert vectors.shape == (2, 64)


def test_lora_trains_adapters_only_and_merges_them(tmp_path):
    model, encoder, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = StageConfig(stage=2, steps=2, batch_size=4, lr=1e-2, lora={"r": 4, "alpha": 8})
    run_stage(cfg, model, encoder, data, tmp_path / "lora", resume=False)
    assert not model.lora_active
    after = model.state_dict()
    assert set(after) == set(before)  # plain layers are back
    q = "backbone.model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])  # the adapter's update is folded in
    for frozen in ("backbone.model.language_model.embed_tokens.weight", "backbone.model.visual.blocks.0.attn.qkv.weight",
                   "backbone.model.language_model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(after[frozen], before[frozen]), frozen
    export = tmp_path / "lora" / "final" / "backbone"
    assert (export / "model.safetensors").is_file() and all(p.requires_grad for p in model.parameters())
