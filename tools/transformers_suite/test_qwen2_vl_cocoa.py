"""transformers' ModelTesterMixin on a tiny Qwen2-VL (one image per sample). Our tester: the sdist
carries the common mixins, not the per-model test files."""

from __future__ import annotations

import unittest

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

from ..generation.test_utils import GenerationTesterMixin  # an empty stub (run.py)
from ..test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

IMAGE, VIDEO, VISION_START, VISION_END = 95, 96, 97, 98


class Qwen2VLTester:
    def __init__(self, parent, batch_size=3, seq_length=14, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.is_training = True
        self.text_config = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37,
                                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                num_key_value_heads=num_key_value_heads, max_position_embeddings=512,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0,
                                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        self.vision_config = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, mlp_ratio=2,
                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        self.num_image_tokens = 4  # a 4x4 patch grid, merged 2x2

    def get_config(self):
        return Qwen2VLConfig(text_config=self.text_config, vision_config=self.vision_config, image_token_id=IMAGE,
                             video_token_id=VIDEO, vision_start_token_id=VISION_START,
                             vision_end_token_id=VISION_END)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], 90) + 3
        input_ids[:, 0] = VISION_START
        input_ids[:, 1:1 + self.num_image_tokens] = IMAGE
        input_ids[:, 1 + self.num_image_tokens] = VISION_END
        attention_mask = torch.ones_like(input_ids)
        grid = torch.tensor([[1, 4, 4]] * self.batch_size)
        pixel_values = floats_tensor([self.batch_size * 16, 3 * 2 * 14 * 14])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_grid_thw": grid, "mm_token_type_ids": (input_ids == IMAGE).int()}
        return self.get_config(), inputs


class Qwen2VLCocoaTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen2VLModel, Qwen2VLForConditionalGeneration)
    _is_composite = True
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = Qwen2VLTester(self)
