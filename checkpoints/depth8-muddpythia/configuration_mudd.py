"""Configuration shared by the MUDD decoder families (MUDDPythia, MUDDFormer)."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .mudd import STREAM_NAMES, reallocated_ffn_width


# Upper bounds on sizes, far above any released model: a crafted config is refused at once, naming the field,
# instead of building (or looping over) an absurd model.
SIZE_LIMITS = {
    "vocab_size": 2**22, "hidden_size": 2**17, "num_hidden_layers": 2**12, "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12, "head_dim": 2**14, "intermediate_size": 2**20, "max_position_embeddings": 2**27,
    "num_channels": 2**10, "image_size": 2**16, "patch_size": 2**16, "num_labels": 2**22,
}


def _check_positive_int(name: str, value) -> None:
    """A positive integer, at most `SIZE_LIMITS[name]` when the field has a limit."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    limit = SIZE_LIMITS.get(name)
    if limit is not None and value > limit:
        raise ValueError(f"`{name}` is {value}, above the limit of {limit}: the config is corrupt or crafted")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a boolean, got {value!r}")


def _check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")


class MUDDDecoderConfig(PreTrainedConfig):
    r"""Fields common to the MUDD decoders; see `MUDDPythiaConfig` / `MUDDFormerConfig` for the documented API.

    The family configs expose their norm epsilon under the transformers name of their family
    (`layer_norm_eps` / `rms_norm_eps`); shared code reads it as `config.norm_eps`.

    The MUDD options below have the same meaning and release defaults in every family:

    Args:
        use_qk_norm (`bool`, defaults to `True`): RMSNorm (learned scale, float32) on each head's query and key.
        ffn_width_reallocation (`bool`, defaults to `True`): FFN width grows linearly with depth from 0.5x to 1.5x.
        dense_streams (`str`, defaults to `"qkvr"`): `"qkvr"` makes four streams per block, `"r"` one.
        dynamic_dense (`bool`, defaults to `True`): position-dependent dense weights (else static only).
        dense_expand_last (`bool`, defaults to `True`): 4x wider weight generator after the last block.
        dense_round64 (`bool`, defaults to `True`): generator widths rounded up to the next multiple of 64.
        separate_stream_norms (`bool`, defaults to `True`): blocks > 0 have one pre-attention norm per q/k/v stream.
        separate_stream_norms_first_layer (`bool`, defaults to `False`): block 0 has them too (MaxText layout).
        dense_prenorm (`bool`, defaults to `False`): MaxText `mudd_prenorm`: every state `X_j` enters the aggregation
            through its own learned-scale RMSNorm, and the weight generator's norm gets a learned scale.
        dense_postnorm (`bool`, defaults to `False`): MaxText `mudd_postnorm`: the residual stream becomes
            `X_{i+1} + rmsnorm(sum_j w[r, j] X_j)` (scale initialised to 0.001); the q/k/v streams stay plain sums.
            With both on, the static weights `b_i` start at 0 instead of one-hot on the newest state.
    """

    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun), as transformers' Llama/Qwen3 do it:
    # heads and FFN columns split across ranks. Everything not named is replicated: the dense connections and the
    # stream norms mix full hidden states on every rank. The qk-norms are replicated too, but each rank's gradient of
    # their weight covers only its own heads, so it is summed across ranks.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        num_key_value_heads: int | None,
        head_dim: int | None,
        intermediate_size: int,
        hidden_act: str,
        max_position_embeddings: int,
        initializer_range: float,
        norm_eps: float,
        use_cache: bool,
        tie_word_embeddings: bool,
        use_parallel_residual: bool,
        attention_bias: bool,
        mlp_bias: bool,
        attention_dropout: float,
        hidden_dropout: float,
        rope_parameters: dict | None,
        use_qk_norm: bool = True,
        ffn_width_reallocation: bool = True,
        dense_streams: str = "qkvr",
        dynamic_dense: bool = True,
        dense_expand_last: bool = True,
        dense_round64: bool = True,
        separate_stream_norms: bool = True,
        separate_stream_norms_first_layer: bool = False,
        dense_prenorm: bool = False,
        dense_postnorm: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        # Resolved here, as in `LlamaConfig`: transformers' RoPE initialisers ("dynamic", "yarn", ...) read
        # `config.head_dim`. A missing one is only derived when the width splits evenly (checked in `validate_mudd`).
        if head_dim is None and isinstance(num_attention_heads, int) and num_attention_heads > 0:
            if isinstance(hidden_size, int) and hidden_size % num_attention_heads == 0:
                head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.use_parallel_residual = use_parallel_residual
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.rope_parameters = rope_parameters
        self.use_qk_norm = use_qk_norm
        self.ffn_width_reallocation = ffn_width_reallocation
        self.dense_streams = dense_streams
        self.dynamic_dense = dynamic_dense
        self.dense_expand_last = dense_expand_last
        self.dense_round64 = dense_round64
        self.separate_stream_norms = separate_stream_norms
        self.separate_stream_norms_first_layer = separate_stream_norms_first_layer
        self.dense_prenorm = dense_prenorm
        self.dense_postnorm = dense_postnorm
        # Sizes first: the base class compares token ids with `vocab_size` and would fail obscurely on a bad one.
        self._validate_sizes()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_mudd()
        if not use_qk_norm:  # no qk-norms to plan for (transformers warns about rules that match nothing)
            self.base_model_tp_plan = {
                name: style for name, style in type(self).base_model_tp_plan.items()
                if not name.endswith(("q_norm", "k_norm"))
            }

    # ------------------------------------------------------------------ derived values
    @property
    def attention_head_dim(self) -> int:
        return self.head_dim

    @property
    def rotary_ndims(self) -> int:
        return int(self.attention_head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def ffn_width(self, layer_idx: int) -> int:
        """FFN width of layer `layer_idx` (re-allocated across depth when `ffn_width_reallocation`)."""
        if not self.ffn_width_reallocation:
            return self.intermediate_size
        return reallocated_ffn_width(self.intermediate_size, layer_idx, self.num_hidden_layers)

    def uses_separate_stream_norms(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` has one pre-attention norm per q/k/v stream (else one shared norm)."""
        return self.separate_stream_norms and (layer_idx > 0 or self.separate_stream_norms_first_layer)

    # ------------------------------------------------------------------ validation
    def _validate_sizes(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings",
        ):
            _check_positive_int(name, getattr(self, name))

    def validate_mudd(self) -> None:
        """Raise `ValueError` naming the first invalid field."""
        self._validate_sizes()
        if self.head_dim is None:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}) unless `head_dim` is given"
            )
        _check_positive_int("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            name = self.attribute_map.get("norm_eps", "norm_eps")  # the family's public name for it
            raise ValueError(f"`{name}` must be a positive number, got {self.norm_eps!r}")
        if isinstance(self.initializer_range, bool) or not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"`initializer_range` must be a non-negative number, got {self.initializer_range!r}")
        _check_probability("attention_dropout", self.attention_dropout)
        _check_probability("hidden_dropout", self.hidden_dropout)
        for name in (
            "use_cache", "tie_word_embeddings", "use_parallel_residual", "attention_bias", "mlp_bias", "use_qk_norm",
            "ffn_width_reallocation", "dynamic_dense", "dense_expand_last", "dense_round64", "separate_stream_norms",
            "separate_stream_norms_first_layer", "dense_prenorm", "dense_postnorm",
        ):
            _check_bool(name, getattr(self, name))
        if self.dense_streams not in STREAM_NAMES:
            raise ValueError(f"`dense_streams` must be one of {sorted(STREAM_NAMES)}, got {self.dense_streams!r}")
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ValueError(f"`rope_parameters['rope_theta']` must be a positive number, got {theta!r}")
        factor = rope.get("partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor <= 1.0:
            raise ValueError(f"`rope_parameters['partial_rotary_factor']` must be in (0, 1], got {factor!r}")
        if self.rotary_ndims < 2 or self.rotary_ndims % 2:
            raise ValueError(
                f"`rope_parameters['partial_rotary_factor']` ({factor}) times the head dim "
                f"({self.attention_head_dim}) gives {self.rotary_ndims} rotary dims; it must be a positive even number"
            )
        width = self.ffn_width(0)  # the width grows with depth: the first layer's is the smallest
        if width <= 0:
            raise ValueError(
                f"`intermediate_size` ({self.intermediate_size}) is too small for `ffn_width_reallocation`: "
                f"layer 0 would get an FFN of width {width}"
            )
