"""Turn a plain transformers model into the MUDD model computing the same function (spec section 5).

The MUDD model gets the plain model's weights, separate q/k/v projections split from a fused one, copies of the
single pre-attention norm for every stream norm, and identity dense connections (`W2 = 0`, `b` one-hot on the
newest state); its logits then equal the source model's up to float32 rounding, and fine-tuning can start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .configuration_muddvit import MUDDViTConfig
from .convert_plans import apply_plan, gpt_neox_canonical_name, gpt_neox_config, gpt_neox_plan, llama_config, llama_plan
from .mudd import MUDDDenseConnections
from .modeling_muddformer import (
    MUDDFormerForCausalLM,
    MUDDFormerForQuestionAnswering,
    MUDDFormerForSequenceClassification,
    MUDDFormerForTokenClassification,
)
from .modeling_muddpythia import (
    MUDDPythiaForCausalLM,
    MUDDPythiaForQuestionAnswering,
    MUDDPythiaForSequenceClassification,
    MUDDPythiaForTokenClassification,
)
from .modeling_muddvit import MUDDViTForImageClassification


def build_from_plain_state(
    model_class: type[nn.Module],
    config,
    state: dict[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    origin: str = "muddify",
) -> nn.Module:
    """Build `model_class(config)` on `device` in `dtype`, fill it from `state`, identity-init the dense connections.

    Every key of `state` must be a parameter of the new model and every parameter not in `state` must belong to
    the dense connections, so a mapping mistake cannot pass silently; `origin` names the caller in the errors.
    """
    config.dtype = dtype
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device=device).to(dtype)
    own = dict(model.state_dict())
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"{origin} produced keys the MUDD model does not have: {unexpected[:5]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{origin}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
    tied = set(model._tied_weights_keys or {}) if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in set(own) - set(state) - tied if ".dense." not in f".{k}")  # tied: tie_weights()
    if missing:
        raise KeyError(f"{origin} left MUDD parameters unfilled: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    # What was not copied: the dense connections (identity init) and non-persistent buffers (rotary frequencies).
    for module in model.modules():
        if isinstance(module, MUDDDenseConnections):
            module.apply(model._init_weights)
        elif any(True for _ in module.buffers(recurse=False)):
            model._init_weights(module)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _build_like(model_class: type[nn.Module], config, source: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`build_from_plain_state` on the source's device and dtype, in the source's train/eval mode."""
    reference = next(source.parameters())
    model = build_from_plain_state(model_class, config, state, device=reference.device, dtype=reference.dtype)
    model.train(source.training)
    return model


# The MUDD class for each head a plain decoder family comes with, by the source class name after the family name.
_PYTHIA_CLASSES = {
    "ForCausalLM": MUDDPythiaForCausalLM,
    "ForSequenceClassification": MUDDPythiaForSequenceClassification,
    "ForTokenClassification": MUDDPythiaForTokenClassification,
    "ForQuestionAnswering": MUDDPythiaForQuestionAnswering,
}
_FORMER_CLASSES = {
    "ForCausalLM": MUDDFormerForCausalLM,
    "ForSequenceClassification": MUDDFormerForSequenceClassification,
    "ForTokenClassification": MUDDFormerForTokenClassification,
    "ForQuestionAnswering": MUDDFormerForQuestionAnswering,
}
# Task-head parameters named differently: GPT-NeoX's token classifier is `classifier`, ours (as Llama's) `score`.
_HEAD_RENAMES = {"classifier.": "score."}


def _our_head_name(name: str) -> str:
    for source, ours in _HEAD_RENAMES.items():
        if name.startswith(source):
            return ours + name[len(source):]
    return name


def _muddify_decoder(
    model: nn.Module,
    config,
    classes: dict[str, type[nn.Module]],
    plan_for: Callable,
    backbone_prefix: str,
    canonical_name: Callable[[str], str] = lambda name: name,
) -> nn.Module:
    """A plain GPT-NeoX or Llama model, causal LM or task model, as the MUDD model of the same task.

    The backbone (and a causal LM's head) go through the checkpoint converter's key plan, with the source's backbone
    prefix (`gpt_neox`, `model`, or `transformer` in Llama's QA model) read as `backbone_prefix`; a task head is
    copied under our name, with the config's labels, problem type and (token classification) head dropout.
    """
    name = type(model).__name__
    model_class = classes[name[name.index("For"):]]
    causal_lm = name.endswith("ForCausalLM")
    own_prefix = f"{model.base_model_prefix}."
    backbone, head = {}, {}
    for key, tensor in model.state_dict().items():
        if key.startswith(own_prefix):
            backbone[backbone_prefix + key[len(own_prefix):]] = tensor
        elif causal_lm:
            backbone[canonical_name(key)] = tensor
        else:
            head[_our_head_name(key)] = tensor
    state = {**apply_plan(plan_for(config, lm_head=causal_lm), backbone), **head}
    if not causal_lm:
        source_config = model.config
        config.id2label, config.label2id = dict(source_config.id2label), dict(source_config.label2id)
        config.problem_type = source_config.problem_type
        if name.endswith("ForTokenClassification"):
            config.classifier_dropout = model.dropout.p
    return _build_like(model_class, config, model, state)


def _muddify_gpt_neox(model: nn.Module) -> nn.Module:
    # The checkpoint converter's key plan (`mudd-convert --format gpt-neox`), applied in memory.
    return _muddify_decoder(
        model, gpt_neox_config(model.config), _PYTHIA_CLASSES, gpt_neox_plan, "gpt_neox.", gpt_neox_canonical_name
    )


def _muddify_llama(model: nn.Module) -> nn.Module:
    # The checkpoint converter's key plan (`mudd-convert --format llama`), applied in memory.
    return _muddify_decoder(model, llama_config(model.config), _FORMER_CLASSES, llama_plan, "model.")


# ViTConfig fields that mean the same in MUDDViTConfig (which keeps ViT's names).
_VIT_CONFIG_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size", "patch_size", "num_channels",
    "qkv_bias", "problem_type",
)


def _muddify_vit(model: nn.Module) -> MUDDViTForImageClassification:
    source_config = model.config
    config = MUDDViTConfig(
        **{name: getattr(source_config, name) for name in _VIT_CONFIG_FIELDS},
        id2label=dict(source_config.id2label),
        label2id=dict(source_config.label2id),
    )
    config._attn_implementation = source_config._attn_implementation
    source = model.state_dict()
    embeddings = (
        "cls_token", "position_embeddings", "patch_embeddings.projection.weight", "patch_embeddings.projection.bias"
    )
    state = {f"vit.embeddings.{name}": source[f"vit.embeddings.{name}"] for name in embeddings}
    for kind in ("weight", "bias"):
        state[f"vit.layernorm.{kind}"] = source[f"vit.layernorm.{kind}"]
        if config.num_labels > 0:
            state[f"classifier.{kind}"] = source[f"classifier.{kind}"]
        for i in range(config.num_hidden_layers):
            src, dst = f"vit.layers.{i}.", f"vit.encoder.layers.{i}."
            for norm_idx in range(3 if config.uses_separate_stream_norms(i) else 1):
                state[f"{dst}attention_norms.{norm_idx}.{kind}"] = source[f"{src}layernorm_before.{kind}"]
            state[f"{dst}mlp_norm.{kind}"] = source[f"{src}layernorm_after.{kind}"]
            state[f"{dst}mlp.up_proj.{kind}"] = source[f"{src}mlp.fc1.{kind}"]
            state[f"{dst}mlp.down_proj.{kind}"] = source[f"{src}mlp.fc2.{kind}"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if kind == "bias" and name != "o_proj" and not config.qkv_bias:
                    continue
                state[f"{dst}self_attn.{name}.{kind}"] = source[f"{src}attention.{name}.{kind}"]
    return _build_like(MUDDViTForImageClassification, config, model, state)


# Source class name -> converter. Other families register here.
MUDDIFIERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    **{f"GPTNeoX{task}": _muddify_gpt_neox for task in _PYTHIA_CLASSES},
    **{f"Llama{task}": _muddify_llama for task in _FORMER_CLASSES},
    "ViTForImageClassification": _muddify_vit,
}


def muddify(model: nn.Module) -> nn.Module:
    """Return the MUDD model equivalent to `model` (same device, dtype and train/eval mode).

    Supported sources (identity dense connections; the plain model's function is kept):
    transformers' `GPTNeoXForCausalLM` -> `MUDDPythiaForCausalLM` (qk-norm and FFN re-allocation off, fused qkv
    split), `LlamaForCausalLM` -> `MUDDFormerForCausalLM` (grouped-query attention and biases kept), the task
    models of both families (`...ForSequenceClassification`, `...ForTokenClassification`,
    `...ForQuestionAnswering`; head, labels and problem type kept) and `ViTForImageClassification` ->
    `MUDDViTForImageClassification` (labels, image size and attention implementation kept).
    """
    converter = MUDDIFIERS.get(type(model).__name__)
    if converter is None:
        raise TypeError(f"muddify supports {sorted(MUDDIFIERS)}, got {type(model).__name__}")
    return converter(model)
