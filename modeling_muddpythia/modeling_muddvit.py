"""MUDDViT: the Vision Transformer with multiway dynamic dense connections (Xiao et al., ICML 2025, Tables 6-7).

A plain ViT encoder (patch embedding, class token, learned position embeddings, pre-LayerNorm blocks with
bidirectional attention and a GELU MLP, final LayerNorm, linear head on the class token) whose residual connections
are replaced by the dense connections of `mudd.py`: after each block a small MLP mixes all earlier states into the
query, key, value and residual inputs of the next block. Blocks are the shared MUDD block of the decoders
(`MUDDDecoderLayer`: per-stream pre-attention LayerNorms, sequential residual) with a bidirectional attention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import logging

from .configuration_muddvit import MUDDViTConfig
from .modeling_mudd_decoder import MUDDAutoMapMixin, MUDDDecoderLayer, MUDDStreamAttention, run_mudd_blocks
from .mudd import MUDDDenseConnections, init_dense_connection_


logger = logging.get_logger(__name__)


@dataclass
class MUDDViTModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` (`pooler_output` = the final-normed class token `[batch, hidden]`) plus
    `dense_weights`: one `[batch, seq, C_i, i + 2]` tensor per block when `output_dense_weights=True`."""

    dense_weights: tuple[torch.Tensor, ...] | None = None


@dataclass
class MUDDViTImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus `dense_weights` (see `MUDDViTModelOutput`)."""

    dense_weights: tuple[torch.Tensor, ...] | None = None


class MUDDViTPatchEmbeddings(nn.Module):
    """`pixel_values` `[batch, channels, height, width]` -> patch embeddings `[batch, patches, hidden]` (row-major)."""

    def __init__(self, config: MUDDViTConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size_pair
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class MUDDViTEmbeddings(nn.Module):
    """Class token + patch embeddings + learned position embeddings (`[1, 1 + patches, hidden]`), then dropout."""

    def __init__(self, config: MUDDViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = MUDDViTPatchEmbeddings(config)
        self.image_size = config.image_size_pair
        self.patch_grid = config.patch_grid
        num_positions = 1 + self.patch_grid[0] * self.patch_grid[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings `[1, 1 + rows * cols, hidden]` for a `grid = (rows, cols)` of patches: the trained ones
        at the trained grid, else the patch part resampled bicubically (the class token's stays as it is)."""
        if tuple(grid) == self.patch_grid:
            return self.position_embeddings
        class_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        hidden_size = patch_positions.shape[-1]
        patch_positions = patch_positions.reshape(1, *self.patch_grid, hidden_size).permute(0, 3, 1, 2)
        # In float32: bicubic resampling is not implemented for every half-precision dtype and device.
        resampled = nn.functional.interpolate(
            patch_positions.float(), size=tuple(grid), mode="bicubic", align_corners=False
        ).to(patch_positions.dtype)
        resampled = resampled.permute(0, 2, 3, 1).reshape(1, -1, hidden_size)
        return torch.cat((class_position, resampled), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`[batch, channels, height, width]` -> `X_0` `[batch, 1 + patches, hidden]`."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"`pixel_values` must be [batch, channels, height, width], got {tuple(pixel_values.shape)}"
            )
        batch_size, num_channels, height, width = pixel_values.shape
        if num_channels != self.patch_embeddings.num_channels:
            raise ValueError(
                f"`pixel_values` has {num_channels} channels, the model expects {self.patch_embeddings.num_channels}"
            )
        patch_height, patch_width = self.patch_embeddings.patch_size
        if interpolate_pos_encoding:
            if height % patch_height or width % patch_width or height < patch_height or width < patch_width:
                raise ValueError(
                    f"Image size {height}x{width} must be a positive multiple of the patch size "
                    f"{patch_height}x{patch_width}"
                )
        elif (height, width) != self.image_size:
            raise ValueError(
                f"Image size {height}x{width} does not match the model's {self.image_size[0]}x{self.image_size[1]}; "
                "resize the image or pass `interpolate_pos_encoding=True`"
            )
        embeddings = self.patch_embeddings(pixel_values)
        embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1), embeddings), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding((height // patch_height, width // patch_width))
        return self.dropout(embeddings)


class MUDDViTAttention(MUDDStreamAttention):
    """Bidirectional multi-head self-attention over three input streams (the forward is the shared one)."""

    def __init__(self, config: MUDDViTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.num_key_value_groups = 1  # read by the shared eager attention (no grouped-query attention here)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=True)

    def project_heads(self, query_input, key_input, value_input, position_embeddings=None, past_key_values=None):
        """Streams `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]` each. No rotary and no cache:
        `position_embeddings` and `past_key_values` belong to the decoders' interface and are always None here."""
        hidden_shape = (*query_input.shape[:-1], -1, self.head_dim)
        query = self.q_proj(query_input).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(key_input).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(value_input).view(hidden_shape).transpose(1, 2)
        return query, key, value


class MUDDViTMLP(nn.Module):
    """`down_proj(act(up_proj(x)))` with biases, `[batch, seq, hidden]` -> same."""

    def __init__(self, config: MUDDViTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class MUDDViTEncoder(nn.Module):
    """`L` MUDD blocks with a dense connection after each.

    Parameter layout: `layers.{i}` (`attention_norms.{0}` or `.{0,1,2}`, `self_attn.{q,k,v,o}_proj`, `mlp_norm`,
    `mlp.{up,down}_proj`) and `dense.layers.{i}` (`static_weights`, `proj_in`, `proj_out`).
    """

    def __init__(self, config: MUDDViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            MUDDDecoderLayer(config, i, nn.LayerNorm, MUDDViTMLP(config), attention=MUDDViTAttention(config, i))
            for i in range(config.num_hidden_layers)
        )
        self.dense = MUDDDenseConnections.from_config(config, eps=config.dense_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_dense_weights: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None]:
        """`X_0` `[batch, seq, hidden]` -> (the last dense connection's single stream `[batch, seq, hidden]`,
        `(X_0, ..., X_L)` or None, per-block attention probabilities or None, per-block dense weights or None)."""
        return run_mudd_blocks(
            self.layers,
            self.dense,
            hidden_states,
            collect_hidden_states=output_hidden_states,
            collect_attentions=output_attentions,
            collect_dense_weights=output_dense_weights,
            output_attentions=output_attentions,  # makes the attention compute the probabilities
            **kwargs,
        )


class MUDDViTPreTrainedModel(MUDDAutoMapMixin, PreTrainedModel):
    """Weight init and capabilities common to the MUDDViT models."""

    config_class = MUDDViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MUDDViTEmbeddings", "MUDDDecoderLayer", "MUDDDenseConnections"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _auto_map_entries = {
        "AutoConfig": "MUDDViTConfig",
        "AutoModel": "MUDDViTModel",
        "AutoModelForImageClassification": "MUDDViTForImageClassification",
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the standard ViT image processor (`build_image_processor`) when the folder has none
        yet, so that `AutoImageProcessor` and `pipeline("image-classification")` work on any saved folder. A
        processor saved there before or after (e.g. by `Trainer` with `processing_class`) is left alone / wins."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        processor_file = os.path.join(save_directory, "preprocessor_config.json")
        if kwargs.get("is_main_process", True) and not os.path.exists(processor_file):
            try:
                processor = build_image_processor(self.config)
            except ImportError as error:
                logger.warning(f"No image processor saved beside the model ({error}); install pillow to get one.")
            else:
                processor.save_pretrained(save_directory)
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MUDDViTEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        init_dense_connection_(module)


class MUDDViTModel(MUDDViTPreTrainedModel):
    """The bare MUDDViT encoder, returning the final-normed states `[batch, 1 + patches, hidden]`.

    Parameter layout: `embeddings` (`cls_token`, `position_embeddings`, `patch_embeddings.projection`), `encoder`
    (see `MUDDViTEncoder`), `layernorm`.
    """

    def __init__(self, config: MUDDViTConfig):
        super().__init__(config)
        self.embeddings = MUDDViTEmbeddings(config)
        self.encoder = MUDDViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> MUDDViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_dense_weights: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MUDDViTModelOutput | tuple:
        r"""
        Args:
            pixel_values (`[batch, channels, height, width]`): images, normalised as the image processor does; cast
                to the model's dtype.
            interpolate_pos_encoding: accept sizes other than `config.image_size` (multiples of the patch size) by
                resampling the position embeddings bicubically.
            output_attentions: return each block's attention probabilities `[batch, heads, seq, seq]` (computed with
                eager attention for this call).
            output_hidden_states: return `(X_0, ..., X_L)`, the embeddings and every block's output, each
                `[batch, seq, hidden]` (`X_L` before the last dense connection and the final LayerNorm).
            output_dense_weights: return each dense connection's weights `[batch, seq, C_i, i + 2]`.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`")
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        last_stream, hidden_states, attentions, dense_weights = self.encoder(
            embeddings,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            output_dense_weights=bool(output_dense_weights),
            **kwargs,
        )
        sequence_output = self.layernorm(last_stream)
        output = MUDDViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0],
            hidden_states=hidden_states,
            attentions=attentions,
            dense_weights=dense_weights,
        )
        return output if return_dict else output.to_tuple()


class MUDDViTForImageClassification(MUDDViTPreTrainedModel):
    """MUDDViT with a linear head on the final-normed class token (`nn.Identity` when `num_labels == 0`)."""

    def __init__(self, config: MUDDViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = MUDDViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_dense_weights: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MUDDViTImageClassifierOutput | tuple:
        r"""
        Args as in `MUDDViTModel.forward`, plus:
            labels: `[batch]` class indices (single-label, cross-entropy), `[batch, num_labels]` floats (multi-label,
                BCE with logits) or `[batch]` floats with `num_labels == 1` (regression, MSE); `config.problem_type`
                chooses, or is inferred as in transformers' ViT.

        Returns `MUDDViTImageClassifierOutput` with `logits` `[batch, num_labels]` and `loss` when labels are given.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_dense_weights=output_dense_weights,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = MUDDViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dense_weights=outputs.dense_weights,
        )
        return output if return_dict else output.to_tuple()


def build_image_processor(config: MUDDViTConfig):
    """The standard ViT preprocessing for `config`: resize to `image_size` (bilinear), scale to [0, 1], normalise
    with mean = std = 0.5 (Google's ViT convention). Saved, it reads back as `ViTImageProcessor` (the torchvision
    backend where torchvision is installed, else `ViTImageProcessorPil`); needs pillow."""
    from transformers import ViTImageProcessorPil

    height, width = config.image_size_pair
    return ViTImageProcessorPil(size={"height": height, "width": width})


MUDDViTConfig.register_for_auto_class()
MUDDViTModel.register_for_auto_class("AutoModel")
MUDDViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "MUDDViTAttention",
    "MUDDViTEmbeddings",
    "MUDDViTEncoder",
    "MUDDViTForImageClassification",
    "MUDDViTMLP",
    "MUDDViTModel",
    "MUDDViTPatchEmbeddings",
    "MUDDViTPreTrainedModel",
    "build_image_processor",
]
