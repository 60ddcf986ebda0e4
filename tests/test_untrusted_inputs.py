"""Untrusted inputs for the converters (`mudd-convert` in its formats, vit-npz) and the commands' argument checks.

Every hostile file is written by the test, next to a valid input that must still convert: index entries and links
that leave the input, a Hugging Face Hub cache snapshot (links into `blobs/`, which must keep working), outputs and
siblings the converter did not write, sizes declared larger than what is stored (under `ulimit -v`, so an
allocation of the declared size would fail the test), missing TensorStore chunks, TensorStore paths with `#`, `%`
and spaces, absurd config sizes, and the argument checks of `mudd-eval`, `mudd train-tiny` and `mudd demo`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from convert_fixtures import PAX, Shapes, pax_tensors
from test_convert import cast, leftovers, needs_tensorstore, write_authors, write_tensorstore
from test_muddvit import synthetic_npz_arrays, write_npz
from modeling_muddpythia import MUDDFormerConfig, MUDDPythiaConfig, MUDDViTConfig
from modeling_muddpythia.cli_convert import main as convert_main
from modeling_muddpythia.convert_vit_npz import CheckpointError, convert_vit_npz

REPO = Path(__file__).resolve().parent.parent
# The memory bound the conversions of these tiny (and hostile) inputs must keep: address space, as `ulimit -v`.
MEMORY_LIMIT = 2 * 2**30
PAX_CONFIG = json.dumps({"vocab_size": Shapes().vocab})


def convert(*args) -> int:
    return convert_main([os.fspath(arg) for arg in args])


def authors(folder: Path, out: Path, *extra) -> int:
    return convert("--format", "authors-pytorch", "--input", folder, "--output", out, *extra)


def convert_limited(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mudd-convert ARGS` in a fresh process under `ulimit -v MEMORY_LIMIT`."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.cli_convert", *map(os.fspath, args)],
        capture_output=True, text=True, preexec_fn=limit, cwd=cwd or REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"),
    )


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed run (no traceback)."""
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def source(tmp_path):
    return write_authors(tmp_path / "src", Shapes())


def pax_arrays() -> dict[str, np.ndarray]:
    return {name: t.float().numpy() for name, t in pax_tensors(Shapes()).items()}


def write_npz_members(path: Path, arrays: dict[str, np.ndarray], crafted: dict[str, bytes] = {}) -> Path:
    """An `.npz` of `arrays`, with members whose whole `.npy` bytes are given in `crafted` (name -> bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)
        for name, data in crafted.items():
            archive.writestr(f"{name}.npy", data)
    return path


def npy_header(shape: tuple[int, ...], data: bytes = b"\0" * 128) -> bytes:
    """`.npy` bytes whose header declares `shape` (float32) followed by `data`."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


# ---------------------------------------------------------------------------------------------------- reading inside
@pytest.mark.parametrize("entry", ["../outside.safetensors", "{outside}", "sub/model.safetensors"])
def test_index_entries_must_be_plain_names_inside_the_input(tmp_path, capsys, entry):
    src = write_authors(tmp_path / "src", Shapes())
    valid = write_authors(tmp_path / "valid", Shapes(), layout="sharded")
    names = list(load_file(src / "model.safetensors"))
    outside = tmp_path / "outside.safetensors"
    (src / "model.safetensors").rename(outside)
    (src / "sub").mkdir()
    shutil.copy(outside, src / "sub" / "model.safetensors")
    shard = entry.format(outside=outside)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    assert authors(src / "model.safetensors.index.json", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"lists {shard!r}, which is not a plain file name inside the folder" in err
    assert not (tmp_path / "out").exists() and outside.exists()
    assert authors(valid, tmp_path / "out") == 0  # a sharded folder with plain names converts


def test_a_shard_linked_outside_the_input_is_refused_naming_the_link(source, tmp_path, capsys):
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    (source / "model.safetensors").rename(outside)
    (source / "model.safetensors").symlink_to(outside)
    assert authors(source, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{source / 'model.safetensors'} is a link to {outside}, outside the input folder" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (source / "model.safetensors").unlink()
    os.link(outside, source / "model.safetensors")  # a hard link is a file of the folder
    assert authors(source, tmp_path / "out") == 0


def test_a_link_inside_the_input_is_fine(source, tmp_path):
    (source / "weights").mkdir()
    (source / "model.safetensors").rename(source / "weights" / "model.safetensors")
    (source / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    assert authors(source, tmp_path / "out") == 0


def hub_snapshot(cache: Path, files: dict[str, bytes], repo: str = "models--org--tiny") -> Path:
    """A Hub cache repository laid out as huggingface_hub writes it: content in `blobs/<hash>`, the snapshot's files
    relative links `../../blobs/<hash>`, `refs/main` naming the revision."""
    import hashlib

    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / repo
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


def test_a_hub_cache_snapshot_converts_like_the_plain_folder(source, tmp_path, capsys):
    (source / "tokenizer.json").write_text('{"model": "tiny"}')
    snapshot = hub_snapshot(tmp_path / "hub", {p.name: p.read_bytes() for p in source.iterdir()})
    assert all((snapshot / name).is_symlink() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    assert authors(snapshot, tmp_path / "from-hub") == 0
    assert authors(source, tmp_path / "from-folder") == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "from-folder" / name).read_bytes()
    assert not (tmp_path / "from-hub" / "tokenizer.json").is_symlink()
    capsys.readouterr()
    # A snapshot link that leaves the repository (into another repository's blobs) is refused.
    other = hub_snapshot(tmp_path / "hub", {"config.json": b"{}"}, repo="models--org--other")
    target = next((other.parent.parent / "blobs").iterdir())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(target)
    assert authors(snapshot, tmp_path / "out") == 1
    assert "outside the input folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["merges.txt", "tokenizer.json"])
def test_tokenizer_files_linked_outside_are_refused_not_copied(source, tmp_path, capsys, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (source / name).symlink_to(secret)
    assert authors(source, tmp_path / "out") == 1
    assert f"{source / name} is a link to {secret}, outside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (source / name).unlink()
    shutil.copy(secret, source / name)  # the same content as a real file of the folder is copied
    assert authors(source, tmp_path / "out") == 0 and (tmp_path / "out" / name).read_text() == "not yours"


def test_a_config_linked_outside_is_refused(source, tmp_path, capsys):
    (source / "config.json").rename(tmp_path / "config.json")
    (source / "config.json").symlink_to(tmp_path / "config.json")
    assert authors(source, tmp_path / "out") == 1
    assert "config.json is a link to" in capsys.readouterr().err


@needs_tensorstore
def test_a_tensorstore_chunk_linked_outside_is_refused(tmp_path, capsys):
    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    write_tensorstore(tmp_path / "ckpt", arrays, ocdbt=False, metadata=True)
    chunk = next((tmp_path / "ckpt" / f"{PAX}.final_ln.scale").glob("0*"))
    shutil.move(chunk, tmp_path / "chunk")
    chunk.symlink_to(tmp_path / "chunk")
    assert convert("--format", "pax", "--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--config", PAX_CONFIG) == 1
    assert f"{chunk} is a link to {tmp_path / 'chunk'}" in capsys.readouterr().err
    chunk.unlink()
    shutil.move(tmp_path / "chunk", chunk)
    assert convert("--format", "pax", "--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--config", PAX_CONFIG) == 0


# ---------------------------------------------------------------------------------------------------- ownership
def test_force_never_replaces_a_folder_the_converter_did_not_write(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the user's own model")
    assert authors(source, out, "--force") == 1
    assert f"{out} has no .mudd-output.json marker" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "the user's own model"
    # A marker that is a link (to a real marker elsewhere) proves nothing.
    done = tmp_path / "done"
    assert authors(source, done) == 0
    (out / ".mudd-output.json").symlink_to(done / ".mudd-output.json")
    assert authors(source, out, "--force") == 1 and (out / "model.safetensors").read_text() == "the user's own model"
    # The converter's own output is replaced.
    assert authors(source, done, "--force") == 0 and json.loads((done / ".mudd-output.json").read_text()) == {
        "written_by": "mudd-convert"}


def test_force_refuses_an_output_that_is_a_link(source, tmp_path, capsys):
    assert authors(source, tmp_path / "real") == 0
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert authors(source, tmp_path / "link", "--force") == 1
    assert f"{tmp_path / 'link'} is a link; refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "real" / "model.safetensors").is_file() and (tmp_path / "link").is_symlink()


def test_vit_npz_force_respects_ownership_and_user_siblings(tmp_path, capsys):
    npz = write_npz(tmp_path / "vit.npz", synthetic_npz_arrays())
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("mine")
    for name in (".out.old-1", ".out.tmp-1", ".out.partial-1-x"):
        (tmp_path / name).mkdir()
    assert convert("--format", "vit-npz", "--input", npz, "--output", out, "--force") == 1
    assert "has no .mudd-output.json marker" in capsys.readouterr().err
    assert (out / "weights.bin").read_text() == "mine"
    assert convert("--format", "vit-npz", "--input", npz, "--output", tmp_path / "vit") == 0
    assert convert("--format", "vit-npz", "--input", npz, "--output", tmp_path / "vit", "--force") == 0
    assert all((tmp_path / name).is_dir() for name in (".out.old-1", ".out.tmp-1", ".out.partial-1-x"))


def test_a_claim_marker_that_is_a_link_does_not_make_a_sibling_removable(source, tmp_path):
    real = tmp_path / ".out.partial-1-real"
    real.mkdir()
    (real / ".mudd-claim.json").write_text('{"claimed_by": "mudd-convert", "pid": 1}')
    forged = tmp_path / ".out.partial-2-forged"
    forged.mkdir()
    (forged / "data").write_text("mine")
    (forged / ".mudd-claim.json").symlink_to(real / ".mudd-claim.json")
    assert authors(source, tmp_path / "out") == 0
    assert not real.exists() and (forged / "data").read_text() == "mine"


def test_two_forced_runs_on_one_output_one_fails_at_once_the_result_is_whole(source, tmp_path):
    out = tmp_path / "out"
    assert authors(source, out) == 0
    command = [sys.executable, "-m", "modeling_muddpythia.cli_convert", "--format", "authors-pytorch", "--input",
               str(source), "--output", str(out), "--force"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 1]), results  # one after the other, or the second refused while the first writes
    for code, err in results:
        assert code == 0 or "another mudd-convert run" in err
    assert load_file(out / "model.safetensors") and json.loads((out / ".mudd-output.json").read_text())
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- sizes
def test_npz_member_declaring_more_than_it_stores_is_refused_before_allocation(tmp_path):
    arrays = pax_arrays()
    name = f"{PAX}.final_ln.scale"
    hostile = write_npz_members(tmp_path / "hostile.npz", {k: v for k, v in arrays.items() if k != name},
                                {name: npy_header((10**9, 32))})  # 119 GiB declared, 128 bytes stored
    valid = write_npz_members(tmp_path / "valid.npz", arrays)
    result = convert_limited("--format", "pax", "--input", hostile, "--output", tmp_path / "out", "--config", PAX_CONFIG)
    assert "declares shape [1000000000, 32] float32 (128000000000 bytes) but stores 128 bytes" in one_error(result)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    result = convert_limited("--format", "pax", "--input", valid, "--output", tmp_path / "out", "--config", PAX_CONFIG)
    assert result.returncode == 0, result.stderr


def test_vit_npz_member_declaring_more_than_it_stores_is_refused_under_a_memory_limit(tmp_path):
    arrays = synthetic_npz_arrays()
    hostile = write_npz_members(tmp_path / "hostile.npz", {k: v for k, v in arrays.items() if k != "cls"},
                                {"cls": npy_header((10**9, 32))})
    result = convert_limited("--format", "vit-npz", "--input", hostile, "--output", tmp_path / "out")
    assert "member 'cls.npy' declares shape [1000000000, 32]" in one_error(result)
    result = convert_limited("--format", "vit-npz", "--input", write_npz(tmp_path / "vit.npz", arrays), "--output",
                             tmp_path / "out")
    assert result.returncode == 0, result.stderr


def test_vit_npz_unexpected_member_is_refused_before_it_is_read(tmp_path):
    """A zip bomb under an unexpected name: 1 GiB of zeros in 1 MB; the names are checked first."""
    arrays = synthetic_npz_arrays()
    path = write_npz(tmp_path / "vit.npz", arrays)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (2**28,)})
            block = bytes(2**24)
            for _ in range(2**30 // len(block)):
                member.write(block)
    assert path.stat().st_size < 5 * 2**20
    result = convert_limited("--format", "vit-npz", "--input", path, "--output", tmp_path / "out")
    assert "unexpected array(s) ['bomb']" in one_error(result)


def test_pax_unexpected_bomb_member_is_never_read(tmp_path):
    arrays = pax_arrays()
    path = write_npz_members(tmp_path / "pax.npz", arrays)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("opt_states.bomb.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (2**28,)})
            block = bytes(2**24)
            for _ in range(2**30 // len(block)):
                member.write(block)
    result = convert_limited("--format", "pax", "--input", path, "--output", tmp_path / "out", "--config", PAX_CONFIG)
    assert result.returncode == 0 and "skipping 1 arrays that are not model weights" in result.stderr, result.stderr


def test_safetensors_header_declaring_more_than_the_file_holds_is_refused(source, tmp_path):
    file = source / "model.safetensors"
    data = file.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = "tok_embeddings.weight"
    header[name]["shape"] = [10**9, 32]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:])
    result = convert_limited("--format", "authors-pytorch", "--input", source, "--output", tmp_path / "out")
    assert "not a valid safetensors file" in one_error(result)


@needs_tensorstore
def test_zarr_array_declaring_a_billion_rows_is_refused_under_a_memory_limit(tmp_path):
    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    write_tensorstore(tmp_path / "ckpt", arrays, ocdbt=False, metadata=True)
    embedding = next(name for name in arrays if name.endswith("embedding_lookup.emb_var"))
    zarray = tmp_path / "ckpt" / embedding / ".zarray"
    metadata = json.loads(zarray.read_text())
    metadata["shape"][0] = metadata["chunks"][0] = 10**9
    zarray.write_text(json.dumps(metadata))
    result = convert_limited("--format", "pax", "--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--config",
                             PAX_CONFIG)
    assert "wrong shapes" in one_error(result) and "1000000000 vocabulary rows for a vocabulary of 61" in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@needs_tensorstore
@pytest.mark.parametrize("ocdbt", [False, True])
def test_a_missing_tensorstore_chunk_is_an_error_not_zeros(tmp_path, capsys, ocdbt):
    import tensorstore as ts

    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    write_tensorstore(tmp_path / "ckpt", arrays, ocdbt=ocdbt, metadata=True)
    name = f"{PAX}.final_ln.scale"
    if ocdbt:
        kvstore = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{tmp_path / 'ckpt'}/"}}).result()
        chunk = next(key for key in kvstore.list().result() if key.decode().startswith(f"{name}/0"))
        kvstore.delete_range(ts.KvStore.KeyRange(chunk, chunk + b"\0")).result()
    else:
        next((tmp_path / "ckpt" / name).glob("0*")).unlink()
    args = ("--format", "pax", "--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--config", PAX_CONFIG, "--verify")
    assert convert(*args) == 1
    assert f"array '{name}' declares shape [{Shapes().hidden}] in 1 chunks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_tensorstore
@pytest.mark.parametrize("ocdbt", [False, True])
def test_tensorstore_paths_with_hash_percent_and_space(tmp_path, ocdbt):
    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    folder = tmp_path / "my #1 100% ckpt"
    write_tensorstore(folder, arrays, ocdbt=False, metadata=True) if not ocdbt else None
    if ocdbt:  # the fixture names the base by URL; write from a plain path and move the database there
        write_tensorstore(tmp_path / "plain", arrays, ocdbt=True, metadata=True)
        shutil.move(tmp_path / "plain", folder)
    assert convert("--format", "pax", "--input", folder, "--output", tmp_path / "out", "--config", PAX_CONFIG) == 0


@needs_tensorstore
def test_a_relative_ocdbt_path(tmp_path):
    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    write_tensorstore(tmp_path / "ckpt", arrays, ocdbt=True, metadata=True)
    result = convert_limited("--format", "pax", "--input", "ckpt", "--output", "out", "--config", PAX_CONFIG, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- config sizes
@pytest.mark.parametrize(
    ("config_class", "field"),
    [(MUDDPythiaConfig, "num_hidden_layers"), (MUDDPythiaConfig, "vocab_size"), (MUDDPythiaConfig, "hidden_size"),
     (MUDDPythiaConfig, "intermediate_size"), (MUDDPythiaConfig, "max_position_embeddings"),
     (MUDDFormerConfig, "num_key_value_heads"), (MUDDViTConfig, "num_hidden_layers"), (MUDDViTConfig, "num_labels"),
     (MUDDViTConfig, "image_size")],
)
def test_absurd_config_sizes_are_refused_at_once_naming_the_field(config_class, field):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"`{field}`"):
        config_class(**{field: 10**9})
    assert time.perf_counter() - start < 1.0


def test_large_real_model_sizes_are_accepted():
    config = MUDDFormerConfig(vocab_size=256_000, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                              num_key_value_heads=8, intermediate_size=53248, max_position_embeddings=131072)
    assert config.ffn_width(125) > config.ffn_width(0) > 0


def test_an_authors_config_with_a_billion_layers_is_refused_quickly(source, tmp_path, capsys):
    config = json.loads((source / "config.json").read_text())
    config["n_layer"] = 10**9
    (source / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert authors(source, tmp_path / "out") == 1
    assert time.perf_counter() - start < 10 and "num_hidden_layers" in capsys.readouterr().err


def test_vit_npz_with_a_billion_classes_is_refused_by_the_header_check(tmp_path):
    arrays = synthetic_npz_arrays()
    hostile = write_npz_members(tmp_path / "hostile.npz", {k: v for k, v in arrays.items() if k != "head/kernel"},
                                {"head/kernel": npy_header((32, 10**9))})
    with pytest.raises(CheckpointError, match="declares shape"):
        convert_vit_npz(hostile, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- commands
def test_mudd_eval_help_is_fast_and_shows_defaults():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "modeling_muddpythia.evaluation", "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "(default: 8)" in result.stdout and "(default: [0, 5])" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert not {"torch", "transformers", "lm_eval"} & imported


@pytest.mark.parametrize(("args", "option"), [(["--batch-size", "0"], "--batch-size"), (["--shots", "0", "-1"], "--shots"),
                                              (["--limit", "0"], "--limit"), (["--batch-size", "x"], "--batch-size")])
def test_mudd_eval_refuses_bad_options_in_one_line(tmp_path, capsys, args, option):
    from modeling_muddpythia.evaluation import table3_main

    with pytest.raises(SystemExit) as exit_info:
        table3_main([str(tmp_path), *args])
    assert exit_info.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_evaluate_model_refuses_what_lm_eval_would_mis_run(tmp_path):
    from modeling_muddpythia.evaluation import check_evaluation_options, evaluate_model

    for kwargs, field in [({"batch_size": 0}, "batch_size"), ({"num_fewshot": -1}, "num_fewshot"),
                          ({"limit": 0}, "limit"), ({"batch_size": 2.5}, "batch_size")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            evaluate_model(tmp_path, ["mudd_synth_copy"], **{"num_fewshot": 0, **kwargs})
    check_evaluation_options(num_fewshot=5, batch_size=1, limit=None)  # the valid neighbour


def test_a_malformed_task_file_is_refused_not_skipped(tmp_path):
    from modeling_muddpythia.evaluation import check_task_files, task_manager

    check_task_files(REPO / "tests" / "tasks")  # the shipped tasks are valid
    shutil.copytree(REPO / "tests" / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("data", "__pycache__"))
    (tmp_path / "tasks" / "broken.yaml").write_text("task: broken\ndataset_kwargs: {data_files: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml: not a valid lm-eval task file"):
        task_manager(include_path=tmp_path / "tasks", include_defaults=False)
    with pytest.raises(ValueError, match="task folder not found"):
        check_task_files(tmp_path / "absent")


@pytest.mark.parametrize(("args", "option"), [
    (["--steps", "0"], "--steps"), (["--batch-size", "-1"], "--batch-size"), (["--seq-length", "1"], "--seq-length"),
    (["--lr", "nan"], "--lr"), (["--lr", "-3"], "--lr"), (["--threads", "-1"], "--threads"),
])
def test_train_tiny_refuses_bad_arguments_before_work(capsys, args, option):
    from modeling_muddpythia.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-tiny", *args])
    assert exit_info.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_train_tiny_range_checks_and_demo_preset_errors(tmp_path, capsys):
    from modeling_muddpythia.cli import main
    from modeling_muddpythia.train_tiny import check_training_options

    assert main(["train-tiny", "--seq-length", "100000", "--output", str(tmp_path / "t")]) == 2
    assert "--seq-length must be an integer in [2, 512], got 100000" in capsys.readouterr().err
    check_training_options(steps=1, batch_size=1, seq_length=2, peak_lr=1e-3, seed=0, threads=None)
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({**json.loads((REPO / "configuration" / "muddpythia-tiny.json").read_text()),
                                  "num_hidden_layers": 0}))
    assert main(["demo", "--preset", str(preset), "--output", str(tmp_path / "demo")]) == 2
    assert "`num_hidden_layers` must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--max-new-tokens", "0"])


def test_converter_modules_do_not_import_their_parser():
    code = ("import sys; import modeling_muddpythia.convert, modeling_muddpythia.convert_io, "
            "modeling_muddpythia.convert_vit_npz; print('modeling_muddpythia.cli_convert' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr


@needs_tensorstore
@pytest.mark.parametrize("ocdbt", [False, True])
def test_zarr3_checkpoints_convert_and_a_missing_chunk_is_named(tmp_path, capsys, ocdbt):
    """zarr v3 (newer Orbax): chunks under `c/i/j`, several per array, in folders or an OCDBT database."""
    import tensorstore as ts

    arrays = {name: t.numpy() for name, t in cast(pax_tensors(Shapes())).items()}
    root = tmp_path / "ckpt"
    for name, array in arrays.items():
        kvstore = ({"driver": "ocdbt", "base": {"driver": "file", "path": f"{root}/"}, "path": f"{name}/"} if ocdbt
                   else {"driver": "file", "path": f"{root / name}/"})
        chunks = [max(1, size // 2) for size in array.shape]
        spec = {"driver": "zarr3", "kvstore": kvstore, "store_data_equal_to_fill_value": True, "metadata": {
            "shape": list(array.shape), "data_type": array.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}}}}
        ts.open(spec, create=True).result().write(array).result()
    args = ("--format", "pax", "--input", root, "--output", tmp_path / "out", "--config", PAX_CONFIG)
    assert convert(*args) == 0
    shutil.rmtree(tmp_path / "out")
    name = f"{PAX}.final_ln.scale"
    if ocdbt:
        kvstore = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{root}/"}}).result()
        kvstore.delete_range(ts.KvStore.KeyRange(f"{name}/c/1".encode(), f"{name}/c/1\0".encode())).result()
    else:
        (root / name / "c" / "1").unlink()
    assert convert(*args) == 1
    assert f"array '{name}' declares shape [{Shapes().hidden}] in 2 chunks of [{Shapes().hidden // 2}], but 1 chunk files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_oversized_metadata_files_are_refused_before_they_are_read(source, tmp_path, capsys):
    with open(source / "config.json", "r+b") as handle:  # a sparse 100 MB config.json
        handle.truncate(100 * 2**20)
    assert authors(source, tmp_path / "out") == 1
    assert "config.json: larger than 67108864 bytes, too large for a metadata file" in capsys.readouterr().err
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(100 * 2**20)
    valid = write_authors(tmp_path / "valid", Shapes())
    with pytest.raises(SystemExit):
        authors(valid, tmp_path / "out", "--config", big)
    assert "argument --config: cannot read" in capsys.readouterr().err
    assert authors(valid, tmp_path / "out", "--config", "{}") == 0


def test_an_index_that_is_not_utf8_is_named(source, tmp_path, capsys):
    (source / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "model.safetensors"}}')
    assert authors(source, tmp_path / "out") == 1
    assert f"{source / 'model.safetensors.index.json'}: not a valid shard index" in capsys.readouterr().err


def test_a_full_disk_during_a_forced_replacement_keeps_the_owned_output(source, tmp_path):
    out = tmp_path / "out"
    assert authors(source, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = 40_000  # the config and code fit, the weights (about 80 KB) do not

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.cli_convert", "--format", "authors-pytorch", "--input", str(source),
         "--output", str(out), "--force"], capture_output=True, text=True, preexec_fn=set_limit, cwd=REPO,
    )
    assert "the file size limit was reached (ulimit -f)" in one_error(result)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []


def test_mudd_eval_refuses_an_output_that_is_a_file_before_evaluating(tmp_path, capsys):
    from modeling_muddpythia.evaluation import run_table3

    (tmp_path / "table").write_text("")
    assert run_table3(REPO / "checkpoints" / "depth8-muddpythia", tmp_path / "table") == 2
    assert "--output" in capsys.readouterr().err and (tmp_path / "table").read_text() == ""


@pytest.mark.parametrize("field", ["num_hidden_layers", "vocab_size", "hidden_size"])
def test_a_plain_model_config_with_absurd_sizes_is_refused_naming_the_field(tmp_path, capsys, field):
    folder = tmp_path / "gptneox"
    shutil.copytree(REPO / "checkpoints" / "depth8-gptneox", folder)
    assert convert("--format", "gpt-neox", "--input", folder, "--output", tmp_path / "valid") == 0
    config = json.loads((folder / "config.json").read_text())
    config[field] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert convert("--format", "gpt-neox", "--input", folder, "--output", tmp_path / "out") == 1
    assert f"`{field}` is 1000000000, above the limit" in capsys.readouterr().err
    assert time.perf_counter() - start < 10 and not (tmp_path / "out").exists()


def test_a_lock_file_that_is_a_link_is_never_written_through(source, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / ".out.lock").symlink_to(precious)
    assert authors(source, tmp_path / "out") == 1
    assert f"{tmp_path / '.out.lock'} is a link" in capsys.readouterr().err
    assert precious.read_text() == "keep me" and not (tmp_path / "out").exists()
    (tmp_path / ".out.lock").unlink()
    assert authors(source, tmp_path / "out") == 0
