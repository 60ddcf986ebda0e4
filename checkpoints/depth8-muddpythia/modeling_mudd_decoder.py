"""The decoder machinery shared by MUDDPythia and MUDDFormer.

What the two families share lives here: attention over separate q/k/v streams (qk-norm, partial rotary, GQA,
KV cache), the block with its per-stream norms and parallel or sequential residual, the model loop that runs the
dense connections between blocks, and the causal-LM head. What differs (norm type, FFN, biases, residual order)
comes from the family's config and from the `norm_class` / `mlp_class` a family model sets. The task heads
(sequence and token classification, extractive question answering) are transformers' generic heads, as Llama's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .mudd import MUDDDenseConnections, MUDDRMSNorm, init_dense_connection_


logger = logging.get_logger(__name__)


@dataclass
class MUDDModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `dense_weights`: one `[batch, seq, C_i, i + 2]` tensor per block when
    `output_dense_weights=True` (the mixing weights `a + b` of every dense connection, for analysis)."""

    dense_weights: tuple[torch.Tensor, ...] | None = None


@dataclass
class MUDDCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `dense_weights` (see `MUDDModelOutputWithPast`)."""

    dense_weights: tuple[torch.Tensor, ...] | None = None


class MUDDRotaryEmbedding(nn.Module):
    """Rotary cos/sin for the first `rotary_ndims` dims of each head (GPT-NeoX "rotate half" layout).

    Returns `(cos, sin)`, each `[batch, seq, rotary_ndims]` in the dtype of `x`, as transformers' rotary modules do;
    `signed_rotary_tables` turns them into the tables `apply_partial_rotary` uses.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.rotary_ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = torch.cat((freqs, freqs), dim=-1)
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def signed_rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` `[batch, seq, rotary_ndims]` -> `(cos, signed_sin)` `[batch, 1, seq, rotary_ndims]` (broadcasting
    over heads), the first half of `signed_sin` negated so that a rotation is `x * cos + roll(x, half) * signed_sin`
    (see `apply_partial_rotary`). Made once per forward, which keeps these ops out of every layer."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of `x` (`[batch, heads, seq, head_dim]`), pass the rest through.

    With `signed_sin` from `MUDDRotaryEmbedding`, `roll(x, half) * signed_sin` equals the usual
    `rotate_half(x) * sin = cat(-x2, x1) * sin` exactly, in three kernels instead of six.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rotary_dim // 2, -1), signed_sin)
    x_rot = x[..., :rotary_dim]
    x_rot = torch.addcmul(x_rot * cos, x_rot.roll(rotary_dim // 2, -1), signed_sin)
    return torch.cat((x_rot, x[..., rotary_dim:]), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[batch, kv_heads, seq, head_dim]` -> `[batch, kv_heads * n_rep, seq, head_dim]`."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    # At least float32; float64 stays float64, where the mask's finfo(float64).min would be -inf in float32 and
    # turn fully masked (padding) rows into NaN.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MUDDStreamAttention(nn.Module):
    """Multi-head attention whose query, key and value come from three input streams: the forward both families share.

    A subclass sets `config`, `layer_idx`, `head_dim`, `scaling`, `attention_dropout`, `num_key_value_groups`,
    `is_causal` and `o_proj`, and implements `project_heads`. `forward` makes the one call of the attention interface
    (resolved from `ALL_ATTENTION_FUNCTIONS` at run time, which is what lets transformers switch implementations and
    lets vLLM's Transformers backend plug in its own, reading `scaling=self.scaling` and the integer `layer_idx`);
    extra keyword arguments (`attention_instances`, packed-sequence metadata, ...) reach the interface unchanged.
    """

    def project_heads(
        self,
        query_input: torch.Tensor,
        key_input: torch.Tensor,
        value_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_values: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streams `[batch, seq, hidden]` -> query `[batch, heads, seq, head_dim]` and key, value
        `[batch, kv_heads, kv_seq, head_dim]` (after the cache update, where there is one)."""
        raise NotImplementedError

    def forward(
        self,
        query_input: torch.Tensor,
        key_input: torch.Tensor,
        value_input: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs `[batch, seq, hidden]` (already normed); returns `([batch, seq, hidden], probabilities or None)`.

        With `output_attentions` the eager path runs, whatever `attn_implementation` is, so that the probabilities
        `[batch, heads, seq, kv_seq]` exist.
        """
        input_shape = query_input.shape[:-1]
        query, key, value = self.project_heads(query_input, key_input, value_input, position_embeddings, past_key_values)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        # Heads as -1: under tensor parallelism a rank holds only its share of them. `input_shape`, not the output's
        # leading dims: an interface may return the heads flattened (vLLM's returns `[tokens, heads * head_dim]`).
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MUDDAttention(MUDDStreamAttention):
    """Causal self-attention over three input streams, with qk-norm, partial rotary, GQA and a KV cache."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.use_qk_norm:
            self.q_norm = MUDDRMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = MUDDRMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_heads(self, query_input, key_input, value_input, position_embeddings, past_key_values):
        """See `MUDDStreamAttention.project_heads`; heads reshaped with -1 (a tensor-parallel rank holds a share)."""
        input_shape = query_input.shape[:-1]
        query, key, value = self.q_proj(query_input), self.k_proj(key_input), self.v_proj(value_input)
        if query.shape[-1] % self.head_dim or key.shape[-1] % self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx} projects to {query.shape[-1]} query and {key.shape[-1]} key features, not whole "
                f"heads of {self.head_dim}: under tensor parallelism the number of ranks must divide "
                f"num_attention_heads ({self.num_heads}) and num_key_value_heads ({self.num_key_value_heads})"
            )
        query = query.view(*input_shape, -1, self.head_dim)
        key = key.view(*input_shape, -1, self.head_dim)
        value = value.view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query = apply_partial_rotary(query.transpose(1, 2), cos, sin)
        key = apply_partial_rotary(key.transpose(1, 2), cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        return query, key, value


class MUDDDecoderLayer(GradientCheckpointingLayer):
    """One block. It receives the streams the previous dense connection made: one tensor (block 0, or
    `dense_streams="r"`), used as query, key, value and residual input, or four `(q, k, v, r)`.

    Parallel residual: `out = R + attn(...) + mlp(mlp_norm(R))`; sequential: `h = R + attn(...)`,
    `out = h + mlp(mlp_norm(h))`.

    `attention` replaces the causal rotary `MUDDAttention` (MUDDViT passes its bidirectional attention); it is called
    as `attention(q, k, v, attention_mask=, position_embeddings=, past_key_values=, **kwargs)`.
    """

    def __init__(
        self, config, layer_idx: int, norm_class: type[nn.Module], mlp: nn.Module, attention: nn.Module | None = None
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.use_parallel_residual = config.use_parallel_residual
        num_norms = 3 if config.uses_separate_stream_norms(layer_idx) else 1
        self.attention_norms = nn.ModuleList(
            norm_class(config.hidden_size, eps=config.norm_eps) for _ in range(num_norms)
        )
        self.self_attn = MUDDAttention(config, layer_idx) if attention is None else attention
        self.mlp_norm = norm_class(config.hidden_size, eps=config.norm_eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(config.hidden_dropout)

    def _normed_attention_inputs(self, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(self.attention_norms) == 1:
            norm = self.attention_norms[0]
            if query is key and key is value:
                normed = norm(query)
                return normed, normed, normed
            return norm(query), norm(key), norm(value)
        return tuple(norm(x) for norm, x in zip(self.attention_norms, (query, key, value)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_stream: torch.Tensor | None = None,
        value_stream: torch.Tensor | None = None,
        residual_stream: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` is the query stream `[batch, seq, hidden]`; with the other three streams omitted (block 0,
        or `dense_streams="r"`) it also serves as key, value and residual stream. The streams are separate positional
        tensors so that reentrant gradient checkpointing sees (and differentiates) each of them.

        Returns (`X_{i+1}` `[batch, seq, hidden]`, attention weights or None).
        """
        query = hidden_states
        given = (key_stream is not None, value_stream is not None, residual_stream is not None)
        if not any(given):
            key = value = residual = query
        elif all(given):
            key, value, residual = key_stream, value_stream, residual_stream
        else:
            raise ValueError(f"block {self.layer_idx} expects 1 or 4 input streams, got {1 + sum(given)}")
        attn_output, attn_weights = self.self_attn(
            *self._normed_attention_inputs(query, key, value),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + self.dropout(attn_output)
        mlp_input = residual if self.use_parallel_residual else hidden_states
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(mlp_input)))
        return hidden_states, attn_weights


def run_mudd_blocks(
    layers: nn.ModuleList,
    dense: MUDDDenseConnections,
    hidden_states: torch.Tensor,
    *,
    collect_hidden_states: bool = False,
    collect_attentions: bool = False,
    collect_dense_weights: bool = False,
    **layer_kwargs,
) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None]:
    """Run MUDD blocks from `X_0` `[batch, seq, hidden]`, each followed by its dense connection.

    `layer_kwargs` go to every block. Returns the last dense connection's single stream `[batch, seq, hidden]`
    (what the final norm reads) and, when collected, `(X_0, ..., X_L)`, the blocks' attention weights and the
    dense connections' weights `[batch, seq, C_i, i + 2]`, else None for each.
    """
    stack = dense.start(hidden_states)
    streams: tuple[torch.Tensor, ...] = (hidden_states,)
    all_hidden_states = [hidden_states] if collect_hidden_states else None
    all_attentions = [] if collect_attentions else None
    all_dense_weights = [] if collect_dense_weights else None
    for layer_idx, layer in enumerate(layers):
        hidden_states, attn_weights = layer(*streams, **layer_kwargs)  # positional: see MUDDDecoderLayer.forward
        streams, dense_weights = dense(layer_idx, hidden_states, stack)
        if collect_hidden_states:
            all_hidden_states.append(hidden_states)
        if collect_attentions:
            all_attentions.append(attn_weights)
        if collect_dense_weights:
            all_dense_weights.append(dense_weights)
    return (
        streams[0],
        tuple(all_hidden_states) if collect_hidden_states else None,
        tuple(all_attentions) if collect_attentions else None,
        tuple(all_dense_weights) if collect_dense_weights else None,
    )


class MUDDAutoMapMixin:
    """For a `PreTrainedModel` of a MUDD family: `save_pretrained` writes an `auto_map` covering every Auto class in
    the family's `_auto_map_entries` (`register_for_auto_class` records only one per class)."""

    _auto_map_entries: dict[str, str] = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; with remote code, `auto_map` covers AutoConfig, AutoModel and the task Auto class."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        module = self.__class__.__module__.split(".")[-1]
        for auto_class, class_name in self._auto_map_entries.items():
            auto_map.setdefault(auto_class, f"{module}.{class_name}")
        if auto_map:
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class MUDDDecoderPreTrainedModel(MUDDAutoMapMixin, PreTrainedModel):
    """Weight init and capabilities common to the MUDD decoders. Family subclasses set `config_class`,
    `norm_class`, `mlp_class` and `_no_split_modules`."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    norm_class: type[nn.Module] = nn.LayerNorm
    mlp_class: type[nn.Module] | None = None

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MUDDRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config, device=module.inv_freq.device) if (
                module.rope_type == "default"
            ) else ROPE_INIT_FUNCTIONS[module.rope_type](module.config, module.inv_freq.device)
            with torch.no_grad():
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)
        init_dense_connection_(module)


class MUDDDecoderModel(MUDDDecoderPreTrainedModel):
    """Embedding, `L` MUDD blocks with a dense connection after each, final norm.

    Parameter layout: `embed_tokens`, `layers.{i}` (`attention_norms`, `self_attn`, `mlp_norm`, `mlp`),
    `dense.layers.{i}` (`static_weights`, `proj_in`, `proj_out`), `norm`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            MUDDDecoderLayer(config, i, self.norm_class, self.mlp_class(config, config.ffn_width(i)))
            for i in range(config.num_hidden_layers)
        )
        self.dense = MUDDDenseConnections.from_config(config, eps=config.norm_eps)
        self.norm = self.norm_class(config.hidden_size, eps=config.norm_eps)
        self.rotary_emb = MUDDRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_dense_weights: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MUDDModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`[batch, seq]`): token ids; or `inputs_embeds` (`[batch, seq, hidden]`), exactly one.
            attention_mask (`[batch, past + seq]`): 1 for real tokens, 0 for padding (or a prepared 4D mask).
            position_ids (`[batch, seq]`): default `past + arange(seq)`.
            past_key_values (`Cache`): KV cache; a `DynamicCache` is created when `use_cache` and none is given.
            output_hidden_states: return `(X_0, ..., X_{L-1}, final normed output)`, each `[batch, seq, hidden]`.
            output_attentions: return each block's attention probabilities (eager attention only).
            output_dense_weights: return each dense connection's weights `[batch, seq, C_i, i + 2]`.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_dense_weights = bool(output_dense_weights)
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; using `use_cache=False`.")
            use_cache = False

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be [batch, seq], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq, {config.hidden_size}], got shape {tuple(inputs_embeds.shape)}"
            )

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        # No length check: as in GPT-NeoX and Llama, positions past `max_position_embeddings` run (RoPE is defined at
        # every position; scaled RoPE types are made for it), and `generate` warns when it goes past the limit.
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        # A 2D mask covers the cached and the new tokens; any other length would be silently cut or broadcast.
        # Shapes only (compile-friendly); a StaticCache counts in a tensor, and is then not checked.
        if attention_mask is not None and attention_mask.dim() == 2 and isinstance(past_seen_tokens, int):
            if attention_mask.shape[-1] != past_seen_tokens + inputs_embeds.shape[1]:
                raise ValueError(
                    f"`attention_mask` has length {attention_mask.shape[-1]}, expected cached + new tokens = "
                    f"{past_seen_tokens} + {inputs_embeds.shape[1]} = {past_seen_tokens + inputs_embeds.shape[1]}"
                )
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = self.embed_dropout(inputs_embeds)
        position_embeddings = signed_rotary_tables(*self.rotary_emb(hidden_states, position_ids))
        last_stream, all_hidden_states, all_attentions, all_dense_weights = run_mudd_blocks(
            self.layers,
            self.dense,
            hidden_states,
            collect_hidden_states=output_hidden_states,
            collect_attentions=output_attentions,
            collect_dense_weights=output_dense_weights,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        last_hidden_state = self.norm(last_stream)
        if output_hidden_states:  # the decoders report the final-normed output in place of X_L
            all_hidden_states = (*all_hidden_states[:-1], last_hidden_state)

        output = MUDDModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            dense_weights=all_dense_weights,
        )
        return output if return_dict else output.to_tuple()


class MUDDDecoderForCausalLM(MUDDDecoderPreTrainedModel, GenerationMixin):
    """A MUDD decoder with an (untied by default) LM head. Family subclasses set `base_model_class`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    base_model_class: type[MUDDDecoderModel] = MUDDDecoderModel

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_dense_weights: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MUDDCausalLMOutputWithPast | tuple:
        r"""
        Args as in `MUDDDecoderModel.forward`, plus:
            labels (`[batch, seq]`): targets for the shifted next-token cross-entropy (-100 = ignored);
                they are the input ids themselves, the shift happens inside.
            logits_to_keep (`int` or 1D index tensor): compute logits only for the last `n` positions (0 = all),
                or for the given positions.

        Returns `MUDDCausalLMOutputWithPast` with `logits` `[batch, kept positions, vocab]` and `loss` when labels.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_dense_weights=output_dense_weights,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = MUDDCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dense_weights=outputs.dense_weights,
        )
        return output if return_dict else output.to_tuple()


# The task heads take their forward (pooling, problem types, losses) from transformers' generic heads, as Llama's
# do. Their constructors are ours: the generic ones build the backbone with `AutoModel.from_config`, which does not
# resolve a config class loaded as remote code; `base_model_class` names the family's backbone instead.


class MUDDDecoderForSequenceClassification(GenericForSequenceClassification, MUDDDecoderPreTrainedModel):
    """A MUDD decoder with a linear head (`score`, no bias) read at the last non-padding token of each row.

    The last non-padding token is the rightmost id that is not `config.pad_token_id` (left or right padding); with
    no `pad_token_id` only batches of one are accepted, and with `inputs_embeds` the last position is read.
    `config.problem_type` (inferred from `num_labels` and the labels' dtype when unset) picks regression (MSE),
    single-label (cross-entropy) or multi-label (BCE) loss. Returns `SequenceClassifierOutputWithPast` with
    `logits` `[batch, num_labels]`. Family subclasses set `base_model_class`.
    """

    base_model_class: type[MUDDDecoderModel] = MUDDDecoderModel

    def __init__(self, config):
        super(GenericForSequenceClassification, self).__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class MUDDDecoderForTokenClassification(GenericForTokenClassification, MUDDDecoderPreTrainedModel):
    """A MUDD decoder with a per-token linear head (`score`, with bias) after dropout.

    The dropout is `config.classifier_dropout` when the config has one, else `config.hidden_dropout`. Labels
    `[batch, seq]` (-100 = ignored) give the cross-entropy loss. Returns `TokenClassifierOutput` with `logits`
    `[batch, seq, num_labels]`. Family subclasses set `base_model_class`.
    """

    base_model_class: type[MUDDDecoderModel] = MUDDDecoderModel

    def __init__(self, config):
        super(GenericForTokenClassification, self).__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class MUDDDecoderForQuestionAnswering(GenericForQuestionAnswering, MUDDDecoderPreTrainedModel):
    """A MUDD decoder with a span head (`qa_outputs`, 2 outputs with bias) for extractive question answering.

    `start_positions` / `end_positions` `[batch]` give the mean of the start and end cross-entropies (positions
    outside the sequence are clamped and ignored). Returns `QuestionAnsweringModelOutput` with `start_logits` and
    `end_logits` `[batch, seq]`. Family subclasses set `base_model_class`.
    """

    base_model_class: type[MUDDDecoderModel] = MUDDDecoderModel

    def __init__(self, config):
        super(GenericForQuestionAnswering, self).__init__(config)
        self.model = self.base_model_class(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()
