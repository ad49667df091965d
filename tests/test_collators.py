"""Stage collators on hand-made samples: masks, labels, masking rates, MAE targets, packing."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from real_checkpoint import real_text_checkpoint  # noqa: F401

from cocoa.data import Sample, ShapesDataset
from cocoa.data.collators import Stage1Collator, Stage2Collator, Stage3Collator, word_spans
from cocoa.data.encoding import IGNORE, InputEncoder
from cocoa.embed import default_image_processor
from cocoa.tiny import char_tokenizer, tiny_config

TOK = char_tokenizer()
CFG = tiny_config()
ENC = InputEncoder(TOK, CFG, default_image_processor())
EOS, MASK = TOK.eos_token_id, TOK.mask_token_id


def test_stage2_block_b_sees_only_eos_and_itself():
    samples = [Sample(text="abcdef", target="xyz"), Sample(image=ShapesDataset(1)[0].image, text="a red one")]
    batch = Stage2Collator(ENC, target_mask_unit="token", seed=0)(samples)
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


def test_stage2_token_mode_masks_seventy_percent_of_target_tokens():
    samples = [Sample(text="t" * 10, target="abcdefghij" * 3) for _ in range(8)]
    batch = Stage2Collator(ENC, target_mask_unit="token", seed=1)(samples)
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


# ---------------------------------------------------------------- stage 2: whole-word masking
def _masked_words(text: str, offsets: list[tuple[int, int]], masked: list[bool]) -> tuple[int, int]:
    """(masked words, words) of ``text`` (words: runs of non-space characters), given each
    token's character span; asserts that every word is masked whole or not at all and that no
    whitespace-only token is masked."""
    words = [m.span() for m in re.finditer(r"\S+", text)]
    state = [set() for _ in words]
    for (s, e), m in zip(offsets, masked):
        first = next((i for i in range(s, e) if not text[i].isspace()), None)
        if first is None:
            assert not m, f"whitespace token {text[s:e]!r} masked"
            continue
        w = next(k for k, (ws, we) in enumerate(words) if ws <= first < we)
        state[w].add(m)
    for (ws, we), seen in zip(words, state):
        assert len(seen) == 1, f"word {text[ws:we]!r} partly masked"
    return sum(True in seen for seen in state), len(words)


def _block_b(batch: dict, row: int, eos_id: int = EOS) -> tuple[list[int], list[bool]]:
    """Row ``row``'s block B: the original token ids (labels fill the masked ones) and the mask."""
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    eos = int((ids == eos_id).nonzero()[0])
    n = int(batch["attention_mask"][row].sum())
    masked = (labels[eos + 1:n] != IGNORE).tolist()
    original = torch.where(labels != IGNORE, labels, ids)[eos + 1:n].tolist()
    return original, masked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stage2_masks_whole_words_with_the_char_tokenizer(seed):
    """The char tokenizer: a word is a run of non-space characters, all of its characters are
    masked together, round(0.7 * words) words are masked, and the spaces stay visible."""
    targets = ["the red cube sits on a blue mat now", "  two  small green circles, at the top left ", "x"]
    samples = [Sample(text="abc", target=t) for t in targets]
    batch = Stage2Collator(ENC, seed=seed)(samples)
    for row, text in enumerate(targets):
        original, masked = _block_b(batch, row)
        assert TOK.decode(original) == text
        n_masked, n_words = _masked_words(text, [(j, j + 1) for j in range(len(text))], masked)
        assert n_words == len(text.split()) and n_masked == round(0.7 * n_words)
        assert (batch["input_ids"][row][batch["labels"][row] != IGNORE] == MASK).all()


def test_stage2_masks_whole_words_with_a_byte_level_bpe(real_text_checkpoint):  # noqa: F811
    """A real-format byte-level BPE (Qwen2's pre-tokenizer; ``Ġ`` marks a leading space): every
    sub-token of a chosen word is masked, spaces split off as their own token never are."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_text_checkpoint)
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    enc = InputEncoder(tok, AutoConfig.from_pretrained(real_text_checkpoint))
    text = "The quick brown fox jumps over 3 lazy dogs, photographed twice at the beach!"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = word_spans(tok, enc.text_ids(text))
    assert any(len(w) > 1 for w in spans)  # some words are several sub-tokens
    for seed in range(3):
        batch = Stage2Collator(enc, seed=seed)([Sample(text="A photo", target=text)])
        original, masked = _block_b(batch, 0, enc.eos_token_id)
        assert tok.decode(original) == text and len(original) == len(offsets)
        n_masked, n_words = _masked_words(text, offsets, masked)
        assert n_words == 14 and n_masked == round(0.7 * 14)
        assert (batch["input_ids"][0][batch["labels"][0] != IGNORE] == tok.mask_token_id).all()


def test_word_spans_rule():
    """Words from the char tokenizer (spaces separate, are in no word; a block that starts
    inside a word starts a word) and from SentencePiece-style pieces (``▁`` starts a word)."""
    ids = TOK("ab  c,d e", add_special_tokens=False).input_ids
    assert word_spans(TOK, ids) == [[0, 1], [4, 5, 6], [8]]
    assert word_spans(TOK, ids[1:]) == [[0], [3, 4, 5], [7]]

    class Pieces:  # a vocabulary as SentencePiece spells it
        vocab = ["\u2581The", "\u2581qu", "ick", "\u2581", "12", "\u2581fox", "."]

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

    assert word_spans(Pieces(), range(7)) == [[0], [1, 2], [4], [5, 6]]


def test_stage2_mask_unit_is_checked():
    with pytest.raises(ValueError, match="target_mask_unit"):
        Stage2Collator(ENC, target_mask_unit="char")


def test_stage2_bridge_row_sees_the_whole_sample_with_eos_sees_all():
    """``eos_sees="all"`` (StageConfig.eos_sees, the authors' mask): the EOS row sees block A,
    itself and block B; every other row sees what the default gives it."""
    from cocoa.train import StageConfig, make_collator

    samples = [Sample(text="abcdef", target="xyz"), Sample(text="pq", target="rstu")]
    default = make_collator(StageConfig(stage=2, target_mask_unit="token"), ENC)
    ours = make_collator(StageConfig(stage=2, target_mask_unit="token", eos_sees="all"), ENC)
    torch.manual_seed(0)
    a = default(samples)
    torch.manual_seed(0)
    b = ours(samples)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    dense_a, dense_b = a["key_ranges"].to_dense(), b["key_ranges"].to_dense()
    eos_rows = a["input_ids"] == EOS
    assert eos_rows.sum() == 2
    for r, i in eos_rows.nonzero().tolist():
        sample = dense_b[r, i].nonzero().flatten().tolist()
        assert sample == list(range(sample[0], sample[-1] + 1)) and len(sample) == (10 if r == 0 and i == 6 else 7)
        assert not torch.equal(dense_a[r, i], dense_b[r, i])
    assert torch.equal(dense_a[~eos_rows], dense_b[~eos_rows])
    with pytest.raises(ValueError, match="eos_sees must be one of block_a, all"):
        StageConfig(stage=2, eos_sees="everything")


# ---------------------------------------------------------------- per-stage loss settings
def test_stage_loss_shift_defaults_and_explicit_settings():
    from cocoa.model import CocoaLossConfig
    from cocoa.train import StageConfig

    assert [StageConfig(stage=s).loss.shift for s in (0, 1, 2)] == [1, 1, 0]
    assert StageConfig(stage=2, loss={"temperature": 0.05}).loss == CocoaLossConfig(shift=0, temperature=0.05)
    assert StageConfig(stage=2, loss={"shift": 1}).loss.shift == 1
    assert StageConfig(stage=2, loss=CocoaLossConfig(shift=1)).loss.shift == 1
    assert StageConfig(stage=1, loss={"shift": 0}).loss.shift == 0
    assert StageConfig(stage=2).target_mask_unit == "word"
    with pytest.raises(ValueError, match="target_mask_unit"):
        StageConfig(stage=2, target_mask_unit="chars")


def test_run_stage_trains_with_the_stage_loss_config(tmp_path, monkeypatch):
    """run_stage hands the stage's loss config to the model: stage 2 scores in place (shift=0)
    although the model was built with shift=1, and the config stays the model's after the stage."""
    import cocoa
    import cocoa.model
    from cocoa.model import CocoaLossConfig, CocoaModel
    from cocoa.train import StageConfig, run_stage

    shifts = []
    fused = cocoa.model.linear_cross_entropy

    def spy(*args, shift=0, **kwargs):
        shifts.append(shift)
        return fused(*args, shift=shift, **kwargs)

    monkeypatch.setattr(cocoa.model, "linear_cross_entropy", spy)
    torch.manual_seed(0)
    model = CocoaModel(cocoa.load_model(CFG), CocoaLossConfig(shift=1))
    cfg = StageConfig(stage=2, steps=1, batch_size=2)
    run_stage(cfg, model, ENC, ShapesDataset(2, task="caption"), tmp_path / "s2", resume=False)
    assert shifts and set(shifts) == {0}
    assert model.loss_config is cfg.loss
