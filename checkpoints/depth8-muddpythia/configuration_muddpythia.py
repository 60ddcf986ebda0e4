"""MUDDPythia configuration."""

from __future__ import annotations

from .configuration_mudd import MUDDDecoderConfig


class MUDDPythiaConfig(MUDDDecoderConfig):
    r"""Configuration of a [`MUDDPythiaModel`]: a GPT-NeoX/Pythia decoder whose residual connections are replaced by
    multiway dynamic dense (MUDD) connections. The defaults give the released MUDDPythia-1.4B.

    Args:
        vocab_size (`int`, defaults to 50432): vocabulary size (GPT-NeoX-20B tokenizer, padded).
        hidden_size (`int`, defaults to 2048): model width.
        num_hidden_layers (`int`, defaults to 24): number of blocks `L`.
        num_attention_heads (`int`, defaults to 16): attention heads.
        num_key_value_heads (`int`, *optional*): key/value heads for grouped-query attention (default: all heads).
        head_dim (`int`, *optional*): per-head width; resolved to `hidden_size // num_attention_heads` when not given.
        intermediate_size (`int`, defaults to 8192): FFN width (the mean width under `ffn_width_reallocation`).
        hidden_act (`str`, defaults to `"gelu"`): FFN activation (exact erf GELU in the releases).
        max_position_embeddings (`int`, defaults to 2048): the context length the model was trained for (what
            scaled RoPE types extend); longer inputs run, as in GPT-NeoX and Llama, and `generate` warns past it.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm, the qk-norm and the dense norm.
        use_cache (`bool`, defaults to `True`): return the KV cache.
        tie_word_embeddings (`bool`, defaults to `False`): tie the LM head to the input embedding.
        use_parallel_residual (`bool`, defaults to `True`): `out = R + attn + ffn(ln(R))` instead of the
            sequential `h = R + attn; out = h + ffn(ln(h))`.
        attention_bias (`bool`, defaults to `True`): biases in the q/k/v/o projections.
        mlp_bias (`bool`, defaults to `True`): biases in the FFN.
        attention_dropout / hidden_dropout (`float`, defaults to 0.0): dropout on attention probabilities / block
            outputs and embeddings.
        rope_parameters (`dict`, *optional*): transformers RoPE parameters; defaults to
            `{"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}`.
        MUDD options (`use_qk_norm`, `ffn_width_reallocation`, `dense_streams`, `dynamic_dense`, `dense_expand_last`,
            `dense_round64`, `separate_stream_norms`, `separate_stream_norms_first_layer`, `dense_prenorm`,
            `dense_postnorm`): keyword arguments documented in `MUDDDecoderConfig`, defaults = the release.
    """

    model_type = "muddpythia"
    attribute_map = {"norm_eps": "layer_norm_eps"}

    def __init__(
        self,
        vocab_size: int = 50432,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 8192,
        hidden_act: str = "gelu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        use_parallel_residual: bool = True,
        attention_bias: bool = True,
        mlp_bias: bool = True,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        rope_parameters: dict | None = None,
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 0.25,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            hidden_act=hidden_act,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            norm_eps=layer_norm_eps,
            use_cache=use_cache,
            tie_word_embeddings=tie_word_embeddings,
            use_parallel_residual=use_parallel_residual,
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            attention_dropout=attention_dropout,
            hidden_dropout=hidden_dropout,
            rope_parameters=rope_parameters,
            rope_theta=rope_theta,
            partial_rotary_factor=partial_rotary_factor,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )


__all__ = ["MUDDPythiaConfig"]
