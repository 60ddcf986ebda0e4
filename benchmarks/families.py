"""The model pairs the benchmark compares: a transformers model and the MUDD model of the same shape.

The MUDD model is made with `muddify(plain)` (same weights, same widths, separate q/k/v projections, identity
dense connections) and its dense connections are then randomised, so that both models do exactly the work of a
trained model of that shape. A family whose MUDD classes are not importable (not merged yet) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

import modeling_muddpythia
from modeling_muddpythia.mudd import DepthAggregator
from modeling_muddpythia.muddify import MUDDIFIERS, muddify


@dataclass(frozen=True)
class Family:
    """One model family: the transformers class, its MUDD counterpart, and the shapes it is benchmarked at.

    `sizes` maps a size name to the transformers config fields of that shape; `kind` is "causal-lm" (inputs are
    token ids, decode is measured) or "image-classification" (inputs are images, no decode).
    """

    name: str
    plain_class: str
    plain_config_class: str
    mudd_class: str
    kind: str
    sizes: dict[str, dict]
    default_sizes: tuple[str, ...]
    common: dict = field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        """Why this family cannot be benchmarked in this checkout, or None."""
        if not hasattr(modeling_muddpythia, self.mudd_class):
            return f"modeling_muddpythia has no {self.mudd_class} (family not merged in this checkout)"
        if self.plain_class not in MUDDIFIERS:
            return f"muddify does not support {self.plain_class} in this checkout"
        return None

    def plain_config(self, size: str, **overrides):
        values = dict(self.common, **self.sizes[size], **overrides)
        return getattr(transformers, self.plain_config_class)(**values)


_DECODER_SHAPES = {  # width, depth, heads of the Pythia suite
    "tiny": (64, 4, 4), "70m": (512, 6, 8), "160m": (768, 12, 12), "410m": (1024, 24, 16), "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
}
_GELU_FFN_WIDTHS = {"tiny": 256, "70m": 2048, "160m": 3072, "410m": 4096, "1.4b": 8192, "2.8b": 10240}
_SWIGLU_FFN_WIDTHS = {"tiny": 192, "70m": 1408, "160m": 2048, "410m": 2816, "1.4b": 5632, "2.8b": 6912}  # ~2/3


def _decoder_sizes(ffn_widths: dict[str, int]) -> dict[str, dict]:
    return {
        name: dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=ffn_widths[name])
        for name, (width, depth, heads) in _DECODER_SHAPES.items()
    }


FAMILIES: dict[str, Family] = {
    "pythia": Family(
        name="pythia",
        plain_class="GPTNeoXForCausalLM",
        plain_config_class="GPTNeoXConfig",
        mudd_class="MUDDPythiaForCausalLM",
        kind="causal-lm",
        sizes=_decoder_sizes(_GELU_FFN_WIDTHS),
        default_sizes=("160m",),
        common=dict(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True),
    ),
    "llama": Family(
        name="llama",
        plain_class="LlamaForCausalLM",
        plain_config_class="LlamaConfig",
        mudd_class="MUDDFormerForCausalLM",
        kind="causal-lm",
        sizes=_decoder_sizes(_SWIGLU_FFN_WIDTHS),
        default_sizes=("160m",),
        common=dict(vocab_size=50432, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False),
    ),
    "vit": Family(
        name="vit",
        plain_class="ViTForImageClassification",
        plain_config_class="ViTConfig",
        mudd_class="MUDDViTForImageClassification",
        kind="image-classification",
        sizes={
            "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, patch_size=8),
            "s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
            "b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
            "l16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        },
        default_sizes=("s16",),
        common=dict(patch_size=16, num_labels=1000),
    ),
}


def randomize_dense_connections_(
    model: nn.Module, seed: int = 0, static_std: float = 0.1, generator_std: float = 0.02
) -> None:
    """Give every dense connection the kind of non-identity weights a trained model has: `static_std` of noise added
    to the static weights, the generator's output layer drawn with `generator_std`.

    Identity weights (`W2 = 0`) compute the same amount, but a trained model's streams really differ, so this keeps
    the benchmark honest about numerics (and about any shortcut that would skip zero weights).
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor: torch.Tensor, std: float) -> torch.Tensor:
        values = torch.randn(tensor.shape, generator=generator) * std
        return values.to(device=tensor.device, dtype=tensor.dtype)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DepthAggregator):
                module.static_weights.add_(noise(module.static_weights, static_std))
                if module.proj_out is not None:
                    module.proj_out.weight.copy_(noise(module.proj_out.weight, generator_std))


def build_pair(
    family: Family, size: str, device: torch.device, dtype: torch.dtype, attn_implementation: str, image_size: int
) -> tuple[nn.Module, nn.Module]:
    """`(plain, mudd)`: the transformers model of `size` (random init) and its muddified twin, both in eval mode."""
    overrides = {"image_size": image_size} if family.kind == "image-classification" else {}
    config = family.plain_config(size, **overrides)
    plain_class: Callable = getattr(transformers, family.plain_class)
    torch.manual_seed(0)
    with torch.device(device):
        plain = plain_class._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    plain.eval()
    mudd = muddify(plain)
    randomize_dense_connections_(mudd)
    return plain, mudd
