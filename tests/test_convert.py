"""The checkpoint converter (`mudd-convert`): every format against an independent reference, and every bad input.

Each format test writes a synthetic checkpoint in that format's exact layout (tests/convert_fixtures.py), converts
it, loads the result and compares its logits with the float64 spec reference fed directly from the *source*
tensors by their source names (or, for muddified plain models, with transformers' own GPT-NeoX / Llama).
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_fixtures import (
    FAKE_AUTHORS_MODELING, FORMER, PAX, Shapes, authors_config_json, authors_tensors, maxtext_tensors, pax_tensors,
    reference, spec_from_authors, spec_from_maxtext, spec_from_pax, with_,
)
from mudd_reference import randomize_
from modeling_muddpythia import muddify
from modeling_muddpythia import convert as convert_module
from modeling_muddpythia.cli_convert import main
from modeling_muddpythia.convert_io import ShardedSafetensorsWriter


REPO = Path(__file__).resolve().parent.parent
HAS_TENSORSTORE = importlib.util.find_spec("tensorstore") is not None
needs_tensorstore = pytest.mark.skipif(not HAS_TENSORSTORE, reason="tensorstore is not installed")
INPUT_IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))


def convert(*args) -> int:
    return main([str(arg) for arg in args])


def load_converted(folder: Path):
    from modeling_muddpythia.convert_plans import FAMILIES

    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    return FAMILIES[model_type].model_class.from_pretrained(folder, dtype=torch.float32).eval()


def assert_matches_reference(folder: Path, params: dict, shapes: Shapes, input_ids=INPUT_IDS) -> None:
    with torch.no_grad():
        ours = load_converted(folder)(input_ids).logits.double()
    expected = reference(params, shapes, input_ids)
    assert expected.abs().max() > 0.5  # the comparison means something
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def cast(tensors: dict, dtype=torch.float32) -> dict:
    return {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}


def write_authors(folder: Path, shapes: Shapes, tensors: dict | None = None, layout: str = "single", config: dict | None = None) -> Path:
    """An authors' release folder: config.json and weights as `model.safetensors`, shards + index, or a pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = cast(authors_tensors(shapes)) if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(config or authors_config_json(shapes)))
    if layout == "single":
        save_file(tensors, folder / "model.safetensors")
    elif layout == "sharded":
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in halves.items():
            save_file({n: tensors[n] for n in part}, folder / file)
        weight_map = {n: file for file, part in halves.items() for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    return folder


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------- A: authors' PyTorch
def test_authors_pytorch_muddpythia_matches_reference(tmp_path, capsys):
    tensors = cast(authors_tensors(Shapes()))
    source = write_authors(tmp_path / "MUDDPythia-tiny", Shapes(), tensors)
    (source / "tokenizer.json").write_text("{}")
    out = tmp_path / "converted"
    assert convert("--format", "authors-pytorch", "--input", source, "--output", out, "--verify", "--max-shard-size", "20KB") == 0
    assert_matches_reference(out, spec_from_authors(tensors, Shapes()), Shapes())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_muddpythia.MUDDPythiaForCausalLM"
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_muddpythia.MUDDPythiaForSequenceClassification"
    assert config["ffn_width_reallocation"] and config["intermediate_size"] == 256 and config["dtype"] == "float32"
    assert {"modeling_muddpythia.py", "mudd.py", "generation_config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert "convert" not in " ".join(p.name for p in out.iterdir())  # the converter is no part of the remote code
    log = capsys.readouterr().err
    assert "75 source tensors each used once" in log and "75 parameters filled" in log
    assert leftovers(tmp_path) == []


def test_authors_pytorch_sharded_bf16_keeps_the_source_dtype(tmp_path, monkeypatch):
    tensors = cast(authors_tensors(Shapes(), seed=3), torch.bfloat16)
    source = write_authors(tmp_path / "src", Shapes(), tensors, layout="sharded")
    out = tmp_path / "out"
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "out.md").write_text("# the real card\n")
    monkeypatch.setattr(convert_module, "MODEL_CARDS", tmp_path / "cards")
    assert convert("--format", "authors-pytorch", "--input", source / "model.safetensors.index.json", "--output", out) == 0
    assert (out / "README.md").read_text() == "# the real card\n"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_matches_reference(out, spec_from_authors(tensors, Shapes()), Shapes())


def test_authors_pytorch_pickle_needs_allow_pickle(tmp_path, capsys):
    tensors = cast(authors_tensors(Shapes()))
    source = write_authors(tmp_path / "src", Shapes(), tensors, layout="bin")
    out = tmp_path / "out"
    assert convert("--format", "authors-pytorch", "--input", source, "--output", out) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert convert("--format", "authors-pytorch", "--input", source, "--output", out, "--allow-pickle", "--dtype", "float16") == 0
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.float16
    assert_matches_reference(out, spec_from_authors(cast(tensors, torch.float16), Shapes()), Shapes())


def _write_runnable_authors(folder: Path) -> Path:
    config = {**authors_config_json(Shapes()), "auto_map": {"AutoModelForCausalLM": "modeling_fake_authors.AuthorsModel"}}
    write_authors(folder, Shapes(), config=config)
    # importing the authors' code leaves a mark, so the tests see whether it ran
    marker = f"import pathlib as _p\n_p.Path({str(folder / 'IMPORTED')!r}).write_text('imported')\n"
    (folder / "modeling_fake_authors.py").write_text(FAKE_AUTHORS_MODELING + "\n" + marker)
    for helper in ("convert_fixtures.py", "mudd_reference.py"):
        (folder / helper).write_text((Path(__file__).parent / helper).read_text())
    return folder


def test_verify_compares_logits_with_a_runnable_source(tmp_path, capsys, monkeypatch):
    source = _write_runnable_authors(tmp_path / "src")
    # without --trust-remote-code the input's Python is never imported, even with --verify and an auto_map
    assert convert("--format", "authors-pytorch", "--input", source, "--output", tmp_path / "untrusted", "--verify") == 0
    err = capsys.readouterr().err
    assert "forward comparison skipped" in err and "pass --trust-remote-code" in err
    assert not (source / "IMPORTED").exists()
    assert convert("--format", "authors-pytorch", "--input", source, "--output", tmp_path / "good", "--verify",
                   "--trust-remote-code") == 0
    assert "logits match the source model's" in capsys.readouterr().err
    assert (source / "IMPORTED").exists()

    # A conversion bug that keeps every shape and every checksum (a transposed square matrix) is caught by the forward.
    def transposed_query(config, family):
        plan = original(config, family)
        index = next(k for k, rule in enumerate(plan.rules) if rule.targets == ("model.layers.1.self_attn.q_proj.weight",))
        plan.rules[index] = type(plan.rules[index])(**{**plan.rules[index].__dict__, "convert": lambda x: x.t()})
        return plan

    original = convert_module.authors_plan
    monkeypatch.setattr(convert_module, "authors_plan", transposed_query)
    assert convert("--format", "authors-pytorch", "--input", source, "--output", tmp_path / "bad", "--verify", "--trust-remote-code") == 1
    assert "logits differ from the source model's" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_output_loads_where_our_package_is_not_importable(tmp_path):
    tensors = cast(authors_tensors(Shapes()))
    out = tmp_path / "out"
    assert convert("--format", "authors-pytorch", "--input", write_authors(tmp_path / "src", Shapes(), tensors), "--output", out) == 0
    script = (
        "import sys, torch\n"
        "sys.modules['modeling_muddpythia'] = None  # our package must not be needed\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        "assert 'modeling_muddpythia' not in type(model).__module__.split('.')[0], type(model).__module__\n"
        f"torch.save(model(torch.tensor({INPUT_IDS.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = reference(spec_from_authors(tensors, Shapes()), Shapes(), INPUT_IDS)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt").double(), expected, atol=2e-4, rtol=1e-4)


def test_authors_pytorch_muddformer_matches_reference(tmp_path):
    tensors = cast(authors_tensors(FORMER))
    out = tmp_path / "out"
    assert convert("--format", "authors-pytorch", "--input", write_authors(tmp_path / "src", FORMER, tensors), "--output", out, "--verify") == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "muddformer"
    assert_matches_reference(out, spec_from_authors(tensors, FORMER), FORMER)


# ---------------------------------------------------------------------------------------------------- B: Pax
def test_pax_npz_muddpythia_matches_reference(tmp_path):
    tensors = cast(pax_tensors(Shapes()))
    np.savez(tmp_path / "pax.npz", **{name: t.numpy() for name, t in tensors.items()})
    out = tmp_path / "out"
    assert convert("--format", "pax", "--input", tmp_path / "pax.npz", "--output", out, "--config", '{"vocab_size": 61}', "--verify") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["head_dim"], config["vocab_size"]) == ("muddpythia", 3, 8, 61)  # head_dim resolved (issue 11)
    assert_matches_reference(out, spec_from_pax(tensors, Shapes()), Shapes())


def test_pax_flat_safetensors_with_config_file(tmp_path):
    shapes = with_(Shapes(), rope_theta=500.0)
    tensors = cast(pax_tensors(shapes, seed=5))
    save_file(tensors, tmp_path / "pax.safetensors")
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"vocab_size": 61, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}))
    out = tmp_path / "out"
    assert convert("--format", "pax", "--input", tmp_path / "pax.safetensors", "--output", out, "--config", preset) == 0
    assert_matches_reference(out, spec_from_pax(tensors, shapes), shapes)


def write_tensorstore(root: Path, arrays: dict[str, np.ndarray], *, ocdbt: bool, metadata: bool) -> None:
    """Arrays named by "/"-separated tree paths, stored as Orbax does: zarr v2, one folder per array named by the
    "."-joined path (or the same keys in an OCDBT database), with Orbax's `_METADATA` tree when asked."""
    import tensorstore as ts

    root.mkdir(parents=True, exist_ok=True)
    tree = {}
    for path, array in arrays.items():
        keys = path.split("/")
        name = ".".join(keys)
        kvstore = {"driver": "ocdbt", "base": f"file://{root}/", "path": f"{name}/"} if ocdbt else {"driver": "file", "path": f"{root / name}/"}
        dtype = "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.str
        spec = {"driver": "zarr", "kvstore": kvstore, "metadata": {"shape": list(array.shape), "chunks": list(array.shape), "dtype": dtype, "compressor": {"id": "zstd", "level": 1}}, "store_data_equal_to_fill_value": True}  # as Orbax writes
        ts.open(spec, create=True).result().write(array).result()
        tree[str(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys], "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
    if metadata:
        (root / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_ocdbt": ocdbt, "use_zarr3": False}))


@needs_tensorstore
def test_pax_tensorstore_directory(tmp_path, capsys):
    tensors = cast(pax_tensors(Shapes(), seed=7))
    arrays = {name.removeprefix("state."): t.numpy() for name, t in tensors.items()}
    arrays["opt_states.no_prefix_0.count"] = np.zeros((), np.int32)  # optimizer state: skipped
    step = tmp_path / "checkpoints" / "checkpoint_00000100"
    write_tensorstore(step / "state", arrays, ocdbt=False, metadata=False)
    out = tmp_path / "out"
    assert convert("--format", "pax", "--input", tmp_path / "checkpoints", "--output", out) == 1
    assert "pass one step directory" in capsys.readouterr().err
    assert convert("--format", "pax", "--input", step, "--output", out, "--config", '{"vocab_size": 61}') == 0
    assert "skipping 1 arrays that are not model weights" in capsys.readouterr().err
    assert_matches_reference(out, spec_from_pax(tensors, Shapes()), Shapes())


@needs_tensorstore
def test_corrupt_tensorstore_chunk(tmp_path, capsys):
    tensors = cast(pax_tensors(Shapes()))
    write_tensorstore(tmp_path / "ckpt", {name: t.numpy() for name, t in tensors.items()}, ocdbt=False, metadata=True)
    chunk = next((tmp_path / "ckpt" / f"{PAX}.final_ln.scale").glob("0*"))
    chunk.write_bytes(b"\x00garbage" + chunk.read_bytes()[9:])
    assert convert("--format", "pax", "--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--config", '{"vocab_size": 61}') == 1
    assert f"cannot read array '{PAX}.final_ln.scale'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pax_muddformer_npz(tmp_path):
    tensors = cast(pax_tensors(FORMER))
    np.savez(tmp_path / "pax.npz", **{name: t.numpy() for name, t in tensors.items()})
    out = tmp_path / "out"
    config = {"vocab_size": 61, "rms_norm_eps": FORMER.eps}
    assert convert("--format", "pax", "--input", tmp_path / "pax.npz", "--output", out, "--config", json.dumps(config)) == 0
    assert_matches_reference(out, spec_from_pax(tensors, FORMER), FORMER)


# ---------------------------------------------------------------------------------------------------- C: MaxText
MAXTEXT = with_(FORMER, first_layer_norms=True)


@needs_tensorstore
def test_maxtext_orbax_ocdbt_bf16(tmp_path):
    import ml_dtypes

    tensors = cast(maxtext_tensors(MAXTEXT), torch.bfloat16)
    arrays = {f"params/{name}": t.float().numpy().astype(ml_dtypes.bfloat16) for name, t in tensors.items()}  # TrainState nesting
    arrays["opt_state/mu/params/decoder/decoder_norm/scale"] = np.zeros(MAXTEXT.hidden, np.float32)
    write_tensorstore(tmp_path / "ckpt" / "1000" / "state", arrays, ocdbt=True, metadata=True)
    out = tmp_path / "out"
    config = {"vocab_size": 61, "rms_norm_eps": MAXTEXT.eps, "max_position_embeddings": 64}
    assert convert("--format", "maxtext", "--input", tmp_path / "ckpt" / "1000", "--output", out, "--config", json.dumps(config), "--verify") == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["separate_stream_norms_first_layer"] and saved["dtype"] == "bfloat16"
    assert_matches_reference(out, spec_from_maxtext(tensors, MAXTEXT), MAXTEXT)


@needs_tensorstore
def test_maxtext_prenorm_postnorm_without_qk_norm(tmp_path):
    """The MUDDLlama2Medium setting (configuration/muddllama2-medium-405m.json): prenorm, postnorm, no qk-norm."""
    shapes = with_(MAXTEXT, prenorm=True, postnorm=True, qk_norm=False)
    tensors = cast(maxtext_tensors(shapes, seed=2))
    write_tensorstore(tmp_path / "items", {name: t.numpy() for name, t in tensors.items()}, ocdbt=False, metadata=True)
    out = tmp_path / "out"
    assert convert("--format", "maxtext", "--input", tmp_path / "items", "--output", out, "--config", json.dumps({"vocab_size": 61, "rms_norm_eps": shapes.eps})) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["dense_prenorm"] and saved["dense_postnorm"] and not saved["use_qk_norm"]
    assert_matches_reference(out, spec_from_maxtext(tensors, shapes), shapes)


# ---------------------------------------------------------------------------------------------------- D: plain models
def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(60)} | {"<unk>": 60}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>").save_pretrained(folder)


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_neox_is_muddified_to_the_same_function(tmp_path, capsys, tied):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, rotary_pct=0.25, tie_word_embeddings=tied, use_parallel_residual=not tied,
    )
    source_model = GPTNeoXForCausalLM(config).eval()
    randomize_(source_model)
    source_model.tie_weights()
    source_model.save_pretrained(tmp_path / "pythia")
    _tiny_tokenizer(tmp_path / "pythia")
    out = tmp_path / "out"
    assert convert("--format", "gpt-neox", "--input", tmp_path / "pythia", "--output", out, "--verify") == 0
    assert "logits match the source model's" in capsys.readouterr().err
    model = load_converted(out)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT_IDS).logits, source_model(INPUT_IDS).logits, atol=1e-5, rtol=1e-5)
        # muddify (in memory) applies the same key plan
        torch.testing.assert_close(muddify(source_model)(INPUT_IDS).logits, source_model(INPUT_IDS).logits, atol=1e-5, rtol=1e-5)
    dense = model.model.dense.layers[1]
    assert dense.proj_out.weight.abs().max() == 0 and dense.proj_in.weight.std() > 0  # identity, yet trainable
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) != tied
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5


def test_llama_is_muddified_to_the_same_function(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True,
    )
    source_model = LlamaForCausalLM(config).eval()
    randomize_(source_model)
    source_model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    assert convert("--format", "llama", "--input", tmp_path / "llama", "--output", out, "--verify") == 0
    with torch.no_grad():
        torch.testing.assert_close(load_converted(out)(INPUT_IDS).logits, source_model(INPUT_IDS).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def authors_folder(tmp_path):
    return write_authors(tmp_path / "src", Shapes())


def _convert_authors(folder: Path, out: Path, *extra) -> int:
    return convert("--format", "authors-pytorch", "--input", folder, "--output", out, *extra)


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert("--format", "megatron", "--input", tmp_path, "--output", tmp_path / "out")
    assert exit_info.value.code == 2 and "invalid choice: 'megatron'" in capsys.readouterr().err


def test_missing_key_names_it_and_what_was_expected(authors_folder, tmp_path, capsys):
    _edit_weights(authors_folder, lambda t: t.pop("layers.1.attention.wk.weight"))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "missing keys" in err and "'layers.1.attention.wk.weight': expected the k projection of block 1, shape [32, 32]" in err
    assert not (tmp_path / "out").exists()


def test_unexpected_key_is_named(authors_folder, tmp_path, capsys):
    _edit_weights(authors_folder, lambda t: t.update({"layers.0.attention.wqkv.weight": torch.zeros(96, 32)}))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    assert "unexpected keys (not part of the authors-pytorch layout for this config)" in (err := capsys.readouterr().err)
    assert "layers.0.attention.wqkv.weight" in err


def test_wrong_shape_names_key_got_and_expected(authors_folder, tmp_path, capsys):
    _edit_weights(authors_folder, lambda t: t.update({"dynamic_dense.1.w2.weight": torch.zeros(12, 32)}))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    assert "'dynamic_dense.1.w2.weight' has shape [12, 32], expected [12, 64]" in capsys.readouterr().err


def test_config_and_checkpoint_disagreeing_is_a_shape_error(authors_folder, tmp_path, capsys):
    config = json.loads((authors_folder / "config.json").read_text())
    (authors_folder / "config.json").write_text(json.dumps({**config, "n_head": 8}))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    assert "'layers.0.attention.wq.weight' has shape [32, 32], expected [64, 32] (the q projection of block 0)" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) - 100], "incomplete metadata, file not fully covered"),
    (lambda data: data[:8] + b"\xff" * 20 + data[28:], "invalid UTF-8 in header"),
    (lambda data: data[:5], "header too small"),
])
def test_truncated_or_corrupt_safetensors(authors_folder, tmp_path, capsys, damage, message):
    file = authors_folder / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    assert message in capsys.readouterr().err and leftovers(tmp_path) == []


def test_truncated_or_corrupt_npz(tmp_path, capsys):
    np.savez(tmp_path / "pax.npz", **{name: t.float().numpy() for name, t in pax_tensors(Shapes()).items()})
    data = (tmp_path / "pax.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert convert("--format", "pax", "--input", tmp_path / "cut.npz", "--output", tmp_path / "out") == 1
    assert "not a readable .npz (zip) archive" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "pax.npz") as archive:  # a damaged member: its CRC no longer matches
        member = archive.getinfo(f"{PAX}.final_ln.scale.npy")
    offset = member.header_offset + 30 + len(member.filename) + 140
    (tmp_path / "crc.npz").write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
    assert convert("--format", "pax", "--input", tmp_path / "crc.npz", "--output", tmp_path / "out", "--config", '{"vocab_size": 61}') == 1
    assert f"{PAX}.final_ln.scale.npy' is not a valid .npy array (Bad CRC-32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_non_finite_values_warn_or_fail_under_strict(authors_folder, tmp_path, capsys):
    _edit_weights(authors_folder, lambda t: t["layers.2.feed_forward.w2.weight"].__setitem__((0, 3), float("nan")))
    assert _convert_authors(authors_folder, tmp_path / "strict", "--strict") == 1
    assert "model.layers.2.mlp.down_proj.weight (from layers.2.feed_forward.w2.weight) has 1 non-finite values (--strict)" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists() and leftovers(tmp_path) == []
    assert _convert_authors(authors_folder, tmp_path / "lenient") == 0
    assert "warning: model.layers.2.mlp.down_proj.weight" in capsys.readouterr().err


def test_existing_output_needs_force(authors_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _convert_authors(authors_folder, out) == 1
    assert "already exists; pass --force" in capsys.readouterr().err and (out / "old.txt").exists()
    # A folder the converter did not write is never replaced, not even with --force.
    assert _convert_authors(authors_folder, out, "--force") == 1
    assert "has no .mudd-output.json marker" in capsys.readouterr().err and (out / "old.txt").exists()
    shutil.rmtree(out)
    assert _convert_authors(authors_folder, out) == 0
    (out / "old.txt").write_text("old")
    assert _convert_authors(authors_folder, out, "--force") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists() and leftovers(tmp_path) == []
    assert _convert_authors(authors_folder, authors_folder / "..", "--force") == 1
    assert "contains the input model" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_mid_way_leaves_no_partial_output(authors_folder, tmp_path, capsys, monkeypatch, how):
    out = tmp_path / "out"
    assert _convert_authors(authors_folder, out) == 0  # an earlier output of the converter: --force may replace it
    before = sorted(p.name for p in out.iterdir())
    original, calls = ShardedSafetensorsWriter.write, []

    def interrupted_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 20:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", interrupted_write)
    assert _convert_authors(authors_folder, out, "--force", "--max-shard-size", "10KB") == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and leftovers(tmp_path) == []


def test_missing_tensorstore_or_unfinished_checkpoint_is_explained(tmp_path, capsys, monkeypatch):
    for name in ("ckpt", "1000.orbax-checkpoint-tmp-17"):
        (tmp_path / name / "w.zarr").mkdir(parents=True)
        (tmp_path / name / "w.zarr" / ".zarray").write_text("{}")
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    assert convert("--format", "maxtext", "--input", tmp_path / "ckpt", "--output", tmp_path / "out") == 1
    assert "needs the `tensorstore` package" in capsys.readouterr().err
    assert convert("--format", "pax", "--input", tmp_path / "1000.orbax-checkpoint-tmp-17", "--output", tmp_path / "out") == 1
    assert "an unfinished Orbax checkpoint" in capsys.readouterr().err


def test_bad_config_options_are_explained(authors_folder, tmp_path, capsys):
    assert _convert_authors(authors_folder, tmp_path / "out", "--config", '{"hidden_sise": 3}') == 1
    assert "--config has fields MUDDPythiaConfig does not know: ['hidden_sise']" in capsys.readouterr().err
    assert _convert_authors(authors_folder, tmp_path / "out", "--config", '{"dense_prenorm": true}') == 1
    assert "has nothing for these parameters" in (err := capsys.readouterr().err) and "model.dense.state_norms.0.weight" in err
    assert _convert_authors(authors_folder, tmp_path / "out", "--model-type", "muddformer") == 1
    assert "--model-type muddformer does not match" in capsys.readouterr().err
    (authors_folder / "config.json").write_text(json.dumps({"model_type": "muddpythia", "hidden_size": 32}))
    assert _convert_authors(authors_folder, tmp_path / "out") == 1
    assert "lacks ['dim', 'n_head', 'n_layer', 'vocab_size'] (it looks like a transformers config" in capsys.readouterr().err


def test_command_line_entry_points(tmp_path):
    command = [sys.executable, str(REPO / "conversion_scripts" / "convert_to_hf.py"), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "{authors-pytorch,pax,maxtext,gpt-neox,llama,vit-npz}" in result.stdout
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "mudd-convert = modeling_muddpythia.cli_convert:main" in setup["options.entry_points"]["console_scripts"]
