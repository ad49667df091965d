"""transformers' ModelTesterMixin on a tiny Qwen2 (text only). Our tester: the sdist carries the
common mixins, not the per-model test files. Padding is on the left of some rows, as a tokenizer
pads (no key-interval form exists for padding inside a row)."""

from __future__ import annotations

import unittest

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from ..generation.test_utils import GenerationTesterMixin  # an empty stub (run.py)
from ..test_modeling_common import ModelTesterMixin, ids_tensor


class Qwen2Tester:
    def __init__(self, parent, batch_size=3, seq_length=9, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=37):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.intermediate_size = intermediate_size
        self.is_training = True

    def get_config(self):
        return Qwen2Config(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           attention_dropout=0.0)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :3] = 0  # left padding
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class Qwen2CocoaTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen2Model, Qwen2ForCausalLM)
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = Qwen2Tester(self)
