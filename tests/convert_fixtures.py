"""Synthetic checkpoints in the authors' layouts (CHECKPOINT_FORMATS.md A, B, C) and the float64 spec parameters
read back from them by the *source* names, written independently of the converter.

Every tensor is random (no identities: norm scales around 1, dense weights far from one-hot, non-zero W2), and the
layers differ in width (FFN re-allocation, dense widths grow with depth), so a transposed, swapped or misplaced
tensor changes the logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

try:  # imported as a sibling module by the tests, relatively when copied next to a fake authors' modeling file
    from .mudd_reference import reference_logits
except ImportError:
    from mudd_reference import reference_logits


@dataclass(frozen=True)
class Shapes:
    """A tiny model of one family, in the spec's terms."""

    family: str = "muddpythia"
    vocab: int = 61
    padded_vocab: int = 64  # Pax/MaxText embeddings may have more rows than the vocabulary
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    layers: int = 3
    intermediate: int = 256  # re-allocated widths 128, 256, 384
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    eps: float = 1e-5
    parallel_residual: bool = True
    first_layer_norms: bool = False  # MaxText: block 0 also has separate q/k/v norms
    prenorm: bool = False
    postnorm: bool = False
    qk_norm: bool = True

    @property
    def gated(self) -> bool:
        return self.family == "muddformer"

    @property
    def biases(self) -> bool:
        return self.family == "muddpythia"

    def ffn(self, i: int) -> int:
        return round(self.intermediate * (i / (self.layers - 1) + 0.5) / 128) * 128

    def streams(self, i: int) -> int:
        return 1 if i == self.layers - 1 else 4

    def dense_width(self, i: int) -> int:  # expand_last and round64, as released
        width = self.streams(i) * (i + 2) * (4 if i == self.layers - 1 else 1)
        return (width // 64 + 1) * 64

    def separate_norms(self, i: int) -> bool:
        return i > 0 or self.first_layer_norms


FORMER = Shapes(family="muddformer", rotary_pct=1.0, eps=1e-6, parallel_residual=False)


class _Random:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float64) * std

    def weight(self, shape, fan_in: int | None = None, gain: float = 1.0) -> torch.Tensor:
        return self.normal(shape, gain / math.sqrt(fan_in or shape[-1]))

    def scale(self, size: int) -> torch.Tensor:
        return 1.0 + self.normal((size,), 0.2)

    def bias(self, size) -> torch.Tensor:
        return self.normal(size, 0.1)

    def static(self, shape) -> torch.Tensor:
        return 0.5 + self.normal(shape, 0.5)


def reference(params: dict, shapes: Shapes, input_ids: torch.Tensor) -> torch.Tensor:
    return reference_logits(
        params, input_ids, num_heads=shapes.heads, num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim,
        rotary_ndims=int(shapes.head_dim * shapes.rotary_pct), rope_theta=shapes.rope_theta, eps=shapes.eps,
        norm="rmsnorm" if shapes.gated else "layernorm", ffn="swiglu" if shapes.gated else "gelu",
        parallel_residual=shapes.parallel_residual,
    )


def as_float64(tensors: dict) -> dict:
    return {name: torch.as_tensor(value).to(torch.float64) for name, value in tensors.items()}


# ---------------------------------------------------------------------------------------------------- A: authors' PyTorch
def authors_tensors(s: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    r, D, H = _Random(seed), s.hidden, s.head_dim
    t = {"tok_embeddings.weight": r.normal((s.vocab, D), 1.0)}
    for i in range(s.layers):
        p = f"layers.{i}."
        norms = [f"attention_norms.{k}" for k in range(3)] if i > 0 else ["attention_norm"]
        for norm in norms + ["ffn_norm"]:
            t[f"{p}{norm}.weight"] = r.scale(D)
            if s.biases:
                t[f"{p}{norm}.bias"] = r.bias(D)
        for w, out_features in (("q", s.heads * H), ("k", s.kv_heads * H), ("v", s.kv_heads * H), ("o", D)):
            in_features = s.heads * H if w == "o" else D
            t[f"{p}attention.w{w}.weight"] = r.weight((out_features, in_features))
            if s.biases:
                t[f"{p}attention.w{w}.bias"] = r.bias(out_features)
        t[f"{p}attention.q_norm.weight"], t[f"{p}attention.k_norm.weight"] = r.scale(H), r.scale(H)
        F = s.ffn(i)
        t[f"{p}feed_forward.w1.weight"], t[f"{p}feed_forward.w2.weight"] = r.weight((F, D)), r.weight((D, F))
        if s.gated:
            t[f"{p}feed_forward.w3.weight"] = r.weight((F, D))
        else:
            t[f"{p}feed_forward.w1.bias"], t[f"{p}feed_forward.w2.bias"] = r.bias(F), r.bias(D)
        C, J, h = s.streams(i), i + 2, s.dense_width(i)
        t[f"dense_bs.{i}"] = r.static((C, J))
        t[f"dynamic_dense.{i}.w1.weight"] = r.weight((h, D))
        t[f"dynamic_dense.{i}.w2.weight"] = r.weight((C * J, h), gain=0.5)
    t["norm.weight"] = r.scale(D)
    if s.biases:
        t["norm.bias"] = r.bias(D)
    t["output.weight"] = r.weight((s.vocab, D))
    return t


def authors_config_json(s: Shapes) -> dict:
    config = {
        "model_type": s.family, "dim": s.hidden, "n_head": s.heads, "n_layer": s.layers,
        "intermediate_size": s.intermediate, "head_dim": s.head_dim, "norm_eps": s.eps, "rope_base": s.rope_theta,
        "use_qk_norm": True, "use_parallel_residual": s.parallel_residual, "use_linear_bias": s.biases,
        "dense_type": "qkvr", "expand_last": True, "round64": True, "sepln": True, "block_size": 64,
        "vocab_size": s.vocab, "bos_token_id": 0, "eos_token_id": 0,
        "auto_map": {"AutoModelForCausalLM": f"modeling_{s.family}.{'MUDDPythia' if s.biases else 'MUDDFormer'}"},
    }
    if not s.gated:
        config["rotary_pct"] = s.rotary_pct
    return config


def spec_from_authors(t: dict, s: Shapes) -> dict:
    t = as_float64(t)
    layers, dense = [], []
    for i in range(s.layers):
        p = f"layers.{i}."
        norms = [f"attention_norms.{k}" for k in range(3)] if i > 0 else ["attention_norm"]
        layer = {
            "attn_norms": [(t[f"{p}{n}.weight"], t.get(f"{p}{n}.bias")) for n in norms],
            "ffn_norm": (t[f"{p}ffn_norm.weight"], t.get(f"{p}ffn_norm.bias")),
            "q_norm": t[f"{p}attention.q_norm.weight"], "k_norm": t[f"{p}attention.k_norm.weight"],
            "w1": t[f"{p}feed_forward.w1.weight"], "b1": t.get(f"{p}feed_forward.w1.bias"),
            "w2": t[f"{p}feed_forward.w2.weight"], "b2": t.get(f"{p}feed_forward.w2.bias"),
            "w3": t.get(f"{p}feed_forward.w3.weight"),
        }
        for w in "qkvo":
            layer["w" + w], layer["b" + w] = t[f"{p}attention.w{w}.weight"], t.get(f"{p}attention.w{w}.bias")
        layers.append(layer)
        dense.append({"b": t[f"dense_bs.{i}"], "W1": t[f"dynamic_dense.{i}.w1.weight"], "W2": t[f"dynamic_dense.{i}.w2.weight"]})
    return {
        "embed": t["tok_embeddings.weight"], "head": t["output.weight"], "final_norm": (t["norm.weight"], t.get("norm.bias")),
        "layers": layers, "dense": dense, "state_scales": None,
    }


def authors_reference_logits(folder, input_ids: torch.Tensor) -> torch.Tensor:
    """The float64 reference run straight from an authors' folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shapes = Shapes(
        family=config["model_type"], vocab=config["vocab_size"], hidden=config["dim"], heads=config["n_head"],
        kv_heads=config["n_head"], head_dim=config["head_dim"], layers=config["n_layer"],
        intermediate=config["intermediate_size"], rotary_pct=config.get("rotary_pct", 1.0), rope_theta=config["rope_base"],
        eps=config["norm_eps"], parallel_residual=config["use_parallel_residual"],
    )
    return reference(spec_from_authors(load_file(folder / "model.safetensors"), shapes), shapes, input_ids)


# Stands in for the authors' own modeling file, so that `--verify` has a runnable source model.
FAKE_AUTHORS_MODELING = '''
import torch

from .convert_fixtures import authors_reference_logits


class AuthorsModel(torch.nn.Module):
    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        return cls(folder)

    def forward(self, input_ids):
        return (authors_reference_logits(self.folder, input_ids).float(),)
'''


# ---------------------------------------------------------------------------------------------------- B: Pax
PAX = "state.mdl_vars.params.lm"


def pax_tensors(s: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pax names and layouts; MUDDPythia's LayerNorm scales stored as `scale - 1`."""
    r, D, N, H = _Random(seed), s.hidden, s.heads, s.head_dim
    ln = (lambda x: x - 1.0) if s.biases else (lambda x: x)
    t = {f"{PAX}.embedding_lookup.emb_var": r.normal((s.padded_vocab, D), 1.0)}
    for i in range(s.layers):
        T = f"{PAX}.transformer.x_layers_{i}."
        norms = [f"layer_norms_{k}" for k in range(3)] if s.separate_norms(i) else ["layer_norm"]
        for norm in norms + ["ff_layer.layer_norm"]:
            t[f"{T}{norm}.scale"] = ln(r.scale(D))
            if s.biases:
                t[f"{T}{norm}.bias"] = r.bias(D)
        for name, heads in (("query", N), ("key", s.kv_heads), ("value", s.kv_heads)):
            t[f"{T}self_attention.{name}.w"] = r.weight((D, heads, H), fan_in=D)
            if s.biases:
                t[f"{T}self_attention.{name}.b"] = r.bias((heads, H))
        t[f"{T}self_attention.post.w"] = r.weight((D, N, H), fan_in=N * H)
        if s.biases:
            t[f"{T}self_attention.post.b"] = r.bias(D)
        t[f"{T}self_attention.q_norm.scale"], t[f"{T}self_attention.k_norm.scale"] = r.scale(H), r.scale(H)
        F = s.ffn(i)
        ffn = ["ffn_layer1_gate", "ffn_layer1"] if s.gated else ["ffn_layer1"]
        for name in ffn:
            t[f"{T}ff_layer.{name}.linear.w"] = r.weight((D, F), fan_in=D)
        t[f"{T}ff_layer.ffn_layer2.linear.w"] = r.weight((F, D), fan_in=F)
        if s.biases:
            t[f"{T}ff_layer.ffn_layer1.bias.b"], t[f"{T}ff_layer.ffn_layer2.bias.b"] = r.bias(F), r.bias(D)
        C, J, h = s.streams(i), i + 2, s.dense_width(i)
        t[f"{PAX}.transformer.dense_conn_{i}"] = r.static((C, J))
        t[f"{T}dynamic_dense_conn1_{i}"] = r.weight((D, h), fan_in=D)
        t[f"{T}dynamic_dense_conn2_{i}"] = r.weight((h, C * J), fan_in=h, gain=0.5)
    t[f"{PAX}.final_ln.scale"] = ln(r.scale(D))
    if s.biases:
        t[f"{PAX}.final_ln.bias"] = r.bias(D)
    t[f"{PAX}.softmax.logits_ffn.linear.w"] = r.weight((D, s.padded_vocab), fan_in=D)
    return t


def spec_from_pax(t: dict, s: Shapes) -> dict:
    t, D, V = as_float64(t), s.hidden, s.vocab
    plus = 1.0 if s.biases else 0.0

    def norm(name):
        return (t[f"{name}.scale"] + plus, t.get(f"{name}.bias"))

    layers, dense = [], []
    for i in range(s.layers):
        T = f"{PAX}.transformer.x_layers_{i}."
        norms = [f"layer_norms_{k}" for k in range(3)] if s.separate_norms(i) else ["layer_norm"]
        a = f"{T}self_attention."
        layer = {
            "attn_norms": [norm(T + n) for n in norms], "ffn_norm": norm(f"{T}ff_layer.layer_norm"),
            "q_norm": t[f"{a}q_norm.scale"], "k_norm": t[f"{a}k_norm.scale"],
            "wo": t[f"{a}post.w"].reshape(D, -1), "bo": t.get(f"{a}post.b"),
            "w2": t[f"{T}ff_layer.ffn_layer2.linear.w"].T, "b2": t.get(f"{T}ff_layer.ffn_layer2.bias.b"),
        }
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            layer["w" + short] = t[f"{a}{name}.w"].reshape(D, -1).T
            bias = t.get(f"{a}{name}.b")
            layer["b" + short] = None if bias is None else bias.reshape(-1)
        if s.gated:
            layer["w1"], layer["w3"] = t[f"{T}ff_layer.ffn_layer1_gate.linear.w"].T, t[f"{T}ff_layer.ffn_layer1.linear.w"].T
        else:
            layer["w1"], layer["b1"] = t[f"{T}ff_layer.ffn_layer1.linear.w"].T, t[f"{T}ff_layer.ffn_layer1.bias.b"]
        layers.append(layer)
        dense.append({
            "b": t[f"{PAX}.transformer.dense_conn_{i}"],
            "W1": t[f"{T}dynamic_dense_conn1_{i}"].T, "W2": t[f"{T}dynamic_dense_conn2_{i}"].T,
        })
    return {
        "embed": t[f"{PAX}.embedding_lookup.emb_var"][:V], "head": t[f"{PAX}.softmax.logits_ffn.linear.w"].T[:V],
        "final_norm": norm(f"{PAX}.final_ln"), "layers": layers, "dense": dense, "state_scales": None,
    }


# ---------------------------------------------------------------------------------------------------- C: MaxText
def maxtext_tensors(s: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """MaxText tree paths ("/"-separated, as in the Orbax tree, `dense_proj2.bias` being one key)."""
    r, D, N, H = _Random(seed), s.hidden, s.heads, s.head_dim
    d = "params/decoder/"
    t = {"params/token_embedder/embedding": r.normal((s.padded_vocab, D), 1.0)}
    for i in range(s.layers):
        L = f"{d}layers_{i}/"
        norms = [f"pre_self_attention_layer_norm_{x}" for x in "qkv"] if s.separate_norms(i) else ["pre_self_attention_layer_norm"]
        for norm in norms + ["post_self_attention_layer_norm"]:
            t[f"{L}{norm}/scale"] = r.scale(D)
        for name, heads in (("query", N), ("key", s.kv_heads), ("value", s.kv_heads)):
            t[f"{L}self_attention/{name}/kernel"] = r.weight((D, heads, H), fan_in=D)
        t[f"{L}self_attention/out/kernel"] = r.weight((N, H, D), fan_in=N * H)
        if s.qk_norm:
            t[f"{L}self_attention/q_norm/scale"], t[f"{L}self_attention/k_norm/scale"] = r.scale(H), r.scale(H)
        F = s.ffn(i)
        t[f"{L}mlp/wi_0/kernel"], t[f"{L}mlp/wi_1/kernel"] = r.weight((D, F), fan_in=D), r.weight((D, F), fan_in=D)
        t[f"{L}mlp/wo/kernel"] = r.weight((F, D), fan_in=F)
        C, J, h = s.streams(i), i + 2, s.dense_width(i)
        t[f"{L}dense_proj2.bias"] = r.static((C, J))
        t[f"{L}dynamic_dense_conn1/kernel"] = r.weight((D, h), fan_in=D)
        t[f"{L}dynamic_dense_conn2/kernel"] = r.weight((h, C, J), fan_in=h, gain=0.5)
        if s.prenorm:
            t[f"{L}pre_dense_proj1_norm/scale"] = r.scale(D)
            t[f"{d}mudd_prenorm_{i}/scale"] = r.scale(D)
        if s.postnorm:
            t[f"{d}mudd_postnorm_{i}/scale"] = r.scale(D)
    if s.prenorm:
        t[f"{d}mudd_prenorm/scale"] = r.scale(D)
    t[f"{d}decoder_norm/scale"] = r.scale(D)
    t[f"{d}logits_dense/kernel"] = r.weight((D, s.padded_vocab), fan_in=D)
    return t


def spec_from_maxtext(t: dict, s: Shapes) -> dict:
    t, D, V, d = as_float64(t), s.hidden, s.vocab, "params/decoder/"
    layers, dense = [], []
    for i in range(s.layers):
        L = f"{d}layers_{i}/"
        norms = [f"pre_self_attention_layer_norm_{x}" for x in "qkv"] if s.separate_norms(i) else ["pre_self_attention_layer_norm"]
        a = f"{L}self_attention/"
        layer = {
            "attn_norms": [(t[f"{L}{n}/scale"], None) for n in norms],
            "ffn_norm": (t[f"{L}post_self_attention_layer_norm/scale"], None),
            "q_norm": t.get(f"{a}q_norm/scale"), "k_norm": t.get(f"{a}k_norm/scale"),
            "wo": t[f"{a}out/kernel"].reshape(-1, D).T,
            "w1": t[f"{L}mlp/wi_0/kernel"].T, "w3": t[f"{L}mlp/wi_1/kernel"].T, "w2": t[f"{L}mlp/wo/kernel"].T,
        }
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            layer["w" + short] = t[f"{a}{name}/kernel"].reshape(D, -1).T
        layers.append(layer)
        w2 = t[f"{L}dynamic_dense_conn2/kernel"]
        dense.append({
            "b": t[f"{L}dense_proj2.bias"], "W1": t[f"{L}dynamic_dense_conn1/kernel"].T, "W2": w2.reshape(w2.shape[0], -1).T,
            "norm_scale": t.get(f"{L}pre_dense_proj1_norm/scale"), "post_scale": t.get(f"{d}mudd_postnorm_{i}/scale"),
        })
    state_scales = None
    if s.prenorm:
        state_scales = [t[f"{d}mudd_prenorm/scale"]] + [t[f"{d}mudd_prenorm_{i}/scale"] for i in range(s.layers)]
    return {
        "embed": t["params/token_embedder/embedding"][:V], "head": t[f"{d}logits_dense/kernel"].T[:V],
        "final_norm": (t[f"{d}decoder_norm/scale"], None), "layers": layers, "dense": dense, "state_scales": state_scales,
    }


def with_(shapes: Shapes, **changes) -> Shapes:
    return replace(shapes, **changes)
