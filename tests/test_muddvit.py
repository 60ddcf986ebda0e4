"""MUDDViT: muddify vs transformers' ViT, random weights vs the float64 reference, vit-npz conversion, remote code,
the image-classification pipeline and a Trainer run on a synthetic image dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from modeling_muddpythia import MUDDViTConfig, MUDDViTForImageClassification, MUDDViTModel, muddify
from modeling_muddpythia.convert_vit_npz import CheckpointError, convert_vit_npz, main as convert_main
from modeling_muddpythia.modeling_muddvit import build_image_processor
from modeling_muddpythia.safe_output import OutputError

sys.path.insert(0, str(Path(__file__).parent))
from mudd_reference import randomize_  # noqa: E402
from vit_reference import (  # noqa: E402
    reference_vit_logits,
    vit_params_from_model,
    vit_params_from_npz,
    vit_params_from_transformers_vit,
)


REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
LABELS = {0: "red", 1: "green", 2: "blue"}


def tiny_config(**overrides) -> MUDDViTConfig:
    return MUDDViTConfig(**{**TINY, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}, **overrides})


def random_vit(attn_implementation: str = "sdpa", **overrides) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(**{**TINY, "num_labels": 3, **overrides}, attn_implementation=attn_implementation)
    model = ViTForImageClassification(config).eval()
    randomize_(model, seed=1)
    return model


def pixels(batch: int = 2, size: int = 32, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"patch_size": 7}, "patch_size"),
        ({"image_size": [32]}, "image_size"),
        ({"dense_streams": "qk"}, "dense_streams"),
        ({"hidden_act": "nope"}, "hidden_act"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"dense_norm_eps": -1.0}, "dense_norm_eps"),
        ({"dense_round64": "yes"}, "dense_round64"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    ("preset", "hidden", "heads", "mlp", "plain_params"),
    [("muddvit-s16", 384, 6, 1536, 22_050_664), ("muddvit-m16", 512, 8, 2048, 38_837_736)],
)
def test_presets(preset, hidden, heads, mlp, plain_params):
    config = MUDDViTConfig.from_json_file(REPO / "configuration" / f"{preset}.json")
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (hidden, heads, mlp)
    assert (config.num_hidden_layers, config.image_size, config.patch_size, config.num_labels) == (12, 224, 16, 1000)
    with torch.device("meta"):
        model = MUDDViTForImageClassification(config)
    params = {name: p.numel() for name, p in model.named_parameters()}
    dense = sum(n for name, n in params.items() if ".dense." in name)
    stream_norms = sum(n for name, n in params.items() if re.search(r"\.attention_norms\.[12]\.", name))
    # Everything else is exactly the plain ViT of that size (timm/transformers count, 1000-class head).
    assert sum(params.values()) - dense - stream_norms == plain_params
    if preset == "muddvit-s16":  # paper: the dense connections add about 0.7% to ViT-S/16
        assert 0.0065 < dense / plain_params < 0.0072


# ---------------------------------------------------------------------------------------------------- muddify
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_muddified_vit_matches_transformers(attn_implementation):
    vit = random_vit(attn_implementation)
    mudd = muddify(vit)
    assert isinstance(mudd, MUDDViTForImageClassification)
    assert mudd.config._attn_implementation == attn_implementation and not mudd.training
    assert mudd.config.id2label == vit.config.id2label
    with torch.no_grad():
        expected = vit(pixels(), output_hidden_states=True)
        got = mudd(pixels(), output_hidden_states=True)
        assert (got.logits - expected.logits).abs().max() < 1e-5
        assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
        for ours, theirs in zip(got.hidden_states, expected.hidden_states):
            assert (ours - theirs).abs().max() < 1e-5
        # Other image sizes through interpolated position embeddings.
        expected = vit(pixels(size=48), interpolate_pos_encoding=True).logits
        got = mudd(pixels(size=48), interpolate_pos_encoding=True).logits
        assert (got - expected).abs().max() < 1e-5


def test_muddify_vit_without_qkv_bias():
    vit = random_vit(qkv_bias=False)
    mudd = muddify(vit)
    assert mudd.vit.encoder.layers[1].self_attn.q_proj.bias is None
    with torch.no_grad():
        assert (mudd(pixels()).logits - vit(pixels()).logits).abs().max() < 1e-5


def test_reference_matches_transformers_vit():
    """The float64 reference itself, on a plain ViT (no dense connections), against transformers' ViT."""
    vit = random_vit().double()
    expected = vit(pixels(dtype=torch.float64)).logits
    got = reference_vit_logits(
        vit_params_from_transformers_vit(vit), pixels(), num_heads=vit.config.num_attention_heads,
        eps=vit.config.layer_norm_eps,
    )
    assert (got - expected).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize(
    ("overrides", "attn_implementation", "tolerance"),
    [
        ({}, "sdpa", 1e-10),
        ({}, "eager", 1e-6),  # eager attention takes its softmax in float32
        ({"dense_streams": "r", "dynamic_dense": False}, "sdpa", 1e-10),
        ({"dense_round64": True, "dense_expand_last": False, "qkv_bias": False}, "sdpa", 1e-10),
    ],
)
def test_random_weights_match_float64_reference(overrides, attn_implementation, tolerance):
    config = tiny_config(**overrides, attn_implementation=attn_implementation)
    model = MUDDViTForImageClassification(config).eval().double()
    randomize_(model, seed=2)
    with torch.no_grad():
        got = model(pixels(dtype=torch.float64)).logits
    expected = reference_vit_logits(
        vit_params_from_model(model), pixels(), num_heads=config.num_attention_heads, eps=config.layer_norm_eps,
        dense_eps=config.dense_norm_eps,
    )
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < tolerance * max(1.0, expected.abs().max().item())


def test_float32_close_to_reference():
    model = MUDDViTForImageClassification(tiny_config()).eval()
    randomize_(model, seed=3)
    with torch.no_grad():
        got = model(pixels()).logits.double()
    expected = reference_vit_logits(vit_params_from_model(model), pixels(), num_heads=4, eps=1e-12)
    assert (got - expected).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------- outputs
def test_outputs_attentions_hidden_states_dense_weights():
    model = MUDDViTForImageClassification(tiny_config(attn_implementation="sdpa")).eval()
    randomize_(model, seed=4)
    seq = 1 + 16
    with torch.no_grad():
        out = model(pixels(), output_attentions=True, output_hidden_states=True, output_dense_weights=True)
        plain = model(pixels())
    assert (out.logits - plain.logits).abs().max() < 1e-5  # eager for the probabilities, same function
    assert plain.attentions is None and plain.hidden_states is None and plain.dense_weights is None
    assert [tuple(a.shape) for a in out.attentions] == [(2, 4, seq, seq)] * 3
    for probabilities in out.attentions:
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 4, seq))
        assert (probabilities.triu(1) > 0).any()  # bidirectional: later patches are attended to
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, seq, 32)] * 4
    assert [tuple(w.shape) for w in out.dense_weights] == [(2, seq, 4, 2), (2, seq, 4, 3), (2, seq, 1, 4)]
    as_tuple = model(pixels(), return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(pixels()).logits)
    base = MUDDViTModel(tiny_config()).eval()
    with torch.no_grad():
        base_out = base(pixels())
    assert base_out.last_hidden_state.shape == (2, seq, 32)
    assert torch.equal(base_out.pooler_output, base_out.last_hidden_state[:, 0])


def test_identity_dense_weights_at_init():
    model = MUDDViTForImageClassification(tiny_config()).eval()
    with torch.no_grad():
        weights = model(pixels(), output_dense_weights=True).dense_weights
    for w in weights:
        one_hot = torch.zeros(w.shape[-2:])
        one_hot[:, -1] = 1.0
        assert torch.equal(w, one_hot.expand_as(w))


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "labels", "loss_fn"),
    [
        ("single_label_classification", 3, torch.tensor([0, 2]), torch.nn.functional.cross_entropy),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
         torch.nn.functional.binary_cross_entropy_with_logits),
        ("regression", 1, torch.tensor([0.5, -1.0]),
         lambda logits, y: torch.nn.functional.mse_loss(logits.squeeze(), y)),
    ],
)
def test_losses(problem_type, num_labels, labels, loss_fn):
    config = MUDDViTConfig(**TINY, num_labels=num_labels)  # problem_type inferred from the labels, as in ViT
    model = MUDDViTForImageClassification(config).eval()
    randomize_(model, seed=5)
    out = model(pixels(), labels=labels)
    assert model.config.problem_type == problem_type
    torch.testing.assert_close(out.loss, loss_fn(out.logits, labels))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = MUDDViTForImageClassification(tiny_config())
        randomize_(model, seed=6)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert all(layer.gradient_checkpointing for layer in model.vit.encoder.layers)
        model(pixels(), labels=torch.tensor([0, 1])).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(g is not None for g in plain.values())
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_bad_pixel_values():
    model = MUDDViTForImageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(pixels(size=48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(pixels(size=36), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        model(torch.randn(3, 32, 32))


# ---------------------------------------------------------------------------------------------------- saving, pipeline
REMOTE_SCRIPT = r"""
import json, sys
sys.modules["modeling_muddpythia"] = None  # importing our package fails: only the folder's code can serve
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

folder = sys.argv[1]
image = Image.open(sys.argv[2])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder)
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
with torch.no_grad():
    logits = model(**processor(image, return_tensors="pt")).logits[0]
print(json.dumps({
    "config": type(config).__name__, "base": type(base).__name__, "model": type(model).__name__,
    "processor": type(processor).__name__, "logits": logits.tolist(), "pipeline": classify(image, top_k=3),
}))
"""


def test_save_load_remote_code_and_pipeline(tmp_path):
    from PIL import Image

    model = MUDDViTForImageClassification(tiny_config()).eval()
    randomize_(model, seed=7)
    folder = tmp_path / "muddvit"
    model.save_pretrained(folder)  # also writes the standard ViT image processor
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_muddvit.MUDDViTConfig",
        "AutoModel": "modeling_muddvit.MUDDViTModel",
        "AutoModelForImageClassification": "modeling_muddvit.MUDDViTForImageClassification",
    }
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor_config["image_processor_type"] == "ViTImageProcessor"
    assert processor_config["size"] == {"height": 32, "width": 32}
    assert processor_config["image_mean"] == processor_config["image_std"] == [0.5, 0.5, 0.5]

    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(reloaded, MUDDViTForImageClassification)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels()).logits, model(pixels()).logits)

    image_path = tmp_path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8)).save(image_path)
    processor = build_image_processor(model.config)
    with torch.no_grad():
        expected = model(**processor(Image.open(image_path), return_tensors="pt")).logits[0]

    # A fresh interpreter in which our package cannot be imported: everything comes from the folder's remote code.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(image_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["config"], report["base"], report["model"]) == (
        "MUDDViTConfig", "MUDDViTModel", "MUDDViTForImageClassification"
    )
    assert report["processor"] == "ViTImageProcessorPil"  # torchvision is absent here
    torch.testing.assert_close(torch.tensor(report["logits"]), expected)
    scores = torch.softmax(expected, -1)
    assert {p["label"]: p["score"] for p in report["pipeline"]} == pytest.approx(
        {LABELS[i]: scores[i].item() for i in range(3)}, abs=1e-5
    )


def test_save_keeps_an_existing_image_processor(tmp_path):
    from transformers import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 40, "width": 40}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
    MUDDViTForImageClassification(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 40, "width": 40} and saved["image_mean"] == [0.1, 0.2, 0.3]


# ---------------------------------------------------------------------------------------------------- vit-npz
NPZ = dict(hidden=32, heads=4, head_dim=8, mlp=64, classes=5, patch=8, grid=4, layers=2)


def synthetic_npz_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays with the names and shapes of a Google vit_jax checkpoint (CHECKPOINT_FORMATS D)."""
    rng = np.random.default_rng(seed)
    d, n, h, f, k, p = NPZ["hidden"], NPZ["heads"], NPZ["head_dim"], NPZ["mlp"], NPZ["classes"], NPZ["patch"]
    normal = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    arrays = {
        "embedding/kernel": normal(p, p, 3, d, scale=0.1),
        "embedding/bias": normal(d, scale=0.1),
        "cls": normal(1, 1, d),
        "Transformer/posembed_input/pos_embedding": normal(1, 1 + NPZ["grid"] ** 2, d),
        "Transformer/encoder_norm/scale": 1 + normal(d, scale=0.1),
        "Transformer/encoder_norm/bias": normal(d, scale=0.1),
        "head/kernel": normal(d, k, scale=0.3),
        "head/bias": normal(k, scale=0.1),
    }
    for i in range(NPZ["layers"]):
        block = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"] = 1 + normal(d, scale=0.1)
            arrays[f"{block}{norm}/bias"] = normal(d, scale=0.1)
        attention = block + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[f"{attention}{name}/kernel"] = normal(d, n, h, scale=d**-0.5)
            arrays[f"{attention}{name}/bias"] = normal(n, h, scale=0.1)
        arrays[f"{attention}out/kernel"] = normal(n, h, d, scale=d**-0.5)
        arrays[f"{attention}out/bias"] = normal(d, scale=0.1)
        arrays[f"{block}MlpBlock_3/Dense_0/kernel"] = normal(d, f, scale=d**-0.5)
        arrays[f"{block}MlpBlock_3/Dense_0/bias"] = normal(f, scale=0.1)
        arrays[f"{block}MlpBlock_3/Dense_1/kernel"] = normal(f, d, scale=f**-0.5)
        arrays[f"{block}MlpBlock_3/Dense_1/bias"] = normal(d, scale=0.1)
    return arrays


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def test_vit_npz_conversion_matches_reference(tmp_path):
    arrays = synthetic_npz_arrays()
    out = convert_vit_npz(write_npz(tmp_path / "vit.npz", arrays), tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == [
        ".mudd-output.json", "README.md", "config.json", "configuration_mudd.py", "configuration_muddvit.py", "model.safetensors",
        "modeling_mudd_decoder.py", "modeling_muddvit.py", "mudd.py", "mudd_triton.py", "preprocessor_config.json",
    ]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (32, 4, 64)
    assert (config.num_hidden_layers, config.image_size, config.patch_size, config.num_labels) == (2, 32, 8, 5)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    expected = reference_vit_logits(
        vit_params_from_npz(arrays), pixels(), num_heads=4, eps=1e-6, act="gelu_pytorch_tanh"
    )
    assert expected.abs().max() > 0.1
    with torch.no_grad():
        got32 = model(pixels()).logits
        got64 = model.double()(pixels(dtype=torch.float64)).logits
    assert (got64 - expected).abs().max() < 1e-10
    assert (got32.double() - expected).abs().max() < 1e-4


def test_vit_npz_cli_overrides_and_dtype(tmp_path, capsys):
    npz = write_npz(tmp_path / "vit.npz", synthetic_npz_arrays())
    labels = {str(i): name for i, name in enumerate("abcde")}
    overrides = json.dumps({"id2label": labels, "hidden_act": "gelu", "dense_round64": True})
    convert_main([str(npz), str(tmp_path / "out"), "--dtype", "bfloat16", "--config-overrides", overrides])
    model = MUDDViTForImageClassification.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert (model.config.hidden_act, model.config.dense_round64, model.config.id2label[4]) == ("gelu", True, "e")
    with pytest.raises(SystemExit) as exit_info:  # the CLI reports bad input as a message and exit status 1
        convert_main([str(npz), str(tmp_path / "out")])
    assert exit_info.value.code == 1 and "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown config override"):
        convert_vit_npz(npz, tmp_path / "other", config_overrides={"hiden_size": 3})
    with pytest.raises(ValueError, match="dtype"):
        convert_vit_npz(npz, tmp_path / "other", dtype="int8")
    assert not (tmp_path / "other").exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.pop("Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"),
         r"missing array\(s\) 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias' \(32,\)"),
        (lambda a: a.pop("cls"), r"'cls' \(1, 1, 32\)"),
        (lambda a: a.pop("head/kernel"), r"missing array 'head/kernel' of shape \[32, classes\]"),
        (lambda a: a.pop("embedding/kernel"), r"'embedding/kernel' of shape \[ph, pw, C, D\]"),
        (lambda a: a.__setitem__("Transformer/posembed_input/pos_embedding", np.zeros((17, 32), np.float32)),
         r"pos_embedding' has shape \(17, 32\), expected \[1, 1 \+ patches, 32\]"),
        (lambda a: a.__setitem__("head/bias", np.zeros(6, np.float32)),
         r"'head/bias' has shape \(6,\), expected \(5,\)"),
        (lambda a: a.__setitem__("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel",
                                 np.zeros((4, 8, 31), np.float32)), "out/kernel' has shape"),
        (lambda a: a.__setitem__("pre_logits/kernel", np.zeros((32, 32), np.float32)), "pre_logits"),
        (lambda a: a.__setitem__("Transformer/extra", np.zeros(3, np.float32)),
         r"unexpected array\(s\) \['Transformer/extra'\]"),
        (lambda a: a.__setitem__("cls", a["cls"].astype(np.int32)), "dtype int32"),
    ],
)
def test_vit_npz_bad_checkpoints(tmp_path, mutate, message):
    arrays = synthetic_npz_arrays()
    mutate(arrays)
    npz = write_npz(tmp_path / "vit.npz", arrays)
    with pytest.raises(CheckpointError, match=message):
        convert_vit_npz(npz, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_vit_npz_unreadable_files(tmp_path):
    data = write_npz(tmp_path / "vit.npz", synthetic_npz_arrays()).read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 64] = bytes(64)  # inside an array: CRC mismatch on reading
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "single.npy", np.zeros(3))
    for name, message in [
        ("truncated.npz", "not a readable .npz"),
        ("corrupt.npz", "truncated or corrupt"),
        ("text.npz", "not a readable .npz"),
        ("single.npy", "single array"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            convert_vit_npz(tmp_path / name, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert_vit_npz(tmp_path / "absent.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_vit_npz_non_finite_values_warn_or_fail_under_strict(tmp_path):
    arrays = synthetic_npz_arrays()
    arrays["Transformer/encoderblock_0/LayerNorm_2/bias"][3] = np.nan
    npz = write_npz(tmp_path / "vit.npz", arrays)
    with pytest.raises(CheckpointError, match="non-finite.*LayerNorm_2/bias"):
        convert_vit_npz(npz, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="non-finite"):
        convert_vit_npz(npz, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_vit_npz_existing_output_and_failed_writes(tmp_path, monkeypatch):
    npz = write_npz(tmp_path / "vit.npz", synthetic_npz_arrays())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        convert_vit_npz(npz, out)
    with pytest.raises(OutputError, match="has no .mudd-output.json marker"):  # not the converter's: never replaced
        convert_vit_npz(npz, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    shutil.rmtree(out)
    convert_vit_npz(npz, out)
    (out / "keep.txt").write_text("old")
    before = sorted(p.name for p in out.iterdir())

    def failing_save(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(MUDDViTForImageClassification, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="disk full"):
            convert_vit_npz(npz, out, force=True)
        with pytest.raises(OSError, match="disk full"):
            convert_vit_npz(npz, tmp_path / "fresh")
    assert sorted(p.name for p in out.iterdir()) == before  # the old folder survives a failed replacement
    assert not (tmp_path / "fresh").exists() and _leftovers(tmp_path) == []

    convert_vit_npz(npz, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- Trainer
def coloured_shapes(count: int, seed: int):
    """`count` 32x32 RGB images of a circle, square or triangle at a random place on a random grey-ish
    background; the label is the shape's colour (red, green, blue), jittered."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = [(210, 40, 40), (40, 190, 40), (40, 60, 210)]
    images, labels = [], []
    for index in range(count):
        label = index % 3
        background = tuple(int(v) for v in rng.integers(80, 170, size=3))
        image = Image.new("RGB", (32, 32), background)
        size = int(rng.integers(10, 18))
        x, y = (int(v) for v in rng.integers(0, 32 - size, size=2))
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colours[label])
        draw = ImageDraw.Draw(image)
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse([x, y, x + size, y + size], fill=colour)
        elif shape == 1:
            draw.rectangle([x, y, x + size, y + size], fill=colour)
        else:
            draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
        images.append(image)
        labels.append(label)
    return images, labels


@pytest.fixture
def one_thread():
    """The model is tiny: one intra-op thread is as fast alone and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_fine_tuning_on_an_image_dataset(tmp_path, one_thread):
    from datasets import ClassLabel, Dataset, Features, Image
    from transformers import Trainer, TrainingArguments

    names = [LABELS[i] for i in range(3)]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    train_images, train_labels = coloured_shapes(150, seed=0)
    test_images, test_labels = coloured_shapes(60, seed=1)
    train = Dataset.from_dict({"image": train_images, "label": train_labels}, features=features)
    test = Dataset.from_dict({"image": test_images, "label": test_labels}, features=features)

    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=2)
    model = MUDDViTForImageClassification(config)
    processor = build_image_processor(config)

    def transform(batch):
        inputs = processor([image.convert("RGB") for image in batch["image"]], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "labels": batch["label"]}

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        num_train_epochs=10,
        learning_rate=2e-3,
        remove_unused_columns=False,  # the transform needs the "image" column
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train.with_transform(transform),
        processing_class=processor,
    )
    trainer.train()
    prediction = trainer.predict(test.with_transform(transform))
    accuracy = (prediction.predictions.argmax(-1) == prediction.label_ids).mean()
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f} (chance 0.33)"

    trainer.save_model(str(tmp_path / "model"))
    assert (tmp_path / "model" / "preprocessor_config.json").is_file()


def test_mudd_convert_cli_vit_npz_format(tmp_path, capsys):
    from modeling_muddpythia.cli_convert import main as convert_main

    arrays = synthetic_npz_arrays()
    npz = write_npz(tmp_path / "vit.npz", arrays)
    assert convert_main(["--format", "vit-npz", "--input", str(npz), "--output", str(tmp_path / "cli")]) == 0
    direct = convert_vit_npz(npz, tmp_path / "direct")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_cli = MUDDViTForImageClassification.from_pretrained(tmp_path / "cli")(pixels).logits
        via_function = MUDDViTForImageClassification.from_pretrained(direct)(pixels).logits
    assert torch.equal(via_cli, via_function)
    # bad input through the CLI: a missing array is named, exit code 1, no output folder
    del arrays["head/kernel"]
    broken = write_npz(tmp_path / "broken.npz", arrays)
    assert convert_main(["--format", "vit-npz", "--input", str(broken), "--output", str(tmp_path / "bad")]) == 1
    assert "head/kernel" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert convert_main(["--format", "vit-npz", "--input", str(npz), "--output", str(tmp_path / "x"), "--verify"]) == 2
