"""An independent float64 reference of MUDDViT (MUDD_SPEC sections 1 and 4), written plainly with loops.

Parameters come in a neutral structure so that tests can feed it from our models (`vit_params_from_model`) or
straight from a Google JAX ViT `.npz` by its own names and layout (`vit_params_from_npz`):

    {
      "patch_weight": [D, C, ph, pw], "patch_bias": [D], "cls": [D], "positions": [1 + N, D],
      "layers": [ {
          "attn_norms": [(w, b)] or [(w, b)] * 3,     # one shared pre-attention norm, or one per q/k/v stream
          "wq", "wk", "wv", "wo": [out, in]; "bq", "bk", "bv": [out] or None; "bo": [D],
          "mlp_norm": (w, b), "w1": [F, D], "b1": [F], "w2": [D, F], "b2": [D],
      } ],
      "dense": [ {"b": [C, J], "W1": [h, D] or None, "W2": [C*J, h] or None} ] or None (None: plain residual ViT),
      "final_norm": (w, b), "head": ([K, D], [K]) or None,
    }
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _activation(x, name):
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"reference has no activation {name!r}")


def _patch_embed(pixels, weight, bias):
    """Row-major patches, each the dot product of its pixels with the filter: [B, C, H, W] -> [B, N, D]."""
    hidden, channels, ph, pw = weight.shape
    batch, _, height, width = pixels.shape
    rows, cols = height // ph, width // pw
    out = torch.zeros(batch, rows * cols, hidden, dtype=torch.float64)
    flat_weight = weight.reshape(hidden, -1)
    for r in range(rows):
        for c in range(cols):
            patch = pixels[:, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].reshape(batch, -1)
            out[:, r * cols + c] = patch @ flat_weight.T + bias
    return out


def reference_vit_logits(
    params: dict,
    pixel_values: torch.Tensor,
    *,
    num_heads: int,
    eps: float,
    dense_eps: float = 1e-6,
    act: str = "gelu",
) -> torch.Tensor:
    """Logits `[batch, K]` (or the final-normed class token `[batch, D]` without a head) in float64.

    The image must have the size the position embeddings were made for (no interpolation here).
    """
    pixels = pixel_values.to(torch.float64)
    batch = pixels.shape[0]
    x = _patch_embed(pixels, params["patch_weight"], params["patch_bias"])
    x = torch.cat([params["cls"].reshape(1, 1, -1).expand(batch, 1, -1), x], dim=1) + params["positions"]
    seq, hidden = x.shape[1], x.shape[2]
    head_dim = hidden // num_heads

    states = [x]
    streams = [x, x, x, x]
    num_layers = len(params["layers"])
    for i, layer in enumerate(params["layers"]):
        q_in, k_in, v_in, residual = streams
        norms = layer["attn_norms"] * 3 if len(layer["attn_norms"]) == 1 else layer["attn_norms"]
        q = _layer_norm(q_in, *norms[0], eps) @ layer["wq"].T
        k = _layer_norm(k_in, *norms[1], eps) @ layer["wk"].T
        v = _layer_norm(v_in, *norms[2], eps) @ layer["wv"].T
        for proj, bias_name in ((q, "bq"), (k, "bk"), (v, "bv")):
            if layer.get(bias_name) is not None:
                proj += layer[bias_name]
        attn = torch.zeros(batch, seq, hidden, dtype=torch.float64)
        for b in range(batch):
            for h in range(num_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
                attn[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
        h_state = residual + attn @ layer["wo"].T + layer["bo"]
        mlp_hidden = _activation(_layer_norm(h_state, *layer["mlp_norm"], eps) @ layer["w1"].T + layer["b1"], act)
        out = h_state + mlp_hidden @ layer["w2"].T + layer["b2"]
        states.append(out)

        if params.get("dense") is None:
            streams = [out, out, out, out]
            continue
        dense = params["dense"][i]
        num_streams, num_states = (1 if i == num_layers - 1 else dense["b"].shape[0]), i + 2
        weights = dense["b"].expand(batch, seq, num_streams, num_states).clone()
        if dense.get("W1") is not None:
            normed = out / torch.sqrt((out * out).mean(-1, keepdim=True) + dense_eps)
            a = _activation(normed @ dense["W1"].T, "gelu") @ dense["W2"].T
            weights = weights + a.view(batch, seq, num_streams, num_states)
        mixed = []
        for c in range(num_streams):
            total = torch.zeros_like(out)
            for j in range(num_states):
                total = total + weights[..., c, j : j + 1] * states[j]
            mixed.append(total)
        streams = mixed * 4 if num_streams == 1 else mixed

    cls_state = _layer_norm(streams[0], *params["final_norm"], eps)[:, 0]
    if params.get("head") is None:
        return cls_state
    head_weight, head_bias = params["head"]
    return cls_state @ head_weight.T + head_bias


def _float64_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}


def _norm(sd: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sd[prefix + ".weight"], sd[prefix + ".bias"]


def _embeddings_and_head(sd: dict) -> dict:
    """Entries both models name alike (transformers ViT layout, which MUDDViT keeps for these)."""
    return {
        "patch_weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "cls": sd["vit.embeddings.cls_token"].reshape(-1),
        "positions": sd["vit.embeddings.position_embeddings"][0],
        "final_norm": _norm(sd, "vit.layernorm"),
        "head": _norm(sd, "classifier") if "classifier.weight" in sd else None,
    }


def vit_params_from_model(model) -> dict:
    """Read a `MUDDViTForImageClassification`'s parameters (float64) by their documented names."""
    sd = _float64_state(model)
    layers, dense = [], []
    for i in range(model.config.num_hidden_layers):
        pre = f"vit.encoder.layers.{i}."
        n_norms = 3 if f"{pre}attention_norms.1.weight" in sd else 1
        layer = {
            "attn_norms": [_norm(sd, f"{pre}attention_norms.{j}") for j in range(n_norms)],
            "mlp_norm": _norm(sd, f"{pre}mlp_norm"),
            "w1": sd[f"{pre}mlp.up_proj.weight"], "b1": sd[f"{pre}mlp.up_proj.bias"],
            "w2": sd[f"{pre}mlp.down_proj.weight"], "b2": sd[f"{pre}mlp.down_proj.bias"],
        }
        for short in "qkvo":
            layer["w" + short] = sd[f"{pre}self_attn.{short}_proj.weight"]
            layer["b" + short] = sd.get(f"{pre}self_attn.{short}_proj.bias")
        layers.append(layer)
        dpre = f"vit.encoder.dense.layers.{i}."
        dense.append({"b": sd[dpre + "static_weights"], "W1": sd.get(dpre + "proj_in.weight"),
                      "W2": sd.get(dpre + "proj_out.weight")})
    return {**_embeddings_and_head(sd), "layers": layers, "dense": dense}


def vit_params_from_transformers_vit(model) -> dict:
    """Read transformers' `ViTForImageClassification` (float64) into the neutral structure (plain residual)."""
    sd = _float64_state(model)
    layers = []
    for i in range(model.config.num_hidden_layers):
        pre = f"vit.layers.{i}."
        layer = {"attn_norms": [_norm(sd, pre + "layernorm_before")], "mlp_norm": _norm(sd, pre + "layernorm_after"),
                 "w1": sd[pre + "mlp.fc1.weight"], "b1": sd[pre + "mlp.fc1.bias"],
                 "w2": sd[pre + "mlp.fc2.weight"], "b2": sd[pre + "mlp.fc2.bias"]}
        for short in "qkvo":
            layer["w" + short] = sd[f"{pre}attention.{short}_proj.weight"]
            layer["b" + short] = sd.get(f"{pre}attention.{short}_proj.bias")
        layers.append(layer)
    return {**_embeddings_and_head(sd), "layers": layers, "dense": None}


def vit_params_from_npz(arrays: dict[str, np.ndarray]) -> dict:
    """Read a Google JAX ViT checkpoint's arrays (vit_jax names, flax layouts) into the neutral structure.

    Flax `Dense` kernels are `[in, out]`; attention kernels are `[D, heads, head_dim]` (query/key/value) and
    `[heads, head_dim, D]` (out); the patch `Conv` kernel is `[ph, pw, C, D]` applied to NHWC images.
    """
    t = lambda name: torch.from_numpy(np.asarray(arrays[name], dtype=np.float64))  # noqa: E731
    pair = lambda prefix: (t(prefix + "/scale"), t(prefix + "/bias"))  # noqa: E731
    num_layers = len({k.split("/")[1] for k in arrays if k.startswith("Transformer/encoderblock_")})
    layers = []
    for i in range(num_layers):
        pre = f"Transformer/encoderblock_{i}/"
        attn = pre + "MultiHeadDotProductAttention_1/"
        layer = {"attn_norms": [pair(pre + "LayerNorm_0")], "mlp_norm": pair(pre + "LayerNorm_2")}
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            kernel = t(attn + name + "/kernel")  # [D, N, H]: output feature n * H + h
            layer["w" + short] = torch.einsum("dnh->nhd", kernel).reshape(-1, kernel.shape[0])
            layer["b" + short] = t(attn + name + "/bias").reshape(-1)
        out_kernel = t(attn + "out/kernel")  # [N, H, D]: input feature n * H + h
        layer["wo"] = torch.einsum("nhd->dnh", out_kernel).reshape(out_kernel.shape[-1], -1)
        layer["bo"] = t(attn + "out/bias")
        for index, short in ((0, "1"), (1, "2")):
            layer["w" + short] = t(f"{pre}MlpBlock_3/Dense_{index}/kernel").T
            layer["b" + short] = t(f"{pre}MlpBlock_3/Dense_{index}/bias")
        layers.append(layer)
    return {
        "patch_weight": torch.einsum("ijcd->dcij", t("embedding/kernel")),
        "patch_bias": t("embedding/bias"),
        "cls": t("cls").reshape(-1),
        "positions": t("Transformer/posembed_input/pos_embedding")[0],
        "layers": layers,
        "dense": None,
        "final_norm": pair("Transformer/encoder_norm"),
        "head": (t("head/kernel").T, t("head/bias")),
    }
