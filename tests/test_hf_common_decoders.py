"""transformers' own common tests on the MUDD decoders: `ModelTesterMixin` and `ConfigTester` from the sdist of the
installed transformers (see `transformers_common.py`), our `GenerationBehaviours` in place of the sdist's missing
`GenerationTesterMixin`. The testers are modelled on transformers' GPT-NeoX and Llama testers: tiny configs, random
ids with a random attention mask, labels for the causal-LM head.

Every skip names its reason.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from transformers_common import MappingNamesForTheClass, common_module


modeling_common = common_module("test_modeling_common")
configuration_common = common_module("test_configuration_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
GenerationTesterMixin = modeling_common.GenerationTesterMixin  # our GenerationBehaviours
ConfigTester = configuration_common.ConfigTester
ids_tensor, random_attention_mask = modeling_common.ids_tensor, modeling_common.random_attention_mask

from modeling_muddpythia import (  # noqa: E402
    MUDDFormerConfig, MUDDFormerForCausalLM, MUDDFormerForQuestionAnswering, MUDDFormerForSequenceClassification,
    MUDDFormerForTokenClassification, MUDDFormerModel, MUDDPythiaConfig, MUDDPythiaForCausalLM,
    MUDDPythiaForQuestionAnswering, MUDDPythiaForSequenceClassification, MUDDPythiaForTokenClassification,
    MUDDPythiaModel,
)


class MUDDDecoderModelTester:
    """Tiny decoder configs and inputs for the common tests (the shape of transformers' causal-LM testers)."""

    config_class = None

    def __init__(self, parent, batch_size=3, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.use_input_mask = True
        self.use_labels = True
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class MUDDPythiaModelTester(MUDDDecoderModelTester):
    config_class = MUDDPythiaConfig

    def get_config(self):
        config = super().get_config()
        config.rope_parameters["partial_rotary_factor"] = 0.5  # partial rotary as in Pythia (0.25 of 8 is too few)
        return config


class MUDDFormerModelTester(MUDDDecoderModelTester):
    config_class = MUDDFormerConfig


class MUDDDecoderCommonTests(MappingNamesForTheClass, ModelTesterMixin, GenerationTesterMixin):
    """What transformers runs for its in-library causal LMs; subclasses set the tester and classes."""

    model_tester_class = None
    config_class = None
    # The mixin skips this for files without a 2023+ copyright line (its proxy for "model added before 2023"); ours
    # have none, and every weight must be initialised by `_init_weights`, so it runs.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=self.config_class, hidden_size=64, num_attention_heads=8)

    def test_config(self):
        self.config_tester.run_common_tests()


class MUDDPythiaCommonTest(MUDDDecoderCommonTests, unittest.TestCase):
    model_tester_class = MUDDPythiaModelTester
    config_class = MUDDPythiaConfig
    all_model_classes = (
        MUDDPythiaModel, MUDDPythiaForCausalLM, MUDDPythiaForSequenceClassification, MUDDPythiaForTokenClassification,
        MUDDPythiaForQuestionAnswering,
    )

    def plain_model(self, seed: int):
        torch.manual_seed(seed)
        tester = self.model_tester
        config = GPTNeoXConfig(
            vocab_size=tester.vocab_size, hidden_size=tester.hidden_size, num_hidden_layers=tester.num_hidden_layers,
            num_attention_heads=tester.num_attention_heads, intermediate_size=64, rotary_pct=0.5,
            max_position_embeddings=tester.max_position_embeddings, pad_token_id=0, attn_implementation="eager",
        )
        return GPTNeoXForCausalLM(config).eval()


class MUDDFormerCommonTest(MUDDDecoderCommonTests, unittest.TestCase):
    model_tester_class = MUDDFormerModelTester
    config_class = MUDDFormerConfig
    all_model_classes = (
        MUDDFormerModel, MUDDFormerForCausalLM, MUDDFormerForSequenceClassification, MUDDFormerForTokenClassification,
        MUDDFormerForQuestionAnswering,
    )

    def plain_model(self, seed: int):
        torch.manual_seed(seed)
        tester = self.model_tester
        config = LlamaConfig(
            vocab_size=tester.vocab_size, hidden_size=tester.hidden_size, num_hidden_layers=tester.num_hidden_layers,
            num_attention_heads=tester.num_attention_heads, num_key_value_heads=tester.num_key_value_heads,
            intermediate_size=64, max_position_embeddings=tester.max_position_embeddings, pad_token_id=0,
            attn_implementation="eager",
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # non-trivial norm scales, so that a mis-mapped norm shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.2 * torch.randn_like(param))
        return model
