"""The demo's objects data, its word tokenizer and the stage-0 (causal captioning) collator."""

import json
import math

import pytest
import torch

from cocoa.data import ObjectsDataset
from cocoa.data.collators import Stage0Collator, Stage2Collator, word_spans
from cocoa.data.encoding import IGNORE, InputEncoder
from cocoa.data.objects import COLORS, HELD_OUT, WORDS, masked_target_bits, phrase, split_of
from cocoa.embed import default_image_processor
from cocoa.tiny import word_config, word_tokenizer
from cocoa.train import StageConfig, make_collator


@pytest.fixture(scope="module")
def encoder():
    tok = word_tokenizer(WORDS)
    return InputEncoder(tok, word_config(tok), default_image_processor())


def test_word_tokenizer_one_token_per_word():
    tok = word_tokenizer(WORDS)
    caption = "large red circle top left small cyan triangle bottom right"
    ids = tok(caption, add_special_tokens=False).input_ids
    assert len(ids) == 10 and tok.unk_token_id not in ids
    assert tok.decode(ids) == caption
    assert word_spans(tok, ids) == [[j] for j in range(10)]  # stage 2 masks whole words = single tokens
    assert tok("purple", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids("\u2581purple")]
    assert tok("zebra", add_special_tokens=False).input_ids == [tok.unk_token_id]
    assert tok.mask_token_id is not None and tok.eos_token_id is not None
    assert word_config(tok).text_config.vocab_size >= len(tok)
    with pytest.raises(ValueError, match="words"):
        word_tokenizer(["two words"])


def test_samples_are_deterministic_and_well_formed():
    data = ObjectsDataset(50, seed=3)
    again = ObjectsDataset(50, seed=3)
    for i in range(50):
        objs = data.objects_of(i)
        assert objs == again.objects_of(i)
        assert len({o[3] for o in objs}) == 2  # distinct cells
        assert data[i].text == " ".join(phrase(o) for o in objs)
        assert len(data[i].text.split()) == 10
    other = ObjectsDataset(50, seed=4)
    assert [other.objects_of(i) for i in range(50)] != [data.objects_of(i) for i in range(50)]  # seeds differ


def test_image_draws_each_object_in_its_cell():
    data = ObjectsDataset(20, seed=0)
    for i in range(20):
        image = data[i].image
        cell = image.size[0] // 3
        for size, color, shape, c in data.objects_of(i):
            x0, y0 = (c % 3) * cell, (c // 3) * cell
            pixels = [image.getpixel((x, y)) for x in range(x0, x0 + cell) for y in range(y0, y0 + cell)]
            share = sum(p == COLORS[color] for p in pixels) / len(pixels)
            assert share > (0.2 if size == "large" else 0.05), (i, size, color, shape, c, share)


def test_splits_never_share_content_and_eval_is_unique():
    train = ObjectsDataset(2000, "train", seed=0)
    val = ObjectsDataset(200, "val", seed=0)
    evaluation = ObjectsDataset(200, "eval", seed=0)
    train_sets = {frozenset(train.objects_of(i)) for i in range(len(train))}
    eval_sets = [frozenset(evaluation.objects_of(i)) for i in range(len(evaluation))]
    val_sets = {frozenset(val.objects_of(i)) for i in range(len(val))}
    assert len(set(eval_sets)) == len(eval_sets)  # unique items
    assert len({evaluation[i].text for i in range(len(evaluation))}) == len(evaluation)  # unique captions
    assert not train_sets & set(eval_sets) and not train_sets & val_sets and not val_sets & set(eval_sets)
    assert all(split_of(s) == "eval" for s in eval_sets) and all(split_of(s) == "train" for s in train_sets)
    # combinations never seen in training, present in eval
    assert not any((o[1], o[2]) in HELD_OUT for s in train_sets for o in s)
    novel = sum(any((o[1], o[2]) in HELD_OUT for o in s) for s in eval_sets)
    assert 0.15 * len(eval_sets) < novel < 0.6 * len(eval_sets)


def test_tasks_share_items():
    data = ObjectsDataset(10, seed=1)
    bridge, retrieval = data.with_task("bridge"), data.with_task("retrieval")
    for i in range(10):
        words = data[i].text.split()
        assert bridge[i].text.split() == words[:5] and bridge[i].target.split() == words[5:]
        assert retrieval[i].positive.text == data[i].text and retrieval[i].text is None
        assert bridge[i].image is data[i].image or bridge[i].image.tobytes() == data[i].image.tobytes()
    # image_only: some bridge samples put the image alone in block A and the whole caption in B
    mixed = ObjectsDataset(40, seed=1, task="bridge", image_only=0.5)
    captions = ObjectsDataset(40, seed=1)
    alone = [i for i in range(40) if mixed[i].text is None]
    assert 8 <= len(alone) <= 32
    for i in range(40):
        joined = mixed[i].target if i in alone else f"{mixed[i].text} {mixed[i].target}"
        assert joined == captions[i].text
    with pytest.raises(ValueError, match="image_only"):
        ObjectsDataset(10, image_only=1.5)
    with pytest.raises(ValueError, match="task"):
        ObjectsDataset(10, task="nope")
    with pytest.raises(ValueError, match="split"):
        ObjectsDataset(10, split="test")
    with pytest.raises(IndexError):
        data[10]


def test_masked_block_b_keeps_at_least_5_bits_without_the_image():
    """By enumeration of every train object pair, caption order and mask choice: what block A's
    words and block B's visible words leave open about B's masked words."""
    bits = masked_target_bits(mask_rate=0.7)
    assert bits["masked_words"] == 4  # 70% of a 5-word phrase
    assert bits["mean"] >= 5.0, bits
    assert bits["min"] >= 4.0, bits
    # the enumeration is not vacuous: masking fewer words leaves less unknown
    assert masked_target_bits(mask_rate=0.2)["mean"] < bits["mean"]


def test_stage0_collator_is_causal_captioning(encoder):
    data = ObjectsDataset(4, seed=0)
    batch = Stage0Collator(encoder)([data[i] for i in range(4)])
    kr = batch["key_ranges"]
    assert kr.causal
    tok = encoder.tokenizer
    for row in range(4):
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row]
        caption = tok(data[row].text, add_special_tokens=False).input_ids
        eos = ids.index(tok.eos_token_id)
        # labels: exactly the caption tokens, at their own positions; nothing on image, EOS or padding
        assert labels[eos - len(caption):eos].tolist() == caption
        assert (labels[:eos - len(caption)] == IGNORE).all() and (labels[eos:] == IGNORE).all()
        assert ids[eos - len(caption) - 1] == encoder.config.vision_end_token_id
    dense = kr.to_dense()
    assert not dense[0, 3, 4] and dense[0, 4, 3]  # a token never sees the next one


def test_stage0_config_and_collator(encoder):
    cfg = StageConfig(stage=0)
    assert cfg.loss.shift == 1
    assert isinstance(make_collator(cfg, encoder), Stage0Collator)
    with pytest.raises(ValueError, match="stage"):
        StageConfig(stage=4)


def test_bridge_samples_put_the_other_object_in_block_b(encoder):
    data = ObjectsDataset(8, seed=0, task="bridge")
    batch = Stage2Collator(encoder, target_mask_rate=0.7, seed=0)([data[i] for i in range(8)])
    tok = encoder.tokenizer
    for row in range(8):
        ids = batch["input_ids"][row].tolist()
        eos = ids.index(tok.eos_token_id)
        block_b = [t for t in ids[eos + 1:] if t != tok.pad_token_id]
        assert len(block_b) == 5 and block_b.count(tok.mask_token_id) == 4
        masked = batch["labels"][row][eos + 1:eos + 6]
        target = tok(data[row].target, add_special_tokens=False).input_ids
        assert all(m == IGNORE or m == t for m, t in zip(masked.tolist(), target))
        assert tok.decode(ids[eos - 5:eos]) == data[row].text  # block A: the image and the first phrase
    # block B sees block A's EOS and itself only
    kr = batch["key_ranges"]
    ids = batch["input_ids"][0].tolist()
    eos = ids.index(tok.eos_token_id)
    assert kr.lo[0, eos + 1] == eos and int(kr.hi[0, 0]) == eos + 1
    assert torch.equal(batch["input_ids"], Stage2Collator(encoder, seed=0)([data[i] for i in range(8)])["input_ids"])


def test_cocoa_train_stage0_runs_causal_captioning(tmp_path):
    from cocoa.cli import main

    out = tmp_path / "s0"
    assert main(["train", "--stage", "0", "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--out", str(out)]) == 0
    record = json.loads((out / "stage0" / "final" / "stage.json").read_text())
    assert record["steps"] == 2 and record["config"]["stage"] == 0 and record["config"]["loss"]["shift"] == 1
    assert len(record["loss"]) == 2 and all(math.isfinite(v) for v in record["loss"])
