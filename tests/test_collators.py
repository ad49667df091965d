"""Stage collators on hand-made samples: masks, labels, masking rates, MAE targets, packing."""

from __future__ import annotations

import torch
from PIL import Image

from cocoa.data import Sample, ShapesDataset
from cocoa.data.collators import Stage1Collator, Stage2Collator, Stage3Collator
from cocoa.data.encoding import IGNORE, InputEncoder
from cocoa.embed import default_image_processor
from cocoa.tiny import char_tokenizer, tiny_config

TOK = char_tokenizer()
CFG = tiny_config()
ENC = InputEncoder(TOK, CFG, default_image_processor())
EOS, MASK = TOK.eos_token_id, TOK.mask_token_id


def test_stage2_block_b_sees_only_eos_and_itself():
    samples = [Sample(text="abcdef", target="xyz"), Sample(image=ShapesDataset(1)[0].image, text="a red one")]
    batch = Stage2Collator(ENC, seed=0)(samples)
    dense = batch["key_ranges"].to_dense()
    ids = batch["input_ids"]
    # row 0: A = "abcdef" + EOS (7 tokens), B = 3 tokens
    assert ids[0, 6] == EOS
    for i in range(7, 10):
        assert dense[0, i].nonzero().flatten().tolist() == [6, 7, 8, 9]
    for i in range(7):
        assert dense[0, i].nonzero().flatten().tolist() == list(range(7))
    labels = batch["labels"]
    assert (labels[0, :7] == IGNORE).all()
    masked = labels[0] != IGNORE
    assert (ids[0][masked] == MASK).all()
    assert TOK.decode(labels[0][masked]) in ("xy", "xz", "yz")  # 70% of 3 -> 2 masked
    # row 1: image sample -> block A is the image + EOS, the whole caption is block B
    eos1 = (ids[1] == EOS).nonzero().flatten()[0]
    assert (ids[1, :eos1] != MASK).all() and (labels[1, : eos1 + 1] == IGNORE).all()


def test_stage2_masks_about_seventy_percent_of_targets():
    samples = [Sample(text="t" * 10, target="abcdefghij" * 3) for _ in range(8)]
    batch = Stage2Collator(ENC, seed=1)(samples)
    assert int((batch["labels"] != IGNORE).sum()) == 8 * 21  # round(0.7 * 30)


def test_stage1_text_masking_rate_and_mae_targets():
    image = ShapesDataset(1)[0].image
    samples = [Sample(image=image, text="abcdefghij"), Sample(text="0123456789012345678901")]
    batch = Stage1Collator(ENC, seed=0)(samples)
    labels, ids = batch["labels"], batch["input_ids"]
    # text candidates: 10 (row 0), 21 of 22 (row 1: the first token is never masked with shift=1)
    assert int((labels[0] != IGNORE).sum()) == 4 and int((labels[1] != IGNORE).sum()) == 8
    assert (ids[labels != IGNORE] == MASK).all()
    assert labels[1, 0] == IGNORE
    # image: 9 merged tokens (84 px -> 6x6 patches), round(0.5 * 9) = 4 masked, targets = originals
    original, grid = ENC.image(image)
    assert int(batch["pixel_mask"].sum()) == 4 and batch["pixel_targets"].shape == (4, 4 * original.shape[1])
    groups = original.view(9, -1)
    masked_tokens = batch["pixel_mask"][0][ids[0] == CFG.image_token_id]
    torch.testing.assert_close(batch["pixel_targets"], groups[masked_tokens])
    seen = batch["pixel_values"].view(9, -1)
    assert (seen[masked_tokens] == 0).all() and torch.equal(seen[~masked_tokens], groups[~masked_tokens])
    # bidirectional inside each input, nothing across
    dense = batch["key_ranges"].to_dense()
    n0 = int(batch["attention_mask"][0].sum())
    assert dense[0, 0, :n0].all() and not dense[0, 0, n0:].any()


def test_packing_keeps_inputs_apart_and_restarts_positions():
    samples = [Sample(text="abc"), Sample(text="defgh"), Sample(text="ij")]
    batch = Stage1Collator(ENC, pack_budget=16, seed=0)(samples)
    assert batch["input_ids"].shape == (1, 4 + 6 + 3)
    dense = batch["key_ranges"].to_dense()[0]
    assert dense[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert dense[5].nonzero().flatten().tolist() == list(range(4, 10))
    assert batch["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]


def test_positions_match_qwen2vl_rope_index():
    import cocoa

    model = cocoa.load_model(CFG)
    enc = ENC.encode(Image.new("RGB", (84, 56)), "ab")
    ids = torch.tensor([enc.ids])
    mm = (ids == CFG.image_token_id).int()
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=enc.grid[None])
    torch.testing.assert_close(ENC.positions(enc), ref[:, 0])


def test_stage3_groups_with_eos_index():
    samples = [Sample(text="q1", positive=Sample(text="p1"), negatives=[Sample(text="n1")]),
               Sample(image=ShapesDataset(1)[0].image, positive=Sample(text="p22"))]
    out = Stage3Collator(ENC, instruction="Find: ")(samples)
    q, p, n = out["query"], out["positive"], out["negative"]
    assert q["input_ids"][0, q["eos_index"][0]] == EOS and q["input_ids"][1, q["eos_index"][1]] == EOS
    assert p["eos_index"].tolist() == [2, 3] and n["input_ids"].shape[0] == 1
    assert TOK.decode(q["input_ids"][0, :6]) == "Find: "
