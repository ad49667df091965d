"""A text-only backbone (tests/real_checkpoint.py's Qwen2 folder: bf16, byte-level BPE, no mask
token, no image processor): its batches carry plain (B, N) positions, not Qwen2-VL's three M-RoPE
rows, so the three stages train, ``Embedder`` embeds, and packed rows compute what unpacked ones
do. (The export in plain transformers: tests/test_export.py; images given to a text-only model:
tests/test_real_checkpoint.py's bad-input cases.)"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from real_checkpoint import real_text_checkpoint, write_text_data  # noqa: F401
from transformers import AutoTokenizer

import cocoa
from cocoa.cli import main
from cocoa.data import Sample
from cocoa.data.collators import Stage1Collator, Stage2Collator
from cocoa.data.encoding import InputEncoder, batch_rows, embedding_batch
from cocoa.embed import Embedder
from cocoa.model import CocoaModel, split_group

TEXTS = ["one small red circle at the top left", "two large blue squares", "a photo of a dog", "x"]
STAGE = {"steps": 1, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0, "precision": "bf16",
         "gradient_checkpointing": True, "grad_accum": 2}


def text_encoder(folder) -> InputEncoder:
    model_config = cocoa.load_model(str(folder)).config
    return InputEncoder(AutoTokenizer.from_pretrained(folder), model_config)


@pytest.fixture(scope="module")
def text_pipeline(real_text_checkpoint, tmp_path_factory):  # noqa: F811
    """Stages 1-3 on the text-only folder via ``cocoa train --config`` (bf16 CPU autocast,
    checkpointing, accumulation, packing in stage 1, gradient caching in stage 3), with the
    position ids of every training forward."""
    root = tmp_path_factory.mktemp("text_pipeline")
    data = write_text_data(root / "data.jsonl")  # 8 samples: one step of two micro-batches of 4
    config = {"model": str(real_text_checkpoint), "data": str(data), "out": str(root / "run"),
              "stages": [{"stage": 1, **STAGE, "pack_budget": 48}, {"stage": 2, **STAGE},
                         {"stage": 3, **STAGE, "grad_cache_chunk": 1}]}
    (root / "config.json").write_text(json.dumps(config))
    positions = []
    original = CocoaModel._hidden

    def spy(self, batch):
        if self.training:
            positions.append(batch["position_ids"])
        return original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CocoaModel, "_hidden", spy)
        assert main(["train", "--config", str(root / "config.json")]) == 0
    return {"out": root / "run", "positions": positions}


def test_text_only_batches_carry_plain_positions_restarting_per_segment(real_text_checkpoint):  # noqa: F811
    encoder = text_encoder(real_text_checkpoint)
    assert not encoder.mrope
    samples = [Sample(text=t) for t in TEXTS]
    batch = Stage1Collator(encoder, mask_token_id=0, pack_budget=64, seed=0)(samples)
    B, N = batch["input_ids"].shape
    assert B < len(TEXTS) and batch["position_ids"].shape == (B, N)  # packed, and one position row
    lengths = [len(encoder.text_ids(t)) + 1 for t in TEXTS]  # text + EOS
    expected = [p for n in lengths for p in range(n)]  # first-fit keeps the order here: all fit one row
    assert B == 1 and batch["position_ids"][0, :len(expected)].tolist() == expected
    for collated in (Stage2Collator(encoder, mask_token_id=0, seed=0)(samples),
                     embedding_batch(encoder, [(None, t) for t in TEXTS])):
        assert collated["position_ids"].shape == collated["input_ids"].shape


def test_packed_text_only_rows_equal_unpacked(real_text_checkpoint):  # noqa: F811
    """Three texts in one row (bidirectional per text, positions restarting at 0) give each
    text's hidden states as that text alone in its own row."""
    from cocoa_kernels import KeyRanges

    backbone = cocoa.load_model(str(real_text_checkpoint), dtype=torch.float32).eval()
    encoder = InputEncoder(AutoTokenizer.from_pretrained(real_text_checkpoint), backbone.config)
    encoded = [encoder.encode(text=t) for t in TEXTS[:3]]

    def hidden(rows):
        batch, seg, _ = batch_rows(encoder, encoded, rows)
        with torch.no_grad():
            out = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], key_ranges=KeyRanges.from_segments(seg),
                                 use_cache=False).last_hidden_state
        return out, batch["position_ids"]

    packed, packed_positions = hidden([[0, 1, 2]])
    alone, alone_positions = hidden([[0], [1], [2]])
    at = 0
    for i, enc in enumerate(encoded):
        n = len(enc.ids)
        assert packed_positions[0, at:at + n].tolist() == alone_positions[i, :n].tolist() == list(range(n))
        torch.testing.assert_close(packed[0, at:at + n], alone[i, :n], rtol=1e-5, atol=1e-5)
        at += n


def test_gradient_cache_chunks_split_plain_positions(real_text_checkpoint):  # noqa: F811
    encoder = text_encoder(real_text_checkpoint)
    group = embedding_batch(encoder, [(None, t) for t in TEXTS])
    chunks = list(split_group(group, 3))
    assert [c["position_ids"].shape[0] for c in chunks] == [3, 1]
    torch.testing.assert_close(torch.cat([c["position_ids"] for c in chunks]), group["position_ids"])


def test_three_stages_train_a_text_only_model_in_bf16(text_pipeline):
    positions = text_pipeline["positions"]
    # one step of two micro-batches (of four inputs) per stage; stage 3 embeds query and positive
    # in chunks of one input, twice (gradient caching: a pass without a graph, then one with)
    assert len(positions) == 2 + 2 + 2 * 2 * 4 * 2
    assert all(p.dim() == 2 for p in positions)  # (B, N): no M-RoPE rows for a text-only model
    for stage, parts in ((1, {"text"}), (2, {"text"}), (3, {"contrastive"})):
        record = json.loads((text_pipeline["out"] / f"stage{stage}" / "final" / "stage.json").read_text())
        assert record["steps"] == 1 and torch.isfinite(torch.tensor(record["loss"])).all()
        assert set(record["loss_parts"]) == parts and record["config"]["precision"] == "bf16"


def test_text_only_exports_load_in_embedder(text_pipeline):
    for stage in (1, 2, 3):
        folder = text_pipeline["out"] / f"stage{stage}" / "final" / "backbone"
        assert not (folder / "preprocessor_config.json").exists()
        embedder = Embedder.from_pretrained(folder)
        assert embedder.encoder.image_processor is None
        assert AutoTokenizer.from_pretrained(folder).mask_token == "<|mask|>"
        vectors = embedder.encode(TEXTS, batch_size=3, convert_to_tensor=True)
        assert vectors.shape == (len(TEXTS), 64)
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(TEXTS)))
        # packing does not change a vector (each input its own segment and positions)
        torch.testing.assert_close(embedder.encode(TEXTS[1], convert_to_tensor=True), vectors[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no vision tower"):  # an image for a text-only model: one clear error
        embedder.encode({"image": Image.new("RGB", (56, 56)), "text": TEXTS[0]})
