"""An independent float64 reference of MUDD_SPEC sections 1-2, written plainly (loops allowed, no model code).

Parameters come in a neutral structure (`SpecParams`) so that tests can feed it from our models *or* directly
from a checkpoint's own names:

    {
      "embed": [V, D], "head": [V, D], "final_norm": (weight, bias-or-None),
      "layers": [ {                                   # one per block
          "attn_norms": [(w, b-or-None), ...],        # 1 shared norm or 3 (q, k, v)
          "wq", "wk", "wv", "wo": [out, in]; "bq", "bk", "bv", "bo": [out] or None,
          "q_norm", "k_norm": [head_dim] or None,
          "ffn_norm": (w, b-or-None),
          "w1": [F, D], "b1": [F] or None, "w2": [D, F], "b2": [D] or None, "w3": [F, D] (SwiGLU only),
      } ],
      "dense": [ {"b": [C, J], "W1": [h, D] or None, "W2": [C*J, h] or None,
                  "norm_scale": [D] or None,          # mudd_prenorm: learned scale of the generator's norm
                  "post_scale": [D] or None } ],      # mudd_postnorm
      "state_scales": [[D]] * (L + 1) or None,        # mudd_prenorm per-depth norms
    }
"""

from __future__ import annotations

import math

import torch


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def _rms_norm(x, weight, eps):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def reference_logits(
    params: dict,
    input_ids: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int,
    rotary_ndims: int,
    rope_theta: float = 10000.0,
    eps: float,
    norm: str = "layernorm",          # "layernorm" (Pythia) or "rmsnorm" (MUDDFormer)
    ffn: str = "gelu",                # "gelu" or "swiglu"
    parallel_residual: bool = True,
) -> torch.Tensor:
    """Logits `[batch, seq, V]` in float64 for a causal MUDD decoder, no padding, positions 0..T-1."""
    p = {k: v for k, v in params.items()}
    num_kv_heads = num_kv_heads or num_heads
    ids = input_ids
    batch, seq = ids.shape

    def normalize(x, wb):
        weight, bias = wb
        if norm == "layernorm":
            return _layer_norm(x, weight, bias, eps)
        return _rms_norm(x, weight, eps)

    def rotary(x):  # x [T, H]
        half = rotary_ndims // 2
        out = x.clone()
        for t in range(seq):
            for d in range(half):
                angle = t / rope_theta ** (2 * d / rotary_ndims)
                a, b = x[t, d], x[t, d + half]
                out[t, d] = a * math.cos(angle) - b * math.sin(angle)
                out[t, d + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x0 = p["embed"][ids]
    states = [x0]
    if p.get("state_scales") is not None:
        agg_states = [_rms_norm(x0, p["state_scales"][0], eps)]
    else:
        agg_states = [x0]
    streams = [x0, x0, x0, x0]
    num_layers = len(p["layers"])
    for i, layer in enumerate(p["layers"]):
        q_in, k_in, v_in, r = streams
        norms = layer["attn_norms"]
        if len(norms) == 1:
            norms = norms * 3
        nq, nk, nv = normalize(q_in, norms[0]), normalize(k_in, norms[1]), normalize(v_in, norms[2])
        q = _linear(nq, layer["wq"], layer.get("bq")).view(batch, seq, num_heads, head_dim)
        k = _linear(nk, layer["wk"], layer.get("bk")).view(batch, seq, num_kv_heads, head_dim)
        v = _linear(nv, layer["wv"], layer.get("bv")).view(batch, seq, num_kv_heads, head_dim)
        attn = torch.zeros(batch, seq, num_heads, head_dim, dtype=x0.dtype)
        group = num_heads // num_kv_heads
        for bi in range(batch):
            for h in range(num_heads):
                qh, kh, vh = q[bi, :, h], k[bi, :, h // group], v[bi, :, h // group]
                if layer.get("q_norm") is not None:
                    qh = _rms_norm(qh, layer["q_norm"], eps)
                    kh = _rms_norm(kh, layer["k_norm"], eps)
                qh, kh = rotary(qh), rotary(kh)
                scores = qh @ kh.T / math.sqrt(head_dim)
                scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
                attn[bi, :, h] = torch.softmax(scores, -1) @ vh
        attn_out = _linear(attn.reshape(batch, seq, num_heads * head_dim), layer["wo"], layer.get("bo"))

        def feed_forward(x):
            if ffn == "gelu":
                return _linear(_gelu(_linear(x, layer["w1"], layer.get("b1"))), layer["w2"], layer.get("b2"))
            gate = _linear(x, layer["w1"])
            return _linear(gate * torch.sigmoid(gate) * _linear(x, layer["w3"]), layer["w2"])

        if parallel_residual:
            out = r + attn_out + feed_forward(normalize(r, layer["ffn_norm"]))
        else:
            h = r + attn_out
            out = h + feed_forward(normalize(h, layer["ffn_norm"]))
        states.append(out)
        if p.get("state_scales") is not None:
            agg_states.append(_rms_norm(out, p["state_scales"][i + 1], eps))
        else:
            agg_states.append(out)

        dense = p["dense"][i]
        num_streams = 1 if i == num_layers - 1 else dense["b"].shape[0]
        num_states = i + 2
        weights = dense["b"].expand(batch, seq, num_streams, num_states).clone()
        if dense.get("W1") is not None:
            xn = _rms_norm(out, dense.get("norm_scale"), eps)
            a = _linear(_gelu(_linear(xn, dense["W1"])), dense["W2"])
            weights = weights + a.view(batch, seq, num_streams, num_states)
        mixed = []
        for c in range(num_streams):
            total = torch.zeros_like(out)
            for j in range(num_states):
                total = total + weights[..., c, j : j + 1] * agg_states[j]
            mixed.append(total)
        if dense.get("post_scale") is not None:
            mixed[-1] = out + _rms_norm(mixed[-1], dense["post_scale"], eps)
        streams = mixed * 4 if num_streams == 1 else mixed
    final = normalize(streams[0], p["final_norm"])
    return final @ p["head"].T


def spec_params_from_model(model) -> dict:
    """Read our model's parameters (float64) into the neutral structure, by their documented names."""
    sd = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}
    cfg = model.config

    def get(name):
        return sd.get(name)

    def norm_pair(prefix):
        return (sd[prefix + ".weight"], get(prefix + ".bias"))

    layers, dense = [], []
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        n_norms = 3 if f"{pre}attention_norms.1.weight" in sd else 1
        layer = {
            "attn_norms": [norm_pair(f"{pre}attention_norms.{j}") for j in range(n_norms)],
            "ffn_norm": norm_pair(f"{pre}mlp_norm"),
            "q_norm": get(f"{pre}self_attn.q_norm.weight"),
            "k_norm": get(f"{pre}self_attn.k_norm.weight"),
        }
        for short, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            layer["w" + short] = sd[f"{pre}self_attn.{name}.weight"]
            layer["b" + short] = get(f"{pre}self_attn.{name}.bias")
        if f"{pre}mlp.gate_proj.weight" in sd:
            layer["w1"], layer["w3"] = sd[f"{pre}mlp.gate_proj.weight"], sd[f"{pre}mlp.up_proj.weight"]
            layer["w2"] = sd[f"{pre}mlp.down_proj.weight"]
        else:
            layer["w1"], layer["b1"] = sd[f"{pre}mlp.up_proj.weight"], get(f"{pre}mlp.up_proj.bias")
            layer["w2"], layer["b2"] = sd[f"{pre}mlp.down_proj.weight"], get(f"{pre}mlp.down_proj.bias")
        layers.append(layer)
        dpre = f"model.dense.layers.{i}."
        dense.append(
            {
                "b": sd[dpre + "static_weights"],
                "W1": get(dpre + "proj_in.weight"),
                "W2": get(dpre + "proj_out.weight"),
                "norm_scale": get(dpre + "weight_norm.weight"),
                "post_scale": get(dpre + "post_norm.weight"),
            }
        )
    state_scales = None
    if "model.dense.state_norms.0.weight" in sd:
        state_scales = [sd[f"model.dense.state_norms.{j}.weight"] for j in range(cfg.num_hidden_layers + 1)]
    return {
        "embed": sd["model.embed_tokens.weight"],
        "head": sd["lm_head.weight"],
        "final_norm": norm_pair("model.norm"),
        "layers": layers,
        "dense": dense,
        "state_scales": state_scales,
    }


def randomize_(model, seed: int = 0, scale: float = 0.3) -> None:
    """Give every parameter random, non-identity values (norm scales around 1, dense weights far from one-hot)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("static_weights"):
                param.copy_(0.5 * noise + 0.5)
            else:
                param.copy_(scale * noise / max(1.0, param.shape[-1] ** 0.5) * 4)
