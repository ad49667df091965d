"""cocoa.Embedder on the built-in tiny backbone (random weights, CPU)."""

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


def test_shape_and_unit_norm(embedder):
    items = ["a red circle", _image(0), {"image": _image(1), "text": "two blue squares"}, "x"]
    emb = embedder.encode(items, batch_size=3)
    assert emb.shape == (4, 64) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(emb[0], emb[3])


def test_same_input_same_vector_in_any_batch(embedder):
    target = {"image": _image(2), "text": "a green triangle at the top"}
    alone = embedder.encode([target])
    mixed = embedder.encode(["short", _image(3, (112, 56)), target, "a much longer caption " * 3], batch_size=4)
    torch.testing.assert_close(mixed[2], alone[0], rtol=1e-5, atol=1e-6)
    text_alone = embedder.encode("a much longer caption " * 3)
    torch.testing.assert_close(mixed[3], text_alone[0], rtol=1e-5, atol=1e-6)


def test_instruction_changes_the_embedding(embedder):
    plain = embedder.encode(["a red circle"])
    instructed = embedder.encode(["a red circle"], instruction="Find the image: ")
    assert not torch.allclose(plain, instructed)


def test_image_paths_and_progress_bar(embedder, tmp_path, capsys):
    path = tmp_path / "img.png"
    _image(4).save(path)
    from_path = embedder.encode([path, {"image": str(path)}], show_progress=True)
    from_pil = embedder.encode([_image(4)])
    torch.testing.assert_close(from_path[0], from_pil[0])
    torch.testing.assert_close(from_path[1], from_pil[0])
    assert "embedding" in capsys.readouterr().err


def test_bad_inputs(embedder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        embedder.encode([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="unknown keys"):
        embedder.encode([{"caption": "x"}])
    with pytest.raises(ValueError, match="neither image nor text"):
        embedder.encode([{}])
    with pytest.raises(TypeError, match="must be a PIL image or a path"):
        embedder.encode([3])
    with pytest.raises(ValueError, match="tokenizer: required"):
        Embedder.from_pretrained(tiny_config())
