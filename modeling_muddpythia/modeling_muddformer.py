"""MUDDFormer: the Llama-style decoder with multiway dynamic dense connections (Xiao et al., ICML 2025).

Family specifics on top of the shared MUDD decoder: RMSNorm everywhere, a SwiGLU FFN, no biases by default,
sequential residual, rotary on every head dim. Grouped-query attention, MaxText's block-0 q/k/v norms and the
`mudd_prenorm` / `mudd_postnorm` training options come from the shared decoder through the config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_muddformer import MUDDFormerConfig
from .modeling_mudd_decoder import (
    MUDDDecoderForCausalLM,
    MUDDDecoderForQuestionAnswering,
    MUDDDecoderForSequenceClassification,
    MUDDDecoderForTokenClassification,
    MUDDDecoderModel,
)
from .mudd import MUDDRMSNorm


class MUDDFormerMLP(nn.Module):
    """SwiGLU `down_proj(act(gate_proj(x)) * up_proj(x))`, `[batch, seq, hidden]` -> same.

    In the authors' checkpoints `gate_proj`, `up_proj`, `down_proj` are `w1`, `w3`, `w2`.
    """

    def __init__(self, config: MUDDFormerConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MUDDFormerModel(MUDDDecoderModel):
    """The bare MUDDFormer decoder, returning the final-normed hidden states `[batch, seq, hidden]`."""

    config_class = MUDDFormerConfig
    norm_class = MUDDRMSNorm
    mlp_class = MUDDFormerMLP
    _no_split_modules = ["MUDDDecoderLayer", "MUDDDenseConnections"]
    _auto_map_entries = {
        "AutoConfig": "MUDDFormerConfig",
        "AutoModel": "MUDDFormerModel",
        "AutoModelForCausalLM": "MUDDFormerForCausalLM",
        "AutoModelForSequenceClassification": "MUDDFormerForSequenceClassification",
        "AutoModelForTokenClassification": "MUDDFormerForTokenClassification",
        "AutoModelForQuestionAnswering": "MUDDFormerForQuestionAnswering",
    }


class MUDDFormerForCausalLM(MUDDDecoderForCausalLM):
    """MUDDFormer with a language-modeling head (untied, no bias)."""

    config_class = MUDDFormerConfig
    base_model_class = MUDDFormerModel
    _no_split_modules = MUDDFormerModel._no_split_modules
    _auto_map_entries = MUDDFormerModel._auto_map_entries


class MUDDFormerForSequenceClassification(MUDDDecoderForSequenceClassification):
    """MUDDFormer with a sequence-classification head on the last non-padding token (e.g. a reward model)."""

    config_class = MUDDFormerConfig
    base_model_class = MUDDFormerModel
    _no_split_modules = MUDDFormerModel._no_split_modules
    _auto_map_entries = MUDDFormerModel._auto_map_entries


class MUDDFormerForTokenClassification(MUDDDecoderForTokenClassification):
    """MUDDFormer with a token-classification head."""

    config_class = MUDDFormerConfig
    base_model_class = MUDDFormerModel
    _no_split_modules = MUDDFormerModel._no_split_modules
    _auto_map_entries = MUDDFormerModel._auto_map_entries


class MUDDFormerForQuestionAnswering(MUDDDecoderForQuestionAnswering):
    """MUDDFormer with an extractive question-answering (span start/end) head."""

    config_class = MUDDFormerConfig
    base_model_class = MUDDFormerModel
    _no_split_modules = MUDDFormerModel._no_split_modules
    _auto_map_entries = MUDDFormerModel._auto_map_entries


MUDDFormerConfig.register_for_auto_class()
MUDDFormerModel.register_for_auto_class("AutoModel")
MUDDFormerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MUDDFormerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
MUDDFormerForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
MUDDFormerForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "MUDDFormerMLP", "MUDDFormerModel", "MUDDFormerForCausalLM",
    "MUDDFormerForSequenceClassification", "MUDDFormerForTokenClassification", "MUDDFormerForQuestionAnswering",
]
