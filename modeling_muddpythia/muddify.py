"""Turn a plain transformers model into the MUDD model computing the same function (spec section 5).

The MUDD model gets the plain model's weights, separate q/k/v projections split from a fused one, copies of the
single pre-attention norm for every stream norm, and identity dense connections (`W2 = 0`, `b` one-hot on the
newest state); its logits then equal the source model's up to float32 rounding, and fine-tuning can start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .convert_plans import apply_plan, gpt_neox_canonical_name, gpt_neox_config, gpt_neox_plan
from .mudd import MUDDDenseConnections
from .modeling_muddpythia import MUDDPythiaForCausalLM


def _build_like(model_class: type[nn.Module], config, source: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build `model_class(config)` on the source's device and dtype, fill it from `state`, identity-init the rest.

    Every key of `state` must be a parameter of the new model and every parameter not in `state` must belong to
    the dense connections, so a mapping mistake cannot pass silently.
    """
    reference = next(source.parameters())
    config.dtype = reference.dtype
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device=reference.device).to(reference.dtype)
    own = dict(model.state_dict())
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"muddify produced keys the MUDD model does not have: {unexpected[:5]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"muddify: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()  # filled by tie_weights()
    missing = sorted(k for k in set(own) - set(state) - tied if ".dense." not in f".{k}")
    if missing:
        raise KeyError(f"muddify left MUDD parameters unfilled: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    # What was not copied: the dense connections (identity init) and non-persistent buffers (rotary frequencies).
    for module in model.modules():
        if isinstance(module, MUDDDenseConnections):
            module.apply(model._init_weights)
        elif any(True for _ in module.buffers(recurse=False)):
            model._init_weights(module)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.train(source.training)
    return model


def _muddify_gpt_neox(model: nn.Module) -> MUDDPythiaForCausalLM:
    # The same key plan as the checkpoint converter (`mudd-convert --format gpt-neox`), applied in memory.
    config = gpt_neox_config(model.config)
    config._attn_implementation = model.config._attn_implementation
    state = apply_plan(gpt_neox_plan(config), {gpt_neox_canonical_name(k): v for k, v in model.state_dict().items()})
    return _build_like(MUDDPythiaForCausalLM, config, model, state)


# Source class name -> converter. Other families register here.
MUDDIFIERS: dict[str, Callable[[nn.Module], nn.Module]] = {"GPTNeoXForCausalLM": _muddify_gpt_neox}


def muddify(model: nn.Module) -> nn.Module:
    """Return the MUDD model equivalent to `model` (same device, dtype and train/eval mode).

    Supported sources: transformers' `GPTNeoXForCausalLM` -> `MUDDPythiaForCausalLM` (qk-norm and FFN
    re-allocation off, fused qkv split, identity dense connections).
    """
    converter = MUDDIFIERS.get(type(model).__name__)
    if converter is None:
        raise TypeError(f"muddify supports {sorted(MUDDIFIERS)}, got {type(model).__name__}")
    return converter(model)
