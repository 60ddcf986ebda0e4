"""Convert Google's released JAX ViT checkpoints (`.npz`, vit_jax naming) into a MUDDViT folder.

The plain ViT becomes the MUDDViT computing the same function (spec section 5: identity dense connections, the
single pre-attention LayerNorm copied to every stream norm), ready for fine-tuning. The folder holds `config.json`
(with `auto_map` for remote code), `model.safetensors`, the modeling files and the standard ViT image processor.

Layout read (flax conventions: `Dense` kernels `[in, out]`; D = hidden, N = heads, H = head dim, F = MLP width,
K = classes, P = 1 + patches):

    embedding/kernel [ph, pw, C, D] (HWIO conv), embedding/bias [D], cls [1, 1, D],
    Transformer/posembed_input/pos_embedding [1, P, D], Transformer/encoder_norm/{scale,bias} [D],
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias} [D]              (pre-attention)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel [D, N, H], .../bias [N, H]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel [N, H, D], .../bias [D]
    Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias} [D]              (pre-MLP)
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel [D, F], bias [F]; Dense_1/kernel [F, D], bias [D]
    head/kernel [D, K], head/bias [K]

Google's models use the tanh-approximate GELU and LayerNorm epsilon 1e-6 (flax defaults); the converted config says
so (`hidden_act="gelu_pytorch_tanh"`, `layer_norm_eps=1e-6`). Checkpoints with a `pre_logits` representation layer
(the original ImageNet-21k pre-training ones) or a ResNet stem (hybrids) have no MUDDViT counterpart and are refused.

    python -m modeling_muddpythia.convert_vit_npz ViT-S_16.npz muddvit-s16 [--dtype bfloat16] [--force] [--strict]
        [--config-overrides '{"id2label": {"0": "cat", ...}}']
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .configuration_muddvit import MUDDViTConfig
from .convert_io import ConversionError, NpzSource, TensorInfo
from .modeling_muddvit import MUDDViTForImageClassification, build_image_processor
from .muddify import build_from_plain_state
from .safe_output import (
    Claim, OutputError, check_replaceable, describe_os_error, display, remove_stale, same_or_nested, staged,
)


TOOL = "mudd-convert"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK = "Transformer/encoderblock_{}/"
ATTENTION = "MultiHeadDotProductAttention_1/"
# Fields a caller may override besides the config's own arguments.
EXTRA_OVERRIDES = {"id2label", "label2id", "problem_type"}


class CheckpointError(ValueError):
    """The input is not a ViT `.npz` checkpoint in the documented layout (message says what is wrong)."""


# ---------------------------------------------------------------------------------------------------- reading
def open_npz(path: Path) -> NpzSource:
    """The archive's members as named shapes and dtypes, from their `.npy` headers checked against the stored sizes
    (nothing is read yet), or `CheckpointError` naming the problem. Pickled content is never loaded."""
    try:
        with open(path, "rb") as handle:
            single = handle.read(6) == b"\x93NUMPY"
    except OSError as error:
        raise CheckpointError(f"{display(path)}: cannot read it: {error.strerror or error}") from error
    if single:
        raise CheckpointError(f"{display(path)} holds a single array (.npy), not an .npz archive of named arrays")
    try:
        source = NpzSource(path)
    except ConversionError as error:
        raise CheckpointError(str(error)) from None
    for name in source.names():
        dtype = source.info(name).dtype
        if not dtype.is_floating_point:
            source.close()
            raise CheckpointError(f"{display(path)}: array {name!r} has dtype {source.info(name).dtype_name}, "
                                  "expected floating point")
    return source


def read_arrays(source: NpzSource, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays `names` of an opened archive (bfloat16 ones as float32)."""
    arrays = {}
    for name in names:
        try:
            tensor = source.read(name)
        except ConversionError as error:
            raise CheckpointError(f"{error}; the file is truncated or corrupt") from None
        arrays[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return arrays


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` archive (sizes checked against the headers first; never unpickling)."""
    source = open_npz(Path(path))
    try:
        return read_arrays(source, source.names())
    finally:
        source.close()


def _shape(arrays: dict[str, np.ndarray], name: str, layout: list) -> tuple[int, ...]:
    """Shape of an array the architecture is read from; `layout` (numbers where known, else names) is what a
    missing or malformed array is reported against."""
    expected = "[" + ", ".join(str(item) for item in layout) + "]"
    if name not in arrays:
        raise CheckpointError(f"missing array {name!r} of shape {expected}, needed to infer the architecture")
    shape = arrays[name].shape
    if len(shape) != len(layout):
        raise CheckpointError(f"array {name!r} has shape {shape}, expected {expected}")
    return shape


def infer_config(arrays: dict[str, np.ndarray], config_overrides: dict | None = None) -> MUDDViTConfig:
    """The MUDDViT config of a vit_jax checkpoint, from its array shapes, with `config_overrides` applied."""
    patch_height, patch_width, num_channels, hidden = _shape(arrays, "embedding/kernel", ["ph", "pw", "C", "D"])
    block_ids = {int(m.group(1)) for name in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", name))}
    if not block_ids:
        raise CheckpointError("no 'Transformer/encoderblock_{i}/...' arrays: this is not a ViT checkpoint")
    _, num_heads, _ = _shape(arrays, BLOCK.format(0) + ATTENTION + "query/kernel", [hidden, "heads", "head_dim"])
    _, intermediate_size = _shape(arrays, BLOCK.format(0) + "MlpBlock_3/Dense_0/kernel", [hidden, "mlp"])
    _, num_positions, _ = _shape(arrays, "Transformer/posembed_input/pos_embedding", [1, "1 + patches", hidden])
    _, num_labels = _shape(arrays, "head/kernel", [hidden, "classes"])
    kwargs = {
        "hidden_size": hidden,
        "num_hidden_layers": max(block_ids) + 1,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "patch_size": patch_height if patch_height == patch_width else [patch_height, patch_width],
        "num_channels": num_channels,
        "num_labels": num_labels,
    }
    grid_side = math.isqrt(max(num_positions - 1, 0))
    if grid_side * grid_side == num_positions - 1 and patch_height == patch_width:
        kwargs["image_size"] = grid_side * patch_height
    overrides = dict(config_overrides or {})
    allowed = set(inspect.signature(MUDDViTConfig.__init__).parameters) - {"self", "kwargs"} | EXTRA_OVERRIDES
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; allowed: {sorted(allowed)}")
    if "id2label" in overrides:
        kwargs.pop("num_labels")
    kwargs.update(overrides)
    if "image_size" not in kwargs:
        raise CheckpointError(
            f"the {num_positions - 1} patch positions do not form a square grid of {patch_height}x{patch_width} "
            "patches: give `image_size` ([height, width]) in config_overrides"
        )
    return MUDDViTConfig(**kwargs)


def expected_shapes(config: MUDDViTConfig) -> dict[str, tuple[int, ...]]:
    """Every array of a vit_jax checkpoint for `config`, with its shape."""
    hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.attention_head_dim
    (patch_height, patch_width), (rows, cols) = config.patch_size_pair, config.patch_grid
    shapes = {
        "embedding/kernel": (patch_height, patch_width, config.num_channels, hidden),
        "embedding/bias": (hidden,),
        "cls": (1, 1, hidden),
        "Transformer/posembed_input/pos_embedding": (1, 1 + rows * cols, hidden),
        "Transformer/encoder_norm/scale": (hidden,),
        "Transformer/encoder_norm/bias": (hidden,),
        "head/kernel": (hidden, config.num_labels),
        "head/bias": (config.num_labels,),
    }
    for i in range(config.num_hidden_layers):
        block = BLOCK.format(i)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{block}{norm}/scale"] = shapes[f"{block}{norm}/bias"] = (hidden,)
        for name in ("query", "key", "value"):
            shapes[f"{block}{ATTENTION}{name}/kernel"] = (hidden, heads, head_dim)
            shapes[f"{block}{ATTENTION}{name}/bias"] = (heads, head_dim)
        shapes[f"{block}{ATTENTION}out/kernel"] = (heads, head_dim, hidden)
        shapes[f"{block}{ATTENTION}out/bias"] = (hidden,)
        shapes[f"{block}MlpBlock_3/Dense_0/kernel"] = (hidden, config.intermediate_size)
        shapes[f"{block}MlpBlock_3/Dense_0/bias"] = (config.intermediate_size,)
        shapes[f"{block}MlpBlock_3/Dense_1/kernel"] = (config.intermediate_size, hidden)
        shapes[f"{block}MlpBlock_3/Dense_1/bias"] = (hidden,)
    return shapes


def check_arrays(arrays: Mapping[str, TensorInfo | np.ndarray], config: MUDDViTConfig) -> None:
    """Names and shapes (from the headers, before anything is read) exactly as documented."""
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in arrays]
    if missing:
        listed = ", ".join(f"{name!r} {expected[name]}" for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"missing array(s) {listed}{more}")
    unexpected = sorted(set(arrays) - set(expected))
    if any(name.startswith("pre_logits/") for name in unexpected):
        raise CheckpointError(
            "the checkpoint has a 'pre_logits' representation layer (tanh MLP before the head), which MUDDViT does "
            "not have; use a checkpoint without it (e.g. one fine-tuned on ImageNet-1k)"
        )
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected array(s) {unexpected[:5]}{more}: not a plain ViT checkpoint of this layout")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise CheckpointError(f"array {name!r} has shape {arrays[name].shape}, expected {shape}")


def check_finite(arrays: dict[str, np.ndarray], *, strict: bool) -> None:
    """Non-finite values warn, or fail under `strict`."""
    non_finite = [name for name, array in arrays.items() if not np.isfinite(array).all()]
    if non_finite:
        message = f"non-finite values (NaN or inf) in {len(non_finite)} array(s): {non_finite[:5]}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)


def muddvit_state_dict(arrays: dict[str, np.ndarray], config: MUDDViTConfig) -> dict[str, torch.Tensor]:
    """Checked vit_jax arrays -> `MUDDViTForImageClassification` state dict (float32, torch layouts)."""
    hidden = config.hidden_size

    def tensor(name: str, *, transpose: bool = False, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        array = np.asarray(arrays[name], dtype=np.float32)
        array = array.reshape(shape) if shape is not None else array
        return torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))

    state = {
        # HWIO -> OIHW
        "vit.embeddings.patch_embeddings.projection.weight": torch.from_numpy(
            np.ascontiguousarray(np.asarray(arrays["embedding/kernel"], dtype=np.float32).transpose(3, 2, 0, 1))
        ),
        "vit.embeddings.patch_embeddings.projection.bias": tensor("embedding/bias"),
        "vit.embeddings.cls_token": tensor("cls"),
        "vit.embeddings.position_embeddings": tensor("Transformer/posembed_input/pos_embedding"),
        "vit.layernorm.weight": tensor("Transformer/encoder_norm/scale"),
        "vit.layernorm.bias": tensor("Transformer/encoder_norm/bias"),
        "classifier.weight": tensor("head/kernel", transpose=True),
        "classifier.bias": tensor("head/bias"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = BLOCK.format(i), f"vit.encoder.layers.{i}."
        for norm_idx in range(3 if config.uses_separate_stream_norms(i) else 1):
            state[f"{dst}attention_norms.{norm_idx}.weight"] = tensor(src + "LayerNorm_0/scale")
            state[f"{dst}attention_norms.{norm_idx}.bias"] = tensor(src + "LayerNorm_0/bias")
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
            # [D, N, H] and [N, H, D] flatten to [in, out] kernels of a D x D Linear.
            state[f"{dst}self_attn.{proj}.weight"] = tensor(
                f"{src}{ATTENTION}{name}/kernel", transpose=True, shape=(hidden, hidden)
            )
            state[f"{dst}self_attn.{proj}.bias"] = tensor(f"{src}{ATTENTION}{name}/bias", shape=(hidden,))
        state[f"{dst}mlp_norm.weight"] = tensor(src + "LayerNorm_2/scale")
        state[f"{dst}mlp_norm.bias"] = tensor(src + "LayerNorm_2/bias")
        for index, proj in ((0, "up_proj"), (1, "down_proj")):
            state[f"{dst}mlp.{proj}.weight"] = tensor(f"{src}MlpBlock_3/Dense_{index}/kernel", transpose=True)
            state[f"{dst}mlp.{proj}.bias"] = tensor(f"{src}MlpBlock_3/Dense_{index}/bias")
    return state


# ---------------------------------------------------------------------------------------------------- writing
def model_card(config: MUDDViTConfig, source_name: str, output_name: str, model) -> str:
    """The Hub card of a converted folder: what it is (a plain ViT's weights with identity dense connections, not a
    model trained with MUDD), how to load it, and the settings the conversion chose."""
    parameters = sum(p.numel() for p in model.parameters())
    dense = sum(p.numel() for name, p in model.named_parameters() if ".dense." in name)
    height, width = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return (
        "---\nlibrary_name: transformers\npipeline_tag: image-classification\ntags:\n- mudd\n- muddvit\n"
        "- vision-transformer\n- custom_code\n---\n\n"
        f"# {output_name}\n\n"
        f"A MUDDViT converted by `mudd-convert --format vit-npz` from Google's JAX ViT checkpoint `{source_name}`: "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"{height}x{width} images, {config.num_labels} classes, {parameters:,} parameters ({dense:,} of them in the "
        "dense connections).\n\n"
        "The dense connections start at identity, so this model computes the same function as the source ViT "
        f"(`hidden_act={config.hidden_act!r}`, `layer_norm_eps={config.layer_norm_eps}`, the flax conventions). It "
        "is a starting point for fine-tuning with MUDD, not a model trained with MUDD: the MUDDFormer paper's "
        "MUDDViT results are for models trained from scratch and do not apply to it. Training data, licence and "
        "accuracy are those of the source checkpoint.\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        f'classify = pipeline("image-classification", model="{output_name}", trust_remote_code=True)\n'
        'classify("image.jpg")\n```\n'
    )



def _write_atomically(output_dir: Path, write, *, force: bool, log: Callable[[str], None] = print) -> None:
    """`write(staging)` into a hidden sibling folder, then rename it to `output_dir` (replacing it under `force`),
    holding an exclusive claim on `output_dir` throughout (see `safe_output`).

    Whatever fails, no partial `output_dir` is left and an existing one survives unless the new one is in place.
    """
    with Claim(output_dir, TOOL):
        if output_dir.exists() and not force:
            raise FileExistsError(f"{display(output_dir)} already exists; pass force=True (--force) to replace it")
        if output_dir.exists() and not output_dir.is_dir():
            raise FileExistsError(f"{display(output_dir)} exists and is not a folder; refusing to replace it")
        check_replaceable(output_dir, (TOOL,))
        remove_stale(output_dir, log)
        with staged(output_dir, TOOL) as staging:
            try:
                write(staging)
            except OSError as error:  # save_pretrained's errors may name the file being copied, not the output
                if error.errno is None:
                    raise
                raise type(error)(error.errno, error.strerror, os.fspath(output_dir)) from None


def convert_vit_npz(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_overrides: dict | None = None,
    dtype: str = "float32",
    force: bool = False,
    strict: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a Google JAX ViT `.npz` into a MUDDViT folder; returns the folder's path.

    Args:
        input_path: the `.npz` (vit_jax naming, see the module docstring). Pickled content is never loaded.
        output_dir: folder to create; refused if it exists unless `force`.
        config_overrides: `MUDDViTConfig` fields to set on top of what the shapes imply (e.g. `id2label`,
            `hidden_act="gelu"`/`layer_norm_eps=1e-12` for transformers' conventions, dense options).
        dtype: "float32", "float16" or "bfloat16" for the saved weights.
        force: replace an existing `output_dir` (only once the new folder is complete).
        strict: fail on NaN/inf values instead of warning.
        log: where notes go (e.g. removed leftovers of an interrupted run).

    Raises `CheckpointError` (a `ValueError`) naming the missing/unexpected/misshapen array or the unreadable file,
    `FileExistsError`, `FileNotFoundError`, or `ValueError` for bad arguments; nothing is written then.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {display(input_path)}")
    if same_or_nested(output_dir, input_path):
        raise FileExistsError(f"{display(output_dir)} is, contains or lies inside the input {display(input_path)}; "
                              "choose another output folder")
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to replace it")
    source = open_npz(input_path)
    try:
        infos = {name: source.info(name) for name in source.names()}
        config = infer_config(infos, config_overrides)
        check_arrays(infos, config)  # names and shapes, before any array is read
        arrays = read_arrays(source, list(infos))
    finally:
        source.close()
    check_finite(arrays, strict=strict)
    image_processor = build_image_processor(config)
    model = build_from_plain_state(
        MUDDViTForImageClassification, config, muddvit_state_dict(arrays, config), dtype=DTYPES[dtype], origin="vit-npz"
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(config, input_path.name, output_dir.name, model))

    _write_atomically(output_dir, write, force=force, log=log)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Google JAX ViT .npz checkpoint into a MUDDViT folder.")
    parser.add_argument("input_path", help="vit_jax .npz checkpoint")
    parser.add_argument("output_dir", help="folder to create")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--config-overrides", type=json.loads, default=None, help="JSON object of config fields")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--strict", action="store_true", help="fail on non-finite weights instead of warning")
    args = parser.parse_args(argv)
    try:
        output = convert_vit_npz(
            args.input_path, args.output_dir, config_overrides=args.config_overrides, dtype=args.dtype,
            force=args.force, strict=args.strict,
        )
    except (ValueError, OutputError) as error:  # bad input: a message, not a traceback
        parser.exit(1, f"error: {error}\n")
    except OSError as error:  # FileExistsError, FileNotFoundError, and file system errors: path and cause
        parser.exit(1, f"error: {describe_os_error(error) if error.filename else error}\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
