"""cocoa.Embedder on the built-in tiny backbone (random weights, CPU): sentence-transformers-style
``encode``, packed inference equal to one-at-a-time embedding, caller order, instructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cocoa import Embedder
from cocoa.tiny import char_tokenizer, tiny_config


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return Embedder.from_pretrained(tiny_config(), tokenizer=char_tokenizer())


def _image(seed, size=(56, 84)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


# Very different lengths: 2-character texts to ~200-token ones, small and larger images, pairs.
MIX = [
    "ab",
    "a much longer caption about shapes and colours " * 4,
    ("image", 0, (56, 84)),
    ("pair", 1, (112, 112), "two blue squares"),
    "x",
    ("image", 2, (168, 56)),
    "a red circle",
    ("pair", 3, (56, 56), "a green triangle at the top " * 3),
    "short",
]


def _items():
    out = []
    for m in MIX:
        if isinstance(m, str):
            out.append(m)
        elif m[0] == "image":
            out.append(_image(m[1], m[2]))
        else:
            out.append({"image": _image(m[1], m[2]), "text": m[3]})
    return out


def test_numpy_float32_unit_rows(embedder):
    emb = embedder.encode(_items()[:4], batch_size=3)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), np.ones(4), rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_output_kinds(embedder):
    one = embedder.encode("a red circle")
    assert one.shape == (64,)  # a single item gives one vector, as sentence-transformers does
    t = embedder.encode(["a red circle", "x"], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 64) and t.dtype == torch.float32
    listed = embedder.encode(["a red circle", "x"], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (64,)
    np.testing.assert_allclose(listed[0].numpy(), one, rtol=0, atol=1e-6)
    raw = embedder.encode(["a red circle", "x"], normalize_embeddings=False, convert_to_tensor=True)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), t, rtol=0, atol=1e-6)
    assert embedder.encode([]).shape == (0, 64)


@pytest.mark.parametrize("pack_tokens,batch_size", [(4096, 32), (64, 4), (1, 3)],
                         ids=["one-row", "several-rows", "one-input-per-row"])
def test_packed_equals_one_at_a_time(embedder, pack_tokens, batch_size):
    items = _items()
    alone = np.stack([embedder.encode(item) for item in items])
    embedder.pack_tokens = pack_tokens
    try:
        packed = embedder.encode(items, batch_size=batch_size)
    finally:
        embedder.pack_tokens = 4096
    cosine = (packed * alone).sum(-1)
    assert cosine.min() >= 0.9999, cosine  # caller order kept, each input computed as if alone


def test_rows_are_packed(embedder):
    """Short inputs share rows: no padding row per input (the forward sees few, full rows)."""
    shapes = []
    hook = embedder.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        embedder.encode(["ab", "abc", "a red circle", "x" * 30, "y" * 7, "z"], batch_size=32)
        embedder.pack_tokens = 20
        embedder.encode(["ab", "abc", "a red circle", "x" * 30, "y" * 7, "z"], batch_size=32)
    finally:
        embedder.pack_tokens = 4096
        hook.remove()
    lengths = sorted(len(t) + 1 for t in ["ab", "abc", "a red circle", "x" * 30, "y" * 7, "z"])  # + EOS
    assert shapes[0] == (1, sum(lengths))  # everything in one row, no padding
    # pack_tokens=20 < the longest input (31 tokens): rows take the longest's length, first fit,
    # longest first: [31] | [13, 8, 4, 3, 2]
    assert shapes[1] == (2, max(lengths))


def test_instructions(embedder):
    plain = embedder.encode(["a red circle"])
    instructed = embedder.encode(["a red circle"], instruction="Find the image: ")
    assert not np.allclose(plain, instructed)
    per_item = embedder.encode([{"text": "a red circle", "instruction": "Find the image: "}, "a red circle"],
                               instruction="Other: ")
    np.testing.assert_allclose(per_item[0], instructed[0], rtol=0, atol=1e-6)  # its own wins
    np.testing.assert_allclose(per_item[1], embedder.encode("a red circle", instruction="Other: "),
                               rtol=0, atol=1e-6)


def test_image_paths_and_progress_bar(embedder, tmp_path, capsys):
    path = tmp_path / "img.png"
    _image(4).save(path)
    from_path = embedder.encode([path, {"image": str(path)}], show_progress_bar=True)
    from_pil = embedder.encode([_image(4)])
    np.testing.assert_allclose(from_path[0], from_pil[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_path[1], from_pil[0], rtol=0, atol=1e-6)
    assert "embedding" in capsys.readouterr().err
    embedder.encode(["quiet"])  # show_progress_bar=None: only when logging at INFO
    assert "embedding" not in capsys.readouterr().err


def test_a_bare_string_is_text(embedder, tmp_path):
    path = tmp_path / "img.png"
    _image(5).save(path)
    as_text = embedder.encode(str(path))
    as_image = embedder.encode(path)
    assert not np.allclose(as_text, as_image)


def test_bad_inputs(embedder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        embedder.encode([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="unknown keys"):
        embedder.encode([{"caption": "x"}])
    with pytest.raises(ValueError, match="neither image nor text"):
        embedder.encode([{}])
    with pytest.raises(TypeError, match="must be a PIL image or a path"):
        embedder.encode([3])
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="tokenizer: required"):
        Embedder.from_pretrained(tiny_config())
