"""MUDDFormer configuration (Llama family)."""

from __future__ import annotations

from .configuration_mudd import MUDDDecoderConfig


class MUDDFormerConfig(MUDDDecoderConfig):
    r"""Configuration of a [`MUDDFormerModel`]: a Llama-style decoder (RMSNorm, SwiGLU, no biases, full rotary,
    sequential residual) whose residual connections are replaced by multiway dynamic dense (MUDD) connections.
    The defaults give the released MUDDFormer-2.8B; field names follow transformers' `LlamaConfig`.

    Args:
        vocab_size (`int`, defaults to 50432): vocabulary size (GPT-NeoX-20B tokenizer, padded).
        hidden_size (`int`, defaults to 2560): model width.
        num_hidden_layers (`int`, defaults to 32): number of blocks `L`.
        num_attention_heads (`int`, defaults to 32): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads for grouped-query attention (default: all heads).
        head_dim (`int`, *optional*): per-head width; resolved to `hidden_size // num_attention_heads` when not given.
        intermediate_size (`int`, defaults to 6912): SwiGLU width (the mean width under `ffn_width_reallocation`).
        hidden_act (`str`, defaults to `"silu"`): gate activation of the SwiGLU FFN.
        max_position_embeddings (`int`, defaults to 2048): the context length the model was trained for (what
            scaled RoPE types extend); longer inputs run, as in GPT-NeoX and Llama, and `generate` warns past it.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm, the qk-norm and the dense norms.
        use_cache (`bool`, defaults to `True`): return the KV cache.
        tie_word_embeddings (`bool`, defaults to `False`): tie the LM head to the input embedding.
        use_parallel_residual (`bool`, defaults to `False`): `out = R + attn + ffn(norm(R))` instead of the
            sequential `h = R + attn; out = h + ffn(norm(h))` of the releases.
        attention_bias (`bool`, defaults to `False`): biases in the q/k/v/o projections.
        mlp_bias (`bool`, defaults to `False`): biases in the FFN projections.
        attention_dropout / hidden_dropout (`float`, defaults to 0.0): dropout on attention probabilities / block
            outputs and embeddings.
        rope_parameters (`dict`, *optional*): transformers RoPE parameters; defaults to
            `{"rope_type": "default", "rope_theta": 10000.0}` (rotary on every head dim).
        MUDD options (`use_qk_norm`, `ffn_width_reallocation`, `dense_streams`, `dynamic_dense`, `dense_expand_last`,
            `dense_round64`, `separate_stream_norms`, `separate_stream_norms_first_layer`, `dense_prenorm`,
            `dense_postnorm`): keyword arguments documented in `MUDDDecoderConfig`, defaults = the release.
            To run checkpoints of the authors' JAX (MaxText) code: `separate_stream_norms_first_layer=True`, and
            `dense_prenorm` / `dense_postnorm` as the run's `mudd_prenorm` / `mudd_postnorm`.
    """

    model_type = "muddformer"
    attribute_map = {"norm_eps": "rms_norm_eps"}
    base_model_tp_plan = {**MUDDDecoderConfig.base_model_tp_plan, "layers.*.mlp.gate_proj": "colwise"}

    def __init__(
        self,
        vocab_size: int = 50432,
        hidden_size: int = 2560,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 6912,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        use_parallel_residual: bool = False,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        rope_parameters: dict | None = None,
        rope_theta: float = 10000.0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # Every named argument goes to the shared base unchanged, except the epsilon, which the base calls `norm_eps`;
        # the MUDD options arrive in `kwargs`.
        arguments = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "__class__")}
        arguments["norm_eps"] = arguments.pop("rms_norm_eps")
        super().__init__(**arguments, **kwargs)


__all__ = ["MUDDFormerConfig"]
