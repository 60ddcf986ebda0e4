"""MUDDPythia: the GPT-NeoX/Pythia decoder with multiway dynamic dense connections (Xiao et al., ICML 2025).

Family specifics on top of the shared MUDD decoder: LayerNorm (weight and bias) everywhere, biases in the
attention and FFN projections, a GELU FFN, parallel residual by default, rotary on a fraction of each head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_muddpythia import MUDDPythiaConfig
from .modeling_mudd_decoder import (
    MUDDDecoderForCausalLM,
    MUDDDecoderForQuestionAnswering,
    MUDDDecoderForSequenceClassification,
    MUDDDecoderForTokenClassification,
    MUDDDecoderLayer,
    MUDDDecoderModel,
)


class MUDDPythiaMLP(nn.Module):
    """`down_proj(act(up_proj(x)))`, `[batch, seq, hidden]` -> same; width `intermediate_size` of this layer."""

    def __init__(self, config: MUDDPythiaConfig, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class MUDDPythiaModel(MUDDDecoderModel):
    """The bare MUDDPythia decoder, returning the final-normed hidden states `[batch, seq, hidden]`."""

    config_class = MUDDPythiaConfig
    norm_class = nn.LayerNorm
    mlp_class = MUDDPythiaMLP
    _no_split_modules = ["MUDDDecoderLayer", "MUDDDenseConnections"]
    _auto_map_entries = {
        "AutoConfig": "MUDDPythiaConfig",
        "AutoModel": "MUDDPythiaModel",
        "AutoModelForCausalLM": "MUDDPythiaForCausalLM",
        "AutoModelForSequenceClassification": "MUDDPythiaForSequenceClassification",
        "AutoModelForTokenClassification": "MUDDPythiaForTokenClassification",
        "AutoModelForQuestionAnswering": "MUDDPythiaForQuestionAnswering",
    }


class MUDDPythiaForCausalLM(MUDDDecoderForCausalLM):
    """MUDDPythia with a language-modeling head (untied, no bias)."""

    config_class = MUDDPythiaConfig
    base_model_class = MUDDPythiaModel
    norm_class = nn.LayerNorm
    mlp_class = MUDDPythiaMLP
    _no_split_modules = MUDDPythiaModel._no_split_modules
    _auto_map_entries = MUDDPythiaModel._auto_map_entries


class MUDDPythiaForSequenceClassification(MUDDDecoderForSequenceClassification):
    """MUDDPythia with a sequence-classification head on the last non-padding token (e.g. a reward model)."""

    config_class = MUDDPythiaConfig
    base_model_class = MUDDPythiaModel
    _no_split_modules = MUDDPythiaModel._no_split_modules
    _auto_map_entries = MUDDPythiaModel._auto_map_entries


class MUDDPythiaForTokenClassification(MUDDDecoderForTokenClassification):
    """MUDDPythia with a token-classification head."""

    config_class = MUDDPythiaConfig
    base_model_class = MUDDPythiaModel
    _no_split_modules = MUDDPythiaModel._no_split_modules
    _auto_map_entries = MUDDPythiaModel._auto_map_entries


class MUDDPythiaForQuestionAnswering(MUDDDecoderForQuestionAnswering):
    """MUDDPythia with an extractive question-answering (span start/end) head."""

    config_class = MUDDPythiaConfig
    base_model_class = MUDDPythiaModel
    _no_split_modules = MUDDPythiaModel._no_split_modules
    _auto_map_entries = MUDDPythiaModel._auto_map_entries


MUDDPythiaConfig.register_for_auto_class()
MUDDPythiaModel.register_for_auto_class("AutoModel")
MUDDPythiaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MUDDPythiaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
MUDDPythiaForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
MUDDPythiaForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "MUDDPythiaMLP", "MUDDPythiaModel", "MUDDPythiaForCausalLM", "MUDDDecoderLayer",
    "MUDDPythiaForSequenceClassification", "MUDDPythiaForTokenClassification", "MUDDPythiaForQuestionAnswering",
]
