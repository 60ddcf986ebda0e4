"""MUDDViT configuration."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .configuration_mudd import SIZE_LIMITS, _check_bool, _check_positive_int, _check_probability
from .mudd import STREAM_NAMES


def _as_pair(name: str, value) -> tuple[int, int]:
    """`224` or `[224, 224]` -> `(224, 224)`; anything else is a `ValueError` naming the field."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"`{name}` must be a positive integer or a pair of them, got {value!r}")
    for item in pair:
        _check_positive_int(name, item)
    return int(pair[0]), int(pair[1])


class MUDDViTConfig(PreTrainedConfig):
    r"""Configuration of a [`MUDDViTModel`]: a Vision Transformer (ViT) whose residual connections are replaced by
    multiway dynamic dense (MUDD) connections. Field names follow transformers' `ViTConfig`; the defaults give
    MUDDViT-S/16 (paper Table 6) with an ImageNet-1k head.

    Args:
        hidden_size (`int`, defaults to 384): model width `D`.
        num_hidden_layers (`int`, defaults to 12): number of blocks `L`.
        num_attention_heads (`int`, defaults to 6): attention heads (head dim `hidden_size // num_attention_heads`).
        intermediate_size (`int`, defaults to 1536): MLP width.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU; Google's JAX checkpoints use the
            tanh approximation, `"gelu_pytorch_tanh"`).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on the embeddings and on each block's attention and
            MLP outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the (truncated) normal init of weights and embeddings.
        layer_norm_eps (`float`, defaults to 1e-12): epsilon of every LayerNorm (transformers' ViT value; Google's
            JAX models use 1e-6).
        image_size (`int` or pair, defaults to 224): input resolution the position embeddings are made for.
        patch_size (`int` or pair, defaults to 16): side of the square (or `(h, w)`) patches; must divide `image_size`.
        num_channels (`int`, defaults to 3): input channels.
        qkv_bias (`bool`, defaults to `True`): biases in the query/key/value projections (the output projection
            always has one).
        dense_streams (`str`, defaults to `"qkvr"`): `"qkvr"` gives every block after the first separate query,
            key, value and residual inputs (each with its own pre-attention LayerNorm); `"r"` makes one stream.
        dynamic_dense (`bool`, defaults to `True`): position-dependent dense weights (else the static weights only).
        dense_expand_last (`bool`, defaults to `True`): 4x wider weight generator after the last block.
        dense_round64 (`bool`, defaults to `False`): generator widths rounded up to the next multiple of 64 (the
            released language models' quirk; off here because no vision weights depend on it and the paper's
            "+0.7% parameters" for MUDDViT-S/16 matches the unrounded widths).
        dense_norm_eps (`float`, defaults to 1e-6): epsilon of the scale-free RMSNorm in the dense weight generator.
        num_labels / id2label / label2id / problem_type: the classification head, as in every transformers config.
    """

    model_type = "muddvit"
    # Names the shared MUDD block reads (`modeling_mudd_decoder.MUDDDecoderLayer`), mapped onto ViT's names.
    attribute_map = {"norm_eps": "layer_norm_eps", "hidden_dropout": "hidden_dropout_prob"}

    def __init__(
        self,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        intermediate_size: int = 1536,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int | list[int] = 224,
        patch_size: int | list[int] = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        dense_streams: str = "qkvr",
        dynamic_dense: bool = True,
        dense_expand_last: bool = True,
        dense_round64: bool = False,
        dense_norm_eps: float = 1e-6,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = list(image_size) if isinstance(image_size, tuple) else image_size
        self.patch_size = list(patch_size) if isinstance(patch_size, tuple) else patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.dense_streams = dense_streams
        self.dynamic_dense = dynamic_dense
        self.dense_expand_last = dense_expand_last
        self.dense_round64 = dense_round64
        self.dense_norm_eps = dense_norm_eps
        labels = kwargs.get("num_labels")
        if labels is not None and not (isinstance(labels, int) and 0 <= labels <= SIZE_LIMITS["num_labels"]):
            # before the base class builds one label name per class
            raise ValueError(f"`num_labels` must be an integer in [0, {SIZE_LIMITS['num_labels']}], got {labels!r}")
        super().__init__(**kwargs)
        self.validate_muddvit()

    # ------------------------------------------------------------------ derived values
    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_size_pair(self) -> tuple[int, int]:
        return _as_pair("image_size", self.image_size)

    @property
    def patch_size_pair(self) -> tuple[int, int]:
        return _as_pair("patch_size", self.patch_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches per column and per row at `image_size`."""
        (height, width), (patch_height, patch_width) = self.image_size_pair, self.patch_size_pair
        return height // patch_height, width // patch_width

    @property
    def use_parallel_residual(self) -> bool:
        """MUDDViT blocks are sequential: `h = R + attn; out = h + mlp(ln(h))` (read by the shared block)."""
        return False

    def uses_separate_stream_norms(self, layer_idx: int) -> bool:
        """Blocks after the first get one pre-attention LayerNorm per q/k/v stream (when there are such streams)."""
        return layer_idx > 0 and self.dense_streams == "qkvr"

    # ------------------------------------------------------------------ validation
    def validate_muddvit(self) -> None:
        """Raise `ValueError` naming the first invalid field."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        (height, width), (patch_height, patch_width) = self.image_size_pair, self.patch_size_pair
        if height % patch_height or width % patch_width:
            raise ValueError(
                f"`patch_size` ({self.patch_size}) must divide `image_size` ({self.image_size}) so that no pixels are "
                "dropped"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        for name in ("layer_norm_eps", "dense_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}")
        value = self.initializer_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"`initializer_range` must be a non-negative number, got {value!r}")
        _check_probability("hidden_dropout_prob", self.hidden_dropout_prob)
        _check_probability("attention_probs_dropout_prob", self.attention_probs_dropout_prob)
        for name in ("qkv_bias", "dynamic_dense", "dense_expand_last", "dense_round64"):
            _check_bool(name, getattr(self, name))
        if self.dense_streams not in STREAM_NAMES:
            raise ValueError(f"`dense_streams` must be one of {sorted(STREAM_NAMES)}, got {self.dense_streams!r}")


__all__ = ["MUDDViTConfig"]
