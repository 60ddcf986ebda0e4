"""MUDD (multiway dynamic dense) models for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .configuration_muddformer import MUDDFormerConfig
from .configuration_muddpythia import MUDDPythiaConfig
from .modeling_muddformer import MUDDFormerForCausalLM, MUDDFormerModel
from .modeling_muddpythia import MUDDPythiaForCausalLM, MUDDPythiaModel
from .configuration_muddvit import MUDDViTConfig
from .modeling_muddvit import MUDDViTForImageClassification, MUDDViTModel
from .muddify import muddify

AutoConfig.register(MUDDPythiaConfig.model_type, MUDDPythiaConfig, exist_ok=True)
AutoModel.register(MUDDPythiaConfig, MUDDPythiaModel, exist_ok=True)
AutoModelForCausalLM.register(MUDDPythiaConfig, MUDDPythiaForCausalLM, exist_ok=True)
AutoConfig.register(MUDDFormerConfig.model_type, MUDDFormerConfig, exist_ok=True)
AutoModel.register(MUDDFormerConfig, MUDDFormerModel, exist_ok=True)
AutoModelForCausalLM.register(MUDDFormerConfig, MUDDFormerForCausalLM, exist_ok=True)
AutoConfig.register(MUDDViTConfig.model_type, MUDDViTConfig, exist_ok=True)
AutoModel.register(MUDDViTConfig, MUDDViTModel, exist_ok=True)
AutoModelForImageClassification.register(MUDDViTConfig, MUDDViTForImageClassification, exist_ok=True)

__all__ = [
    "MUDDPythiaConfig", "MUDDPythiaModel", "MUDDPythiaForCausalLM",
    "MUDDFormerConfig", "MUDDFormerModel", "MUDDFormerForCausalLM",
    "MUDDViTConfig", "MUDDViTModel", "MUDDViTForImageClassification",
    "muddify",
]
