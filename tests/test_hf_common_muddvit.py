"""transformers' own common tests on MUDDViT: `ModelTesterMixin` and `ConfigTester` from the sdist of the installed
transformers (see `transformers_common.py`), with a tester modelled on transformers' ViT tester (tiny image, class
token + patches as the sequence, labels for the classification head), plus the "image-classification" pipeline
against the model's own logits.
"""

from __future__ import annotations

import unittest

import pytest
import torch

from transformers_common import MappingNamesForTheClass, common_module


modeling_common = common_module("test_modeling_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = common_module("test_configuration_common").ConfigTester
floats_tensor = modeling_common.floats_tensor

from modeling_muddpythia import MUDDViTConfig, MUDDViTForImageClassification, MUDDViTModel  # noqa: E402


class MUDDViTModelTester:
    def __init__(self, parent, batch_size=3, image_size=30, patch_size=2, num_channels=3, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, type_sequence_label_size=10):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = True
        self.use_labels = True
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.type_sequence_label_size = type_sequence_label_size
        self.seq_length = (image_size // patch_size) ** 2 + 1  # patches and the class token

    def get_config(self):
        return MUDDViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            num_labels=self.type_sequence_label_size,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class MUDDViTCommonTest(MappingNamesForTheClass, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MUDDViTModel, MUDDViTForImageClassification)
    # the mixin skips this for files without a 2023+ copyright line; every weight must be initialised, so it runs
    test_can_init_all_missing_weights_before_2023 = True
    test_resize_embeddings = False  # as transformers' ViT tester: the input "embedding" is a patch convolution

    def setUp(self):
        self.model_tester = MUDDViTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MUDDViTConfig, has_text_modality=False, hidden_size=37,
                                          num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # as transformers' ViT tester: the input "embedding" is the patch projection, and there is no output embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    def test_set_attn_implementation_switches_the_computation(self):
        """`set_attn_implementation` (issue 11, defect 4; the mixin's `test_can_set_attention_dynamically` checks the
        switch itself): every attention module sees the new value, and eager and sdpa agree."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = MUDDViTForImageClassification(config).eval()
        outputs = {}
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            self.assertEqual(model.config._attn_implementation, implementation)
            self.assertEqual(model.vit.encoder.layers[0].self_attn.config._attn_implementation, implementation)
            with torch.no_grad():
                outputs[implementation] = model(**inputs).logits
        torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-5, atol=1e-5)

    def test_image_classification_pipeline_matches_model(self):
        from transformers import pipeline
        from PIL import Image

        from modeling_muddpythia.modeling_muddvit import build_image_processor

        config = self.model_tester.get_config()
        config.id2label = {i: f"class {i}" for i in range(config.num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        torch.manual_seed(0)
        model = MUDDViTForImageClassification(config).eval()
        with torch.no_grad():  # a head with clearly separated scores
            model.classifier.weight.normal_(0, 1.0)
        processor = build_image_processor(config)
        image = Image.fromarray(
            (torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
        )
        classify = pipeline("image-classification", model=model, image_processor=processor)
        got = classify(image, top_k=3)
        with torch.no_grad():
            probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
        top = probs.topk(3)
        self.assertEqual([item["label"] for item in got], [config.id2label[i] for i in top.indices.tolist()])
        for item, score in zip(got, top.values.tolist()):
            self.assertAlmostEqual(item["score"], score, places=5)
