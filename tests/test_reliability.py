"""Faults, races and hostile input for `mudd-convert` and `mudd-finetune` (issue 12), and their fast `--help`.

Each test provokes the problem for real where this machine allows it (a held claim, a file size limit, a file as
the output's parent, names that are not UTF-8, corrupted checkpoints, a weight turned NaN mid-training); read-only
folders and unreadable files are provoked in a subprocess running as an unprivileged user (root ignores
permissions). Written shards are always re-opened with the safetensors library.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_fixtures import PAX, Shapes, authors_tensors, pax_tensors
from test_convert import cast, leftovers, write_authors
from modeling_muddpythia import convert_io
from modeling_muddpythia.cli_convert import main as convert_main
from modeling_muddpythia.convert_io import ShardedSafetensorsWriter, open_safetensors
from modeling_muddpythia.safe_output import Claim

REPO = Path(__file__).resolve().parent.parent


def convert(*args) -> int:
    return convert_main([os.fspath(arg) for arg in args])


def authors(folder: Path, out: Path, *extra) -> int:
    return convert("--format", "authors-pytorch", "--input", folder, "--output", out, *extra)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def reopen_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every weights file of a converted folder opened with safe_open; returns all tensors."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for file in files:
        with open_safetensors(folder / file) as handle:  # safe_open (also for names that are not UTF-8)
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.fixture
def source(tmp_path):
    return write_authors(tmp_path / "src", Shapes())


# ---------------------------------------------------------------------------------------------------- reading
def test_written_shards_reopen_with_safe_open_and_hold_the_source_values(tmp_path):
    tensors = cast(authors_tensors(Shapes(), seed=11))
    src = write_authors(tmp_path / "src", Shapes(), tensors)
    out = tmp_path / "out"
    assert authors(src, out, "--max-shard-size", "15KB") == 0
    written = reopen_shards(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and set(written) == set(index)
    torch.testing.assert_close(written["model.layers.1.self_attn.q_proj.weight"], tensors["layers.1.attention.wq.weight"], rtol=0, atol=0)
    torch.testing.assert_close(written["lm_head.weight"], tensors["output.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_integer_or_quantized_source_tensors_are_refused(source, tmp_path, capsys, dtype):
    tensors = load_file(source / "model.safetensors")
    tensors["layers.0.attention.wq.weight"] = (tensors["layers.0.attention.wq.weight"] * 100).to(dtype)
    save_file(tensors, source / "model.safetensors")
    assert authors(source, tmp_path / "out", "--verify") == 1
    err = capsys.readouterr().err
    assert "integer or quantized source tensors" in err and "'layers.0.attention.wq.weight'" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overlapping_data_offsets_are_refused(source, tmp_path, capsys):
    file = source / "model.safetensors"
    data = file.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    # two tensors of the same byte size: point the second at the first one's bytes
    a, b = "layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:])
    assert authors(source, tmp_path / "out") == 1
    assert "invalid offset" in capsys.readouterr().err and leftovers(tmp_path) == []


def test_duplicate_npz_members_are_refused(tmp_path, capsys):
    arrays = {name: t.float().numpy() for name, t in pax_tensors(Shapes()).items()}
    np.savez(tmp_path / "pax.npz", **arrays)
    name = f"{PAX}.final_ln.scale"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(tmp_path / "pax.npz", "a") as archive:
        with archive.open(f"{name}.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros_like(arrays[name]))
    assert convert("--format", "pax", "--input", tmp_path / "pax.npz", "--output", tmp_path / "out",
                   "--config", '{"vocab_size": 61}') == 1
    assert f"several members named ['{name}']" in capsys.readouterr().err

    from modeling_muddpythia.convert_vit_npz import CheckpointError, read_npz

    with pytest.raises(CheckpointError, match="several members named"):
        read_npz(tmp_path / "pax.npz")


def test_lm_head_wider_than_the_embedding_is_refused(tmp_path, capsys):
    tensors = cast(pax_tensors(Shapes()))
    head = f"{PAX}.softmax.logits_ffn.linear.w"
    tensors[head] = torch.cat([tensors[head], torch.randn(tensors[head].shape[0], 6)], dim=1)  # 70 > 64 columns
    save_file(tensors, tmp_path / "pax.safetensors")
    assert convert("--format", "pax", "--input", tmp_path / "pax.safetensors", "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "padded vocabulary dimensions disagree" in err and f"'{head}': 70" in err
    # equal padding is cut only to an explicit vocab_size, and the log says so
    save_file(cast(pax_tensors(Shapes())), tmp_path / "ok.safetensors")
    assert convert("--format", "pax", "--input", tmp_path / "ok.safetensors", "--output", tmp_path / "out",
                   "--config", '{"vocab_size": 61}') == 0
    assert "keeping the first 61 of 64 vocabulary rows (padding)" in capsys.readouterr().err


def test_mixed_dtypes_are_not_rounded_without_dtype(tmp_path, capsys):
    tensors = cast(authors_tensors(Shapes(), seed=4), torch.bfloat16)
    exact = torch.randn(tensors["dense_bs.1"].shape, dtype=torch.float64).float() + 0.123456789
    tensors["dense_bs.1"] = exact  # one float32 tensor among bfloat16 ones: its digits must survive
    src = write_authors(tmp_path / "src", Shapes(), tensors, layout="sharded")
    assert authors(src, tmp_path / "out") == 0
    assert "mix dtypes (74 bfloat16, 1 float32); writing float32" in capsys.readouterr().err
    written = reopen_shards(tmp_path / "out")
    assert written["model.dense.layers.1.static_weights"].dtype == torch.float32
    torch.testing.assert_close(written["model.dense.layers.1.static_weights"], exact, rtol=0, atol=0)
    assert authors(src, tmp_path / "narrow", "--dtype", "bfloat16") == 0
    assert "--dtype bfloat16: rounding 1 float32 source tensors" in capsys.readouterr().err
    assert reopen_shards(tmp_path / "narrow")["model.dense.layers.1.static_weights"].dtype == torch.bfloat16


def test_float16_overflow_is_an_error(source, tmp_path, capsys):
    tensors = load_file(source / "model.safetensors")
    tensors["norm.weight"][0] = 1e6  # finite in float32, inf in float16
    save_file(tensors, source / "model.safetensors")
    assert authors(source, tmp_path / "out", "--dtype", "float16") == 1
    assert "1 finite values overflow float16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- where it writes
def test_output_that_is_contains_or_lies_inside_the_input_is_refused(source, tmp_path, capsys):
    before = (source / "model.safetensors").read_bytes()
    cases = [(source, "is the input model"), (source / "converted", "lies inside the input model"),
             (tmp_path, "contains the input model")]
    for output, message in cases:
        assert authors(source, output, "--force") == 1
        assert message in capsys.readouterr().err
    assert authors(source / "model.safetensors", source / "sub", "--force") == 1  # a weights file: its folder counts
    assert "lies inside the input model" in capsys.readouterr().err
    assert (source / "model.safetensors").read_bytes() == before and sorted(p.name for p in source.iterdir()) == ["config.json", "model.safetensors"]


def test_a_second_run_on_the_same_output_fails_while_the_first_holds_it(source, tmp_path, capsys):
    out = tmp_path / "out"
    with Claim(out, "mudd-convert"):  # what a concurrent run holds for its whole duration
        for extra in ((), ("--force",)):
            assert authors(source, out, *extra) == 1
            err = capsys.readouterr().err
            assert f"another mudd-convert run (pid {os.getpid()}) is writing this output" in err
            assert not out.exists()
    assert authors(source, out) == 0 and leftovers(tmp_path) == []
    assert authors(source, out) == 1  # finished: an existing output needs --force, never silently replaced
    assert "already exists; pass --force" in capsys.readouterr().err


def test_two_concurrent_processes_one_wins_the_other_fails_clearly(source, tmp_path):
    """Real processes: the first holds the claim (paused inside the conversion), the second must fail at once."""
    out, go = tmp_path / "out", tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from modeling_muddpythia import convert_io\n"
        "from modeling_muddpythia.cli_convert import main\n"
        "original = convert_io.ShardedSafetensorsWriter.write\n"
        "def paused(self, name, tensor):\n"
        f"    while not os.path.exists({str(go)!r}):\n"
        "        time.sleep(0.05)\n"
        "    original(self, name, tensor)\n"
        "convert_io.ShardedSafetensorsWriter.write = paused\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", script, "--format", "authors-pytorch", "--input", str(source), "--output", str(out)]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
            assert time.time() < deadline and first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        go.write_text("")  # the second process is slower to start than the first is to finish: keep this one paused
        go.unlink()
        second = subprocess.run(command + ["--force"], capture_output=True, text=True)
        assert second.returncode == 1 and f"(pid {first.pid}) is writing this output" in second.stderr, second.stderr
        assert not out.exists()
    finally:
        go.write_text("")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    go.unlink()
    assert reopen_shards(out) and leftovers(tmp_path) == []


def test_stale_lock_file_and_partial_folders_of_dead_runs_are_cleaned(source, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("4242\n")  # a killed run's lock file: nobody holds the lock
    stale = tmp_path / ".out.partial-4242-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / ".mudd-claim.json").write_text('{"claimed_by": "mudd-convert", "pid": 4242}')  # what a run writes first
    other = tmp_path / ".other.partial-1-aa"  # another output's leftovers are not ours to remove
    other.mkdir()
    # Siblings the user made, whatever their names, carry no claim marker and stay.
    user_made = [".out.old-1", ".out.tmp-2", ".out.partial-7-user", ".out.replaced-8-user"]
    for name in user_made:
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.txt").write_text("mine")
    assert authors(source, out) == 0
    assert f"removed {stale}, left behind by an interrupted run" in capsys.readouterr().err
    assert leftovers(tmp_path) == sorted([".other.partial-1-aa", *user_made])
    assert all((tmp_path / name / "precious.txt").read_text() == "mine" for name in user_made)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_mode_follows_the_umask(source, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert authors(source, tmp_path / "out") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_files_are_fsynced_before_the_rename(source, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.fspath(a), os.fspath(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    assert authors(source, out, "--max-shard-size", "20KB") == 0
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
    staging = events[publish][1]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = {f"{staging}/{p.name}" for p in out.iterdir()}
    assert written <= synced and staging in synced
    assert ("fsync", str(tmp_path)) in events[publish:]  # the parent, after the rename


def test_a_bad_tokenizer_fails_before_any_weight_is_written(source, tmp_path, capsys, monkeypatch):
    writes = []
    monkeypatch.setattr(ShardedSafetensorsWriter, "write", lambda self, name, tensor: writes.append(name))
    assert authors(source, tmp_path / "out", "--tokenizer", tmp_path / "nowhere") == 1
    assert f"--tokenizer {tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert authors(source, tmp_path / "out", "--tokenizer", empty) == 1
    assert "none of ['tokenizer.json'" in capsys.readouterr().err
    assert writes == []


# ---------------------------------------------------------------------------------------------------- file system errors
def test_output_parent_that_is_a_file(source, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert authors(source, tmp_path / "file.txt" / "out") == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"mudd-convert: error: {tmp_path / 'file.txt' / 'out'}: cannot create it: {tmp_path / 'file.txt'} is a file, not a folder"]


def test_disk_full_while_writing_names_the_shard(source, tmp_path, capsys, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(convert_io, "open", lambda path, mode="r": Full(real_open(path, mode)), raising=False)
    assert authors(source, tmp_path / "out") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "model.safetensors: the disk is full (No space left on device)" in lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_file_size_limit_is_one_line_and_leaves_nothing(source, tmp_path):
    """`ulimit -f`: the kernel refuses the write (Python ignores SIGXFSZ) with EFBIG."""
    limit = 40_000  # the config and code fit, the weights (about 80 KB) do not

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.cli_convert", "--format", "authors-pytorch", "--input", str(source),
         "--output", str(tmp_path / "out")], capture_output=True, text=True, preexec_fn=set_limit, cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "model.safetensors: the file size limit was reached (ulimit -f)" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


UNPRIVILEGED = """
import json, os, sys
from pathlib import Path
from modeling_muddpythia.cli_convert import main
root = Path(sys.argv[1])
results = {}
def run(name, *args):
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    results[name] = [code, err.getvalue()]
src = root / "src"
run("read_only", "--format", "authors-pytorch", "--input", src, "--output", root / "ro" / "out")
run("unreadable_file", "--format", "authors-pytorch", "--input", root / "locked", "--output", root / "w" / "out1")
run("unreadable_config", "--format", "authors-pytorch", "--input", root / "noconfig", "--output", root / "w" / "out2")
(root / "results.json").write_text(json.dumps(results))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="uses an unprivileged user id")
def test_read_only_output_and_unreadable_input_as_an_unprivileged_user(tmp_path_factory):
    root = Path(os.path.realpath(tmp_path_factory.mktemp("unprivileged")))
    os.chmod(root, 0o777)
    for parent in root.parents:  # pytest's base folder is private to its owner
        if parent != Path("/") and stat.S_IMODE(parent.stat().st_mode) & 0o005 != 0o005:
            os.chmod(parent, parent.stat().st_mode | 0o005)
    src = write_authors(root / "src", Shapes())
    for folder in ("locked", "noconfig"):
        write_authors(root / folder, Shapes())
    os.chmod(root / "locked" / "model.safetensors", 0)
    os.chmod(root / "noconfig" / "config.json", 0)
    (root / "ro").mkdir(mode=0o555)
    os.chmod(root / "ro", 0o555)
    (root / "w").mkdir()
    os.chmod(root / "w", 0o777)
    for path in [src, *src.iterdir(), root / "locked", root / "noconfig"]:
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) | 0o005 if path.is_dir() else 0o644) if path != root / "locked" / "model.safetensors" else None
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HOME": str(root)}
    command = [sys.executable, "-c", UNPRIVILEGED, str(root)]
    if os.geteuid() == 0:  # root ignores permissions: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    expected = {
        "read_only": f"{root / 'ro' / '.out.lock'}: cannot create the lock file for {root / 'ro' / 'out'}: permission denied",
        "unreadable_file": f"{root / 'locked' / 'model.safetensors'}: cannot read it: permission denied",
        "unreadable_config": f"{root / 'noconfig' / 'config.json'}: cannot read it: permission denied",
    }
    for name, message in expected.items():
        code, err = results[name]
        assert code == 1 and error_lines(err) == [f"mudd-convert: error: {message}"], (name, err)
    assert list((root / "ro").iterdir()) == []


def test_non_utf8_paths_convert_and_the_card_shows_them_escaped(tmp_path, capsys):
    base = os.fsencode(tmp_path)
    src = Path(os.fsdecode(base + b"/src-\xff"))
    out = Path(os.fsdecode(base + b"/out-\xfe"))
    write_authors(src, Shapes())
    assert authors(src, out) == 0
    card = (out / "README.md").read_text()
    assert "# out-\\xfe" in card and "`src-\\xff`" in card
    assert reopen_shards(out)


def test_bad_layer_counts_are_one_line(source, tmp_path, capsys):
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "n_layer": "3"}))
    assert authors(source, tmp_path / "out") == 1
    assert error_lines(capsys.readouterr().err) == [
        "mudd-convert: error: the authors' config.json: n_layer must be a positive integer, got '3' (a str)"]

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(neox)
    config = json.loads((neox / "config.json").read_text())
    (neox / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    assert convert("--format", "gpt-neox", "--input", neox, "--output", tmp_path / "out") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "num_hidden_layers is 0; a model needs at least 1 layer" in lines[0]


# ---------------------------------------------------------------------------------------------------- --help
def test_help_is_fast_and_imports_neither_torch_nor_transformers():
    for module in ("modeling_muddpythia.cli_convert", "modeling_muddpythia.cli_finetune",
                   "modeling_muddpythia.cli_pretrain"):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True,
                                text=True, cwd=REPO)
        elapsed = time.perf_counter() - start
        assert result.returncode == 0 and "usage:" in result.stdout
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "argparse" in imported  # the record works
        assert not imported & {"torch", "transformers", "numpy"}, (module, sorted(imported & {"torch", "transformers"}))
        assert elapsed < 2.0, f"{module} --help took {elapsed:.2f}s"  # about 0.1 s; generous for a loaded machine


@pytest.mark.parametrize("module", ["convert", "finetune", "pretrain"])
def test_every_option_has_help_text_and_its_default(module):
    from modeling_muddpythia import cli_convert as convert_command, cli_finetune as finetune_command
    from modeling_muddpythia import cli_pretrain as pretrain_command

    commands = {"convert": convert_command, "finetune": finetune_command, "pretrain": pretrain_command}
    parser = commands[module].build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.option_strings:
            assert "(default" in action.help or "(required" in action.help, (action.dest, action.help)


def test_muddify_does_not_offer_vit():
    from modeling_muddpythia.cli_finetune import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "GPTNeoXForCausalLM (Pythia) or LlamaForCausalLM" in help_text and "ViT" not in help_text


# ---------------------------------------------------------------------------------------------------- mudd-eval
def test_eval_refuses_a_model_folder_with_missing_weights(tmp_path, capsys):
    from modeling_muddpythia.convert_io import missing_weights
    from modeling_muddpythia.evaluation import run_table3

    folder = tmp_path / "tiny"
    shutil.copytree(REPO / "checkpoints" / "depth8-muddpythia", folder)
    assert missing_weights(folder) == []
    weights = load_file(folder / "model.safetensors")
    del weights["model.dense.layers.1.proj_in.weight"], weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert missing_weights(folder) == ["model.dense.layers.1.proj_in.weight", "model.norm.weight"]
    assert run_table3(folder, tmp_path / "table") == 2
    assert "the saved weights lack 2 tensors the model needs" in capsys.readouterr().err
    assert not (tmp_path / "table").exists()


def test_file_size_limit_in_the_vit_npz_path_is_one_line(tmp_path):
    """vit-npz saves with save_pretrained: safetensors' own write error (naming the OS error only in its text)."""
    from test_muddvit import synthetic_npz_arrays, write_npz

    npz = write_npz(tmp_path / "vit.npz", synthetic_npz_arrays())
    limit = 20_000

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.cli_convert", "--format", "vit-npz", "--input", str(npz),
         "--output", str(tmp_path / "out")], capture_output=True, text=True, preexec_fn=set_limit, cwd=REPO,
    )
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert f"{tmp_path / 'out'}: the file size limit was reached (ulimit -f)" in lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
