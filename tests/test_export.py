"""Stage exports (``DIR/final/backbone``) mean the same thing everywhere.

Every stage's folder loads with ``Embedder.from_pretrained``; and in a fresh process that never
imports cocoa, plain transformers (``AutoModel``, ``"sdpa"``, fp32) fed the input the README
documents and pooled as ``cocoa_embedding.json`` says gives Embedder's vector (cosine >= 0.9999),
for bare texts, a text with an instruction and image (+ text) inputs. Once on the built-in tiny
model, once on the real-format checkpoint folder (bf16, BPE tokenizer without a mask token), and
once on the text-only Qwen2 folder (texts only; plain positions instead of M-RoPE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from real_checkpoint import real_text_checkpoint, real_vl_checkpoint, write_text_data  # noqa: F401

import cocoa
from cocoa.data import ShapesDataset
from cocoa.data.encoding import InputEncoder
from cocoa.embed import Embedder, default_image_processor
from cocoa.export import EMBEDDING_FILE
from cocoa.model import CocoaModel
from cocoa.tiny import char_tokenizer, tiny_config
from cocoa.train import StageConfig, run_pipeline, train_from_sources

TEXTS = ["one small red circle at the top left", "two blue squares", "x"]
INSTRUCTION = "Find the picture: "
QUERY = "three large green triangles"

# The README's export recipe in plain transformers. Embeds with every folder given and prints one
# JSON object: the vectors per folder, and whether cocoa was imported.
PLAIN_TRANSFORMERS = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    folders, texts, query, instruction, image_path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), *sys.argv[3:6]


    def image_processor(folder):
        try:
            from transformers import AutoImageProcessor
            return AutoImageProcessor.from_pretrained(folder)
        except ImportError:  # the default (torchvision) backend is not installed
            from transformers import Qwen2VLImageProcessorPil
            return Qwen2VLImageProcessorPil.from_pretrained(folder)


    def embed_all(folder):
        spec = json.loads((Path(folder) / "cocoa_embedding.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
        eos = [spec["eos_token_id"]]

        def tokens(text):
            return tokenizer(text, add_special_tokens=False).input_ids[: spec["max_length"]]

        @torch.no_grad()
        def embed(ids, **image):
            ids = torch.tensor([ids])
            if image:  # M-RoPE needs to know which tokens are the image's: 1 there, 0 on text
                image["mm_token_type_ids"] = (ids == spec["image"]["image_token_id"]).int()
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), **image).last_hidden_state
            vector = hidden[0, -1]  # the appended EOS: the input's last token
            return (F.normalize(vector, dim=-1) if spec["normalize"] else vector).tolist()

        out = {"texts": [embed(tokens(t) + eos) for t in texts],
               "query": embed(tokens(instruction) + tokens(query) + eos)}
        if "image" in spec:
            im = spec["image"]
            pixels = image_processor(folder)(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
            n = int(pixels["image_grid_thw"].prod()) // im["spatial_merge_size"] ** 2
            block = [im["vision_start_token_id"]] + [im["image_token_id"]] * n + [im["vision_end_token_id"]]
            image = {"pixel_values": pixels["pixel_values"].float(), "image_grid_thw": pixels["image_grid_thw"]}
            out["image"] = embed(block + eos, **image)
            out["image_text"] = embed(block + tokens(texts[0]) + eos, **image)
        return out


    results = {folder: embed_all(folder) for folder in folders}
    results["cocoa_imported"] = any(name == "cocoa" or name.startswith("cocoa.") for name in sys.modules)
    print(json.dumps(results))
''')


def _plain_transformers(folders: list[Path], image_path: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps([str(f) for f in folders]), json.dumps(TEXTS), QUERY,
         INSTRUCTION, str(image_path)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("cocoa_imported") is False  # the recipe needs transformers only
    return {Path(k): v for k, v in results.items()}


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.png"
    ShapesDataset(1, seed=7)[0].image.save(path)  # an 84 x 84 drawing of coloured shapes
    return path


def _cosines(a, b) -> torch.Tensor:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))


def _check_exports(folders: list[Path], image_path: Path, tmp_path: Path) -> None:
    """Each folder: the files and flags of an export, Embedder loads it, and plain transformers
    (one fresh process for all folders) gives Embedder's vectors (the image ones only for a
    vision-language export)."""
    plain = _plain_transformers(folders, image_path, tmp_path)
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        files = ["model.safetensors", "config.json", "tokenizer.json"]
        files += ["preprocessor_config.json"] if "vision_config" in config else []
        for name in files:
            assert (folder / name).is_file(), f"{folder}: {name} missing from the export"
        assert config.get("text_config", config)["is_causal"] is False, f"{folder}: the export must say is_causal=False"
        spec = json.loads((folder / EMBEDDING_FILE).read_text())
        assert spec["pooling"] == "eos" and spec["normalize"] is True and spec["layer"] == -1

        embedder = Embedder.from_pretrained(folder, dtype=torch.float32)
        assert spec["eos_token_id"] == embedder.encoder.eos_token_id
        expected = {"texts": embedder.encode(TEXTS), "query": embedder.encode(QUERY, instruction=INSTRUCTION)}
        if "image" in spec:
            expected["image"] = embedder.encode(image_path)
            expected["image_text"] = embedder.encode({"image": image_path, "text": TEXTS[0]})
        assert set(plain[folder]) == set(expected)
        for key, vectors in expected.items():
            cos = _cosines(plain[folder][key], vectors)
            assert bool((cos >= 0.9999).all()), f"{folder}, {key}: cosine {cos.tolist()}"


def _embedder_vector_changes_with_causal_attention(folder: Path) -> None:
    """The check above can fail: loaded causally (the flag flipped back), plain transformers
    gives another vector for a multi-token text."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    config.get_text_config().is_causal = True
    model = AutoModel.from_pretrained(folder, config=config, attn_implementation="sdpa", dtype=torch.float32).eval()
    spec = json.loads((folder / EMBEDDING_FILE).read_text())
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[0], add_special_tokens=False).input_ids + [spec["eos_token_id"]]
    with torch.no_grad():
        causal = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    cos = _cosines(causal, Embedder.from_pretrained(folder, dtype=torch.float32).encode(TEXTS[0]))
    assert float(cos) < 0.9999


def test_tiny_stage_exports_reproduce_embedder_in_plain_transformers(tmp_path):
    torch.manual_seed(0)
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    model = CocoaModel(cocoa.load_model(tiny_config()))
    stages = [StageConfig(stage=s, steps=1, batch_size=2, lr=1e-3) for s in (1, 2)]
    stages.append(StageConfig(stage=3, steps=1, batch_size=2, lr=1e-3, instruction=INSTRUCTION))
    data = {1: ShapesDataset(8), 2: ShapesDataset(8), 3: ShapesDataset(8, task="retrieval")}
    run_pipeline(stages, model, encoder, data, tmp_path / "run", resume=False)
    folders = [tmp_path / "run" / f"stage{s}" / "final" / "backbone" for s in (1, 2, 3)]
    _check_exports(folders, _image(tmp_path), tmp_path)
    spec = json.loads((tmp_path / "run" / "stage3" / "final" / "backbone" / EMBEDDING_FILE).read_text())
    assert spec["instruction"] == INSTRUCTION
    _embedder_vector_changes_with_causal_attention(tmp_path / "run" / "stage3" / "final" / "backbone")
    # the export describes the model; the live model trained on keeps its own config
    assert getattr(model.backbone.config.get_text_config(), "is_causal", True) is True


def test_real_format_exports_reproduce_embedder_in_plain_transformers(tmp_path, real_vl_checkpoint):  # noqa: F811
    """The Qwen2-VL folder (bf16, byte-level BPE, no mask token) through all three stages, by
    ``cocoa train``'s path."""
    stages = [StageConfig(stage=s, steps=1, batch_size=2, lr=1e-3) for s in (1, 2, 3)]
    train_from_sources(stages, str(real_vl_checkpoint), "builtin", tmp_path / "vl")
    folders = [tmp_path / "vl" / f"stage{s}" / "final" / "backbone" for s in (1, 2, 3)]
    for folder in folders:  # the run's tokenizer, with the mask token it added, goes with every stage
        assert json.loads((folder / "tokenizer_config.json").read_text()).get("mask_token") == "<|mask|>"
    _check_exports(folders, _image(tmp_path), tmp_path)


def test_text_only_exports_reproduce_embedder_in_plain_transformers(tmp_path, real_text_checkpoint):  # noqa: F811
    """The text-only Qwen2 folder (no vision tower, no image processor) through all three stages
    on text-only data, by ``cocoa train``'s path: the exports hold no image processor and no
    image spec, and plain transformers reproduces Embedder's text vectors."""
    stages = [StageConfig(stage=s, steps=1, batch_size=2, lr=1e-3) for s in (1, 2)]
    stages.append(StageConfig(stage=3, steps=1, batch_size=2, lr=1e-3, instruction=INSTRUCTION))
    data = write_text_data(tmp_path / "data.jsonl")
    train_from_sources(stages, str(real_text_checkpoint), str(data), tmp_path / "text")
    folders = [tmp_path / "text" / f"stage{s}" / "final" / "backbone" for s in (1, 2, 3)]
    for folder in folders:
        assert "vision_config" not in json.loads((folder / "config.json").read_text())
        assert not (folder / "preprocessor_config.json").exists()
        assert "image" not in json.loads((folder / EMBEDDING_FILE).read_text())
    _check_exports(folders, _image(tmp_path), tmp_path)
    _embedder_vector_changes_with_causal_attention(folders[-1])


def test_stage0_export_stays_causal_and_complete(tmp_path):
    """The causal captioner's export: weights, tokenizer and image processor too, but a causal
    config (it generates) and no pooling file (it is not an embedding model)."""
    from cocoa.train import run_stage

    torch.manual_seed(0)
    encoder = InputEncoder(char_tokenizer(), tiny_config(), default_image_processor())
    model = CocoaModel(cocoa.load_model(tiny_config()))
    run_stage(StageConfig(stage=0, steps=1, batch_size=2), model, encoder, ShapesDataset(4), tmp_path / "s0",
              resume=False)
    folder = tmp_path / "s0" / "final" / "backbone"
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["text_config"]["is_causal"] is True
    assert not (folder / EMBEDDING_FILE).exists()
