"""Key plans: for each checkpoint format, which source tensor becomes which parameter of our models, and how.

A plan is a list of `Rule`s (source names with their expected shapes -> target names, through a transform), so
that every check is generic: a source tensor the plan needs but the checkpoint lacks, a checkpoint tensor no rule
uses, a wrong shape, a target no rule fills. The formats are those of CHECKPOINT_FORMATS.md:

* A, `authors-pytorch`: the authors' PyTorch releases (`tok_embeddings`, `layers.{i}.attention.wq`, ...).
* B, `pax`: the authors' JAX training checkpoints with Pax/Praxis names (`state.mdl_vars.params.lm...`).
* C, `maxtext`: MaxText trees of the authors' MUDDLlama2 code (`params/decoder/layers_{i}/...`).
* D, `gpt-neox` / `llama`: plain transformers models, muddified (identity dense connections, spec section 5).

The configs come from the source (the authors' `config.json`, or the shapes in the checkpoint) plus the user's
`--config` overrides for what neither can tell.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .configuration_mudd import SIZE_LIMITS, MUDDDecoderConfig
from .configuration_muddformer import MUDDFormerConfig
from .configuration_muddpythia import MUDDPythiaConfig
from .convert_io import ConversionError, TensorSource
from .modeling_muddformer import MUDDFormerForCausalLM
from .modeling_muddpythia import MUDDPythiaForCausalLM
from .mudd import STREAM_NAMES, dense_hidden_width, reallocated_ffn_width


# ---------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One MUDD model family and what its blocks contain."""

    model_type: str
    config_class: type
    model_class: type
    eps_field: str
    norm_bias: bool  # LayerNorm (weight and bias) vs RMSNorm (weight only)
    gated_ffn: bool  # SwiGLU gate/up/down vs GELU up/down


FAMILIES = {
    "muddpythia": Family("muddpythia", MUDDPythiaConfig, MUDDPythiaForCausalLM, "layer_norm_eps", norm_bias=True, gated_ffn=False),
    "muddformer": Family("muddformer", MUDDFormerConfig, MUDDFormerForCausalLM, "rms_norm_eps", norm_bias=False, gated_ffn=True),
}

# Keys of a saved config.json that describe the file rather than the model.
_FILE_METADATA_KEYS = {"model_type", "auto_map", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}


def build_config(family: Family, derived: Mapping, overrides: Mapping):
    """`family.config_class(**derived, **overrides)`.

    `derived` uses the generic names `norm_eps`, `rope_theta` and `partial_rotary_factor`; `overrides` (the user's
    `--config`) uses the config's own field names and wins. Raises `ConversionError` for unknown or invalid fields.
    """
    config_class = family.config_class
    accepted = {  # the family's own fields and the shared MUDD options its base class takes
        name
        for cls in config_class.__mro__ if "__init__" in vars(cls) and issubclass(cls, MUDDDecoderConfig)
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name not in ("self", "norm_eps")
    }
    overrides = dict(overrides)
    model_type = overrides.pop("model_type", family.model_type)
    if model_type != family.model_type:
        raise ConversionError(f"--config is for model_type {model_type!r}, but the checkpoint is {family.model_type!r}")
    unknown = sorted(set(overrides) - accepted - _FILE_METADATA_KEYS)
    if unknown:
        raise ConversionError(f"--config has fields {config_class.__name__} does not know: {unknown}")
    kwargs = {k: v for k, v in derived.items() if k not in ("norm_eps", "rope_theta", "partial_rotary_factor")}
    if "norm_eps" in derived:
        kwargs[family.eps_field] = derived["norm_eps"]
    rope = {k: derived[k] for k in ("rope_theta", "partial_rotary_factor") if k in derived}
    if rope and "rope_parameters" not in overrides:
        kwargs["rope_parameters"] = {**config_class().rope_parameters, **rope}
    kwargs.update({k: v for k, v in overrides.items() if k not in _FILE_METADATA_KEYS})
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"the derived {config_class.__name__} is invalid: {error}") from None


# ---------------------------------------------------------------------------------------------------- plans
class AtLeast(int):
    """A dimension that may be larger than its value (padded vocabularies: the first rows are used)."""

    def __repr__(self) -> str:
        return f">={int(self)}"


def shape_matches(expected: Sequence[int], actual: Sequence[int]) -> bool:
    return len(expected) == len(actual) and all(
        a >= e if isinstance(e, AtLeast) else a == e for e, a in zip(expected, actual)
    )


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(repr(d) if isinstance(d, AtLeast) else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Rule:
    """`targets = convert(*sources)`; `what` says in words what the sources hold (for error messages)."""

    sources: tuple[str, ...]
    source_shapes: tuple[tuple[int, ...], ...]
    targets: tuple[str, ...]
    what: str
    convert: Callable[..., torch.Tensor | Sequence[torch.Tensor]] | None = None

    def apply(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.convert is None:
            return list(tensors)
        result = self.convert(*tensors)
        return [result] if isinstance(result, torch.Tensor) else list(result)


@dataclass
class KeyPlan:
    """The rules of one conversion, plus what the checkpoint may hold besides weights.

    `ignored`: (pattern, reason) for source tensors that are not weights (runtime buffers, tied duplicates).
    `initialized`: target module prefixes the model initialises itself (the identity dense connections of a
    muddified plain model).
    """

    rules: list[Rule] = field(default_factory=list)
    ignored: list[tuple[re.Pattern, str]] = field(default_factory=list)
    initialized: tuple[str, ...] = ()

    def add(self, target: str | Sequence[str], source: str, shape: Sequence[int], what: str, convert=None) -> None:
        targets = (target,) if isinstance(target, str) else tuple(target)
        self.rules.append(Rule((source,), (tuple(shape),), targets, what, convert))

    def ignore(self, pattern: str, reason: str) -> None:
        self.ignored.append((re.compile(pattern), reason))

    def ignore_reason(self, name: str) -> str | None:
        return next((reason for pattern, reason in self.ignored if pattern.search(name)), None)


def apply_plan(plan: KeyPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run every rule on an in-memory state dict (used by `muddify`)."""
    state = {}
    for rule in plan.rules:
        for target, tensor in zip(rule.targets, rule.apply(*(tensors[s] for s in rule.sources)), strict=True):
            state[target] = tensor
    return state


# Transforms. Layout changes keep the dtype; arithmetic happens in float32 and is cast once at the end.
def _transposed(x):
    return x.t()


def _plus_one(x):
    return x.float() + 1.0


def _first_rows(n: int):
    return lambda x: x[:n]


def _first_columns_transposed(n: int):
    return lambda x: x[:, :n].t()


def _flatten_tail_transposed(x):
    """`[A, B, C]` -> `[B*C, A]`: Pax/MaxText q/k/v kernels `[D, N, H]`, MaxText `dynamic_dense_conn2` `[h, C, J]`."""
    return x.reshape(x.shape[0], -1).t()


def _flatten_head_transposed(x):
    """`[N, H, D]` -> `[D, N*H]`: the MaxText attention output kernel."""
    return x.reshape(-1, x.shape[-1]).t()


def _flatten_tail(x):
    """`[D, N, H]` -> `[D, N*H]` (Pax `post.w`, already (out, in)); `[N, H]` -> `[N*H]` (Pax q/k/v biases)."""
    return x.reshape(x.shape[0], -1) if x.dim() == 3 else x.reshape(-1)


def _copies(n: int):
    return lambda x: [x] * n


def _split_heads_qkv(num_heads: int):
    """GPT-NeoX's fused `query_key_value` is laid out per head as `[q_h, k_h, v_h]` on the output dim."""

    def split(x):
        per_head = x.reshape(num_heads, 3, -1, *x.shape[1:])
        return [per_head[:, index].reshape(-1, *x.shape[1:]) for index in range(3)]

    return split


def _widths(config) -> tuple[int, int, int]:
    """(head dim, query width N*H, key/value width N_kv*H) of our attention projections."""
    head = config.attention_head_dim
    return head, config.num_attention_heads * head, config.num_key_value_heads * head


def _dense_shape(config, i: int) -> tuple[int, int, int]:
    """(streams C_i, states J = i + 2, weight-generator width h_i) of the dense connection after block `i`."""
    last = i == config.num_hidden_layers - 1
    streams = 1 if last else len(STREAM_NAMES[config.dense_streams])
    return streams, i + 2, dense_hidden_width(streams, i + 2, last, config.dense_expand_last, config.dense_round64)


def _layer(i: int) -> str:
    return f"model.layers.{i}."


def _dense(i: int) -> str:
    return f"model.dense.layers.{i}."


def _norm_targets(i: int, config) -> list[str]:
    count = 3 if config.uses_separate_stream_norms(i) else 1
    return [f"{_layer(i)}attention_norms.{k}" for k in range(count)]


# ---------------------------------------------------------------------------------------------------- A: authors' PyTorch
# The authors' config.json key -> our config field.
_AUTHORS_CONFIG_KEYS = {
    "dim": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
    "intermediate_size": "intermediate_size", "head_dim": "head_dim", "norm_eps": "norm_eps", "rope_base": "rope_theta",
    "rotary_pct": "partial_rotary_factor", "use_qk_norm": "use_qk_norm", "use_parallel_residual": "use_parallel_residual",
    "dense_type": "dense_streams", "expand_last": "dense_expand_last", "round64": "dense_round64",
    "sepln": "separate_stream_norms", "block_size": "max_position_embeddings", "vocab_size": "vocab_size",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "tie_word_embeddings": "tie_word_embeddings",
}
_AUTHORS_REQUIRED_KEYS = ("dim", "n_head", "n_layer", "vocab_size")


def authors_config(authors: Mapping, source: TensorSource, family: Family, overrides: Mapping, warn: Callable[[str], None]):
    """Our config from the authors' `config.json`; the FFN re-allocation and dynamic dense flags come from shapes."""
    missing = [key for key in _AUTHORS_REQUIRED_KEYS if key not in authors]
    if missing:
        hint = " (it looks like a transformers config: is this already converted?)" if "hidden_size" in authors else ""
        raise ConversionError(f"the authors' config.json lacks {missing}{hint}")
    for key in _AUTHORS_REQUIRED_KEYS:
        value = authors[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            kind = f" (a {type(value).__name__})" if not isinstance(value, int) else ""
            raise ConversionError(f"the authors' config.json: {key} must be a positive integer, got {value!r}{kind}")
        limit = SIZE_LIMITS[_AUTHORS_CONFIG_KEYS.get(key, key)]
        if value > limit:  # before anything loops over the layers or reads a tensor
            raise ConversionError(f"the authors' config.json: {key} ({_AUTHORS_CONFIG_KEYS.get(key, key)}) is {value}, "
                                  f"above the limit of {limit}: the config is corrupt or crafted")
    derived = {field_name: authors[key] for key, field_name in _AUTHORS_CONFIG_KEYS.items() if key in authors}
    if "use_linear_bias" in authors:
        derived["attention_bias"] = derived["mlp_bias"] = authors["use_linear_bias"]
    if authors.get("n_local_heads", -1) not in (-1, None):  # gpt-fast's name for the key/value heads
        derived["num_key_value_heads"] = authors["n_local_heads"]
    if derived.get("head_dim") == authors["dim"] // authors["n_head"]:
        derived["head_dim"] = None
    if derived.get("dense_streams", "qkvr") not in STREAM_NAMES:
        raise ConversionError(f"config.json: dense_type {authors['dense_type']!r} is not supported (known: {sorted(STREAM_NAMES)})")
    unknown = sorted(set(authors) - set(_AUTHORS_CONFIG_KEYS) - _FILE_METADATA_KEYS - {"use_linear_bias", "n_local_heads"})
    if unknown:
        warn(f"config.json keys not used by the conversion: {unknown}")
    names = set(source.names())
    derived["dynamic_dense"] = "dynamic_dense.0.w1.weight" in names
    widths = [_need(source, f"layers.{i}.feed_forward.w1.weight", "the FFN widths").shape[0] for i in range(authors["n_layer"])]
    derived.update(_infer_ffn(widths, overrides.get("intermediate_size", authors.get("intermediate_size"))))
    return build_config(family, derived, overrides)


def authors_plan(config, family: Family) -> KeyPlan:
    plan = KeyPlan()
    D, V = config.hidden_size, config.vocab_size
    head, q_width, kv_width = _widths(config)
    # Runtime buffers of the authors' gpt-fast style code, in case a state dict was saved with them.
    plan.ignore(r"(^|\.)(freqs_cis|causal_mask)$|\.kv_cache\.[kv]_cache$", "runtime buffer, not a weight")
    plan.add("model.embed_tokens.weight", "tok_embeddings.weight", (V, D), "the token embedding")
    for i in range(config.num_hidden_layers):
        src, dst, block = f"layers.{i}.", _layer(i), f"block {i}"
        norms = [f"{src}attention_norms.{k}" for k in range(3)] if config.uses_separate_stream_norms(i) else [f"{src}attention_norm"]
        for source, target in zip(norms + [f"{src}ffn_norm"], _norm_targets(i, config) + [f"{dst}mlp_norm"]):
            for kind in ("weight", "bias") if family.norm_bias else ("weight",):
                plan.add(f"{target}.{kind}", f"{source}.{kind}", (D,), f"a pre-attention/FFN norm {kind} of {block}")
        for short, out_features, in_features in (("q", q_width, D), ("k", kv_width, D), ("v", kv_width, D), ("o", D, q_width)):
            what = f"the {short} projection of {block}"
            plan.add(f"{dst}self_attn.{short}_proj.weight", f"{src}attention.w{short}.weight", (out_features, in_features), what)
            if config.attention_bias:
                plan.add(f"{dst}self_attn.{short}_proj.bias", f"{src}attention.w{short}.bias", (out_features,), what + " (bias)")
        if config.use_qk_norm:
            for short in "qk":
                plan.add(f"{dst}self_attn.{short}_norm.weight", f"{src}attention.{short}_norm.weight", (head,), f"the {short}-norm scale of {block}")
        width = config.ffn_width(i)
        ffn = [("w1", "gate_proj", (width, D)), ("w3", "up_proj", (width, D)), ("w2", "down_proj", (D, width))] if family.gated_ffn else [
            ("w1", "up_proj", (width, D)), ("w2", "down_proj", (D, width))]
        for source, target, shape in ffn:
            what = f"the FFN {target} of {block} (width {width})"
            plan.add(f"{dst}mlp.{target}.weight", f"{src}feed_forward.{source}.weight", shape, what)
            if config.mlp_bias:
                plan.add(f"{dst}mlp.{target}.bias", f"{src}feed_forward.{source}.bias", shape[:1], what + " (bias)")
        _add_dense(plan, config, i, static=f"dense_bs.{i}", proj_in=f"dynamic_dense.{i}.w1.weight", proj_out=f"dynamic_dense.{i}.w2.weight")
    for kind in ("weight", "bias") if family.norm_bias else ("weight",):
        plan.add(f"model.norm.{kind}", f"norm.{kind}", (D,), f"the final norm {kind}")
    _add_head(plan, config, "output.weight")
    return plan


def _add_dense(plan: KeyPlan, config, i: int, *, static: str, proj_in: str, proj_out: str, layout: str = "torch") -> None:
    """The dense connection after block `i`. W1 / W2 are [h, D] / [C*J, h] in PyTorch; the JAX layouts store them
    transposed, W2 as [h, C*J] (Pax) or [h, C, J] (MaxText)."""
    c, j, h = _dense_shape(config, i)
    what = f"the dense connection after block {i}"
    plan.add(f"{_dense(i)}static_weights", static, (c, j), what + f" (static weights b, [C={c}, {j}])")
    if not config.dynamic_dense:
        return
    if layout in ("pax", "maxtext"):
        plan.add(f"{_dense(i)}proj_in.weight", proj_in, (config.hidden_size, h), what + " (W1)", _transposed)
        out_shape = (h, c * j) if layout == "pax" else (h, c, j)
        plan.add(f"{_dense(i)}proj_out.weight", proj_out, out_shape, what + " (W2)", _flatten_tail_transposed)
    else:
        plan.add(f"{_dense(i)}proj_in.weight", proj_in, (h, config.hidden_size), what + " (W1)")
        plan.add(f"{_dense(i)}proj_out.weight", proj_out, (c * j, h), what + " (W2)")


def _add_head(plan: KeyPlan, config, source: str) -> None:
    """The LM head; a tied head is not stored (a source copy of it is ignored)."""
    if config.tie_word_embeddings:
        plan.ignore(rf"^{re.escape(source)}$", "tied to the input embedding")
    else:
        plan.add("lm_head.weight", source, (config.vocab_size, config.hidden_size), "the LM head")


# ---------------------------------------------------------------------------------------------------- shape inference
def _need(source: TensorSource, name: str, purpose: str):
    if name not in set(source.names()):
        raise ConversionError(f"missing key {name!r} in {source.description} (needed to read {purpose})")
    return source.info(name)


def _count_layers(names: set[str], prefix: Callable[[int], str]) -> int:
    count = 0
    while any(name.startswith(prefix(count)) for name in names):
        count += 1
    if count == 0:
        raise ConversionError(f"no layers found (expected names starting with {prefix(0)!r})")
    return count


def _infer_ffn(widths: list[int], intermediate_size: int | None) -> dict:
    """`intermediate_size` and `ffn_width_reallocation` that give these per-layer FFN widths."""
    layers = len(widths)

    def reallocated(size: int) -> list[int]:
        return [reallocated_ffn_width(size, i, layers) for i in range(layers)]

    if intermediate_size is not None:
        if all(w == intermediate_size for w in widths):
            return {"intermediate_size": intermediate_size, "ffn_width_reallocation": False}
        if widths == reallocated(intermediate_size):
            return {"intermediate_size": intermediate_size, "ffn_width_reallocation": True}
        raise ConversionError(
            f"the FFN widths in the checkpoint {widths} match neither intermediate_size={intermediate_size} "
            "nor its depth re-allocation"
        )
    if len(set(widths)) == 1:
        return {"intermediate_size": widths[0], "ffn_width_reallocation": False}
    mean = sum(widths) / layers
    candidates = [size for size in range(min(widths), max(widths) + 1) if reallocated(size) == widths]
    if not candidates:
        raise ConversionError(
            f"the FFN widths in the checkpoint {widths} are neither constant nor a depth re-allocation; "
            "pass intermediate_size with --config"
        )
    return {
        "intermediate_size": min(candidates, key=lambda size: (size % 128 != 0, abs(size - mean))),
        "ffn_width_reallocation": True,
    }


def _infer_dense_widths(widths: list[int], num_streams: int) -> dict:
    """`dense_expand_last` / `dense_round64` that give these W1 widths (the released settings when several do)."""
    layers = len(widths)
    for expand_last in (True, False):
        for round64 in (True, False):
            expected = [
                dense_hidden_width(1 if i == layers - 1 else num_streams, i + 2, i == layers - 1, expand_last, round64)
                for i in range(layers)
            ]
            if expected == widths:
                return {"dense_expand_last": expand_last, "dense_round64": round64}
    raise ConversionError(f"the dense-connection widths in the checkpoint {widths} match no known width rule")


def _streams_from_static(shape: tuple[int, ...], name: str) -> str:
    by_count = {len(streams): key for key, streams in STREAM_NAMES.items()}
    if len(shape) != 2 or shape[0] not in by_count or shape[1] != 2:
        raise ConversionError(f"{name!r} has shape {list(shape)}, expected [C, 2] with C in {sorted(by_count)}")
    return by_count[shape[0]]


@dataclass(frozen=True)
class ShapeLayout:
    """Where a JAX layout keeps the arrays whose shapes or presence tell the config (names relative to
    `layer(i)` unless they take the layer index)."""

    embedding: str  # [V', D]
    layer: Callable[[int], str]
    query: str  # [D, N, H]
    key: str  # [D, N_kv, H]
    ffn_input: str  # [D, F_i]
    static: Callable[[int], str]  # b_i, [C_i, i + 2]
    dense_input: Callable[[int], str]  # W1_i, [D, h_i]
    q_norm: str
    stream_norm: str  # present in blocks with separate q/k/v norms
    attention_bias: str | None = None
    mlp_bias: str | None = None
    prenorm: str | None = None
    postnorm: str | None = None


def config_from_shapes(source: TensorSource, family: Family, overrides: Mapping, layout: ShapeLayout):
    """The config of a checkpoint without a config file: sizes from shapes, options from which arrays exist, the
    rest (norm eps, rotary, positions, special tokens) from the family defaults or `overrides`."""
    names = set(source.names())
    vocab, hidden = _need(source, layout.embedding, "the vocabulary and hidden sizes").shape
    layers = _count_layers(names, layout.layer)
    first = layout.layer(0)
    _, heads, head_dim = _need(source, first + layout.query, "the head count and width").shape
    kv_heads = _need(source, first + layout.key, "the key/value head count").shape[1]
    ffn = [_need(source, layout.layer(i) + layout.ffn_input, "the FFN widths").shape[1] for i in range(layers)]
    streams = _streams_from_static(_need(source, layout.static(0), "the number of dense streams").shape, layout.static(0))
    derived = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": None if heads * head_dim == hidden else head_dim,
        "use_qk_norm": first + layout.q_norm in names,
        "attention_bias": layout.attention_bias is not None and first + layout.attention_bias in names,
        "mlp_bias": layout.mlp_bias is not None and first + layout.mlp_bias in names,
        "dense_streams": streams,
        "dynamic_dense": first + layout.dense_input(0) in names,
        "separate_stream_norms_first_layer": first + layout.stream_norm in names,
        "separate_stream_norms": layout.layer(min(1, layers - 1)) + layout.stream_norm in names,
        "dense_prenorm": layout.prenorm is not None and layout.prenorm in names,
        "dense_postnorm": layout.postnorm is not None and layout.postnorm in names,
    }
    derived.update(_infer_ffn(ffn, overrides.get("intermediate_size")))
    if derived["dynamic_dense"]:
        widths = [_need(source, layout.layer(i) + layout.dense_input(i), "the dense widths").shape[1] for i in range(layers)]
        derived.update(_infer_dense_widths(widths, len(STREAM_NAMES[streams])))
    return build_config(family, derived, overrides)


# ---------------------------------------------------------------------------------------------------- B: Pax
PAX = "state.mdl_vars.params.lm"


def _pax_layer(i: int) -> str:
    return f"{PAX}.transformer.x_layers_{i}."


def pax_canonical_name(raw: str) -> str | None:
    """Pax names with or without the leading `state.` / `mdl_vars.`; None for everything else (optimizer state)."""
    name = raw.replace("/", ".")
    for prefix in ("state.mdl_vars.", "mdl_vars.", ""):
        if name.startswith(prefix + "params.lm."):
            return "state.mdl_vars." + name[len(prefix):]
    return None


PAX_SHAPES = ShapeLayout(
    embedding=f"{PAX}.embedding_lookup.emb_var", layer=_pax_layer, query="self_attention.query.w",
    key="self_attention.key.w", ffn_input="ff_layer.ffn_layer1.linear.w",
    static=lambda i: f"{PAX}.transformer.dense_conn_{i}", dense_input=lambda i: f"dynamic_dense_conn1_{i}",
    q_norm="self_attention.q_norm.scale", stream_norm="layer_norms_0.scale",
    attention_bias="self_attention.query.b", mlp_bias="ff_layer.ffn_layer1.bias.b",
)


def pax_family(source: TensorSource, model_type: str | None) -> Family:
    gated = any(".ff_layer.ffn_layer1_gate." in name for name in source.names())
    found = "muddformer" if gated else "muddpythia"
    if model_type is not None and model_type != found:
        raise ConversionError(
            f"--model-type {model_type} does not match the checkpoint: its FFN {'has' if gated else 'has no'} "
            f"gate (ffn_layer1_gate), i.e. {found}"
        )
    return FAMILIES[found]


def pax_plan(config, family: Family) -> KeyPlan:
    plan = KeyPlan()
    D, V = config.hidden_size, config.vocab_size
    head, _, _ = _widths(config)
    # MUDDPythia's Pax LayerNorms store `scale - 1`; qk-norm scales and MUDDFormer's RMSNorms are stored as they are.
    scale = _plus_one if family.norm_bias else None

    def norm(target: str, source: str, what: str) -> None:
        plan.add(f"{target}.weight", f"{source}.scale", (D,), what + " (scale)", scale)
        if family.norm_bias:
            plan.add(f"{target}.bias", f"{source}.bias", (D,), what + " (bias)")

    plan.add("model.embed_tokens.weight", f"{PAX}.embedding_lookup.emb_var", (AtLeast(V), D), "the token embedding", _first_rows(V))
    for i in range(config.num_hidden_layers):
        src, dst, block = _pax_layer(i), _layer(i), f"block {i}"
        sources = [f"{src}layer_norms_{k}" for k in range(3)] if config.uses_separate_stream_norms(i) else [f"{src}layer_norm"]
        for source, target in zip(sources, _norm_targets(i, config)):
            norm(target, source, f"a pre-attention norm of {block}")
        norm(f"{dst}mlp_norm", f"{src}ff_layer.layer_norm", f"the pre-FFN norm of {block}")
        attention = f"{src}self_attention."
        for name, short, heads in (("query", "q", config.num_attention_heads), ("key", "k", config.num_key_value_heads), ("value", "v", config.num_key_value_heads)):
            what = f"the {name} projection of {block}"
            plan.add(f"{dst}self_attn.{short}_proj.weight", f"{attention}{name}.w", (D, heads, head), what, _flatten_tail_transposed)
            if config.attention_bias:
                plan.add(f"{dst}self_attn.{short}_proj.bias", f"{attention}{name}.b", (heads, head), what + " (bias)", _flatten_tail)
        what = f"the output projection of {block}"
        plan.add(f"{dst}self_attn.o_proj.weight", f"{attention}post.w", (D, config.num_attention_heads, head), what, _flatten_tail)
        if config.attention_bias:
            plan.add(f"{dst}self_attn.o_proj.bias", f"{attention}post.b", (D,), what + " (bias)")
        if config.use_qk_norm:
            for short in "qk":
                plan.add(f"{dst}self_attn.{short}_norm.weight", f"{attention}{short}_norm.scale", (head,), f"the {short}-norm scale of {block}")
        width, ffn = config.ffn_width(i), f"{src}ff_layer."
        layers = [("ffn_layer1_gate", "gate_proj", (D, width)), ("ffn_layer1", "up_proj", (D, width)), ("ffn_layer2", "down_proj", (width, D))]
        for source, target, shape in layers if family.gated_ffn else [layers[1], layers[2]]:
            what = f"the FFN {target} of {block} (width {width})"
            plan.add(f"{dst}mlp.{target}.weight", f"{ffn}{source}.linear.w", shape, what, _transposed)
            if config.mlp_bias:
                plan.add(f"{dst}mlp.{target}.bias", f"{ffn}{source}.bias.b", shape[1:], what + " (bias)")
        _add_dense(
            plan, config, i, static=f"{PAX}.transformer.dense_conn_{i}", proj_in=f"{src}dynamic_dense_conn1_{i}",
            proj_out=f"{src}dynamic_dense_conn2_{i}", layout="pax",
        )
    norm("model.norm", f"{PAX}.final_ln", "the final norm")
    plan.add("lm_head.weight", f"{PAX}.softmax.logits_ffn.linear.w", (D, AtLeast(V)), "the LM head", _first_columns_transposed(V))
    return plan


# ---------------------------------------------------------------------------------------------------- C: MaxText
def _maxtext_layer(i: int) -> str:
    return f"params.decoder.layers_{i}."


def maxtext_canonical_name(raw: str) -> str | None:
    """Tree paths joined by ".", with MaxText's `params` nesting (and the authors' `state` item) reduced to one
    `params.` prefix; None for what is not a parameter (optimizer state, step)."""
    parts = raw.replace("/", ".").split(".")
    if parts and parts[0] == "state":
        parts = parts[1:]
    while parts and parts[0] == "params":
        parts = parts[1:]
    if not parts or parts[0] not in ("decoder", "token_embedder"):
        return None
    return "params." + ".".join(parts)


MAXTEXT_SHAPES = ShapeLayout(
    embedding="params.token_embedder.embedding", layer=_maxtext_layer, query="self_attention.query.kernel",
    key="self_attention.key.kernel", ffn_input="mlp.wi_0.kernel",
    static=lambda i: f"{_maxtext_layer(i)}dense_proj2.bias", dense_input=lambda i: "dynamic_dense_conn1.kernel",
    q_norm="self_attention.q_norm.scale", stream_norm="pre_self_attention_layer_norm_q.scale",
    prenorm="params.decoder.mudd_prenorm.scale", postnorm="params.decoder.mudd_postnorm_0.scale",
)


def maxtext_plan(config, family: Family) -> KeyPlan:
    plan = KeyPlan()
    D, V = config.hidden_size, config.vocab_size
    head, _, _ = _widths(config)
    plan.add("model.embed_tokens.weight", "params.token_embedder.embedding", (AtLeast(V), D), "the token embedding", _first_rows(V))
    for i in range(config.num_hidden_layers):
        src, dst, block = _maxtext_layer(i), _layer(i), f"block {i}"
        norm = f"{src}pre_self_attention_layer_norm"
        sources = [f"{norm}_{s}" for s in "qkv"] if config.uses_separate_stream_norms(i) else [norm]
        for source, target in zip(sources + [f"{src}post_self_attention_layer_norm"], _norm_targets(i, config) + [f"{dst}mlp_norm"]):
            plan.add(f"{target}.weight", f"{source}.scale", (D,), f"a pre-attention/FFN norm scale of {block}")
        attention = f"{src}self_attention."
        for name, short, heads in (("query", "q", config.num_attention_heads), ("key", "k", config.num_key_value_heads), ("value", "v", config.num_key_value_heads)):
            plan.add(f"{dst}self_attn.{short}_proj.weight", f"{attention}{name}.kernel", (D, heads, head), f"the {name} projection of {block}", _flatten_tail_transposed)
        plan.add(f"{dst}self_attn.o_proj.weight", f"{attention}out.kernel", (config.num_attention_heads, head, D), f"the output projection of {block}", _flatten_head_transposed)
        if config.use_qk_norm:
            for short in "qk":
                plan.add(f"{dst}self_attn.{short}_norm.weight", f"{attention}{short}_norm.scale", (head,), f"the {short}-norm scale of {block}")
        width = config.ffn_width(i)
        for source, target, shape in (("wi_0", "gate_proj", (D, width)), ("wi_1", "up_proj", (D, width)), ("wo", "down_proj", (width, D))):
            plan.add(f"{dst}mlp.{target}.weight", f"{src}mlp.{source}.kernel", shape, f"the FFN {target} of {block} (width {width})", _transposed)
        _add_dense(
            plan, config, i, static=f"{src}dense_proj2.bias", proj_in=f"{src}dynamic_dense_conn1.kernel",
            proj_out=f"{src}dynamic_dense_conn2.kernel", layout="maxtext",
        )
        if config.dense_prenorm and config.dynamic_dense:
            plan.add(f"{_dense(i)}weight_norm.weight", f"{src}pre_dense_proj1_norm.scale", (D,), f"the dense weight-generator norm after {block}")
        if config.dense_postnorm:
            plan.add(f"{_dense(i)}post_norm.weight", f"params.decoder.mudd_postnorm_{i}.scale", (D,), f"the dense post-norm after {block}")
    if config.dense_prenorm:
        # One norm per depth j = 0..L: `mudd_prenorm` for the embedding X_0, `mudd_prenorm_{i}` for block i's output.
        plan.add("model.dense.state_norms.0.weight", "params.decoder.mudd_prenorm.scale", (D,), "the dense pre-norm of the embedding")
        for i in range(config.num_hidden_layers):
            plan.add(f"model.dense.state_norms.{i + 1}.weight", f"params.decoder.mudd_prenorm_{i}.scale", (D,), f"the dense pre-norm of block {i}'s output")
    plan.add("model.norm.weight", "params.decoder.decoder_norm.scale", (D,), "the final norm scale")
    plan.add("lm_head.weight", "params.decoder.logits_dense.kernel", (D, AtLeast(V)), "the LM head", _first_columns_transposed(V))
    return plan


# ---------------------------------------------------------------------------------------------------- D: plain models
# Fields that plain transformers configs and ours share by name.
_PLAIN_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "initializer_range", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def _muddified_config(config_class, source_config, **family_fields):
    """Our config computing the same function as the plain `source_config`: the shared fields, RoPE and attention
    implementation, and the MUDD options a plain model has no weights for (qk-norm, FFN re-allocation) off."""
    config = config_class(
        **{name: getattr(source_config, name) for name in _PLAIN_CONFIG_FIELDS},
        rope_parameters=dict(source_config.rope_parameters),
        use_qk_norm=False,
        ffn_width_reallocation=False,
        **family_fields,
    )
    config._attn_implementation = source_config._attn_implementation
    return config


def gpt_neox_config(source_config) -> MUDDPythiaConfig:
    """The MUDDPythia config computing the same function as a `GPTNeoXConfig`."""
    return _muddified_config(
        MUDDPythiaConfig, source_config, layer_norm_eps=source_config.layer_norm_eps, mlp_bias=True,
        use_parallel_residual=source_config.use_parallel_residual, hidden_dropout=source_config.hidden_dropout,
    )


def gpt_neox_canonical_name(name: str) -> str:
    """transformers 5 calls GPT-NeoX's head `lm_head` in memory but saves it as `embed_out` (CHECKPOINT_FORMATS D)."""
    return "embed_out.weight" if name == "lm_head.weight" else name


def gpt_neox_plan(config, lm_head: bool = True) -> KeyPlan:
    """GPTNeoXForCausalLM state dict -> MUDDPythia; the single input norm is copied to every stream norm.
    `lm_head=False`: the backbone only (a task model's head is mapped by `muddify`)."""
    D, V = config.hidden_size, config.vocab_size
    plan = KeyPlan(initialized=("model.dense",))
    plan.ignore(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$", "runtime buffer of older GPT-NeoX checkpoints")
    plan.add("model.embed_tokens.weight", "gpt_neox.embed_in.weight", (V, D), "the token embedding")
    for i in range(config.num_hidden_layers):
        src, dst, block = f"gpt_neox.layers.{i}.", _layer(i), f"block {i}"
        norms = _norm_targets(i, config)
        for kind in ("weight", "bias"):
            def shape(out_features: int, in_features: int) -> tuple[int, ...]:
                return (out_features, in_features) if kind == "weight" else (out_features,)

            plan.add([f"{n}.{kind}" for n in norms], f"{src}input_layernorm.{kind}", (D,), f"the input norm of {block}", _copies(len(norms)))
            plan.add(f"{dst}mlp_norm.{kind}", f"{src}post_attention_layernorm.{kind}", (D,), f"the post-attention norm of {block}")
            plan.add(f"{dst}mlp.up_proj.{kind}", f"{src}mlp.dense_h_to_4h.{kind}", shape(config.intermediate_size, D), f"the FFN input of {block}")
            plan.add(f"{dst}mlp.down_proj.{kind}", f"{src}mlp.dense_4h_to_h.{kind}", shape(D, config.intermediate_size), f"the FFN output of {block}")
            if kind == "bias" and not config.attention_bias:
                continue
            targets = [f"{dst}self_attn.{p}_proj.{kind}" for p in "qkv"]
            plan.add(targets, f"{src}attention.query_key_value.{kind}", shape(3 * D, D), f"the fused qkv projection of {block}", _split_heads_qkv(config.num_attention_heads))
            plan.add(f"{dst}self_attn.o_proj.{kind}", f"{src}attention.dense.{kind}", shape(D, D), f"the attention output of {block}")
    for kind in ("weight", "bias"):
        plan.add(f"model.norm.{kind}", f"gpt_neox.final_layer_norm.{kind}", (D,), "the final norm")
    if lm_head:
        _add_head(plan, config, "embed_out.weight")
    return plan


def llama_config(source_config) -> MUDDFormerConfig:
    """The MUDDFormer config computing the same function as a `LlamaConfig`."""
    return _muddified_config(
        MUDDFormerConfig, source_config, rms_norm_eps=source_config.rms_norm_eps, mlp_bias=source_config.mlp_bias,
        num_key_value_heads=source_config.num_key_value_heads, head_dim=getattr(source_config, "head_dim", None),
        use_parallel_residual=False,
    )


def llama_plan(config, lm_head: bool = True) -> KeyPlan:
    """LlamaForCausalLM state dict -> MUDDFormer; the single input norm is copied to every stream norm.
    `lm_head=False`: the backbone only (a task model's head is mapped by `muddify`)."""
    plan = KeyPlan(initialized=("model.dense",))
    D, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    _, q_width, kv_width = _widths(config)
    plan.ignore(r"\.rotary_emb\.inv_freq$", "runtime buffer of older Llama checkpoints")
    plan.add("model.embed_tokens.weight", "model.embed_tokens.weight", (V, D), "the token embedding")
    for i in range(config.num_hidden_layers):
        layer, block = _layer(i), f"block {i}"
        norms = _norm_targets(i, config)
        plan.add([f"{n}.weight" for n in norms], f"{layer}input_layernorm.weight", (D,), f"the input norm of {block}", _copies(len(norms)))
        plan.add(f"{layer}mlp_norm.weight", f"{layer}post_attention_layernorm.weight", (D,), f"the post-attention norm of {block}")
        for short, shape in (("q", (q_width, D)), ("k", (kv_width, D)), ("v", (kv_width, D)), ("o", (D, q_width))):
            name = f"{layer}self_attn.{short}_proj."
            plan.add(name + "weight", name + "weight", shape, f"the {short} projection of {block}")
            if config.attention_bias:
                plan.add(name + "bias", name + "bias", shape[:1], f"the {short} projection bias of {block}")
        for short, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            name = f"{layer}mlp.{short}_proj."
            plan.add(name + "weight", name + "weight", shape, f"the FFN {short} projection of {block}")
            if config.mlp_bias:
                plan.add(name + "bias", name + "bias", shape[:1], f"the FFN {short} projection bias of {block}")
    plan.add("model.norm.weight", "model.norm.weight", (D,), "the final norm")
    if lm_head:
        _add_head(plan, config, "lm_head.weight")
    return plan
