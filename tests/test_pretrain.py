"""Pretraining from scratch (`modeling_muddpythia.pretrain`, the `mudd-pretrain` command): the preset's random
initialisation, corpus reading and packing against an independent count, streaming against in-memory reading,
exact resume after SIGKILL, two-process data parallel against one process on the joint batch, --compile against
eager, the output folder as remote code, the plain twin on the same tokens, throughput/FLOPs logs and argument
checks. Tiny preset (configuration/muddpythia-tiny.json), a character tokenizer and corpora written here, CPU."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from modeling_muddpythia import pretrain, training
from modeling_muddpythia.mudd import MUDDDenseConnections

from test_finetune import CHARS, OFFLINE_ENV, char_tokenizer


REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("pretrain_worker.py")
WORDS = ["the cat sat", "a dog ran", "on the mat", "in the sun", "far away", "we go home", "quick zebra"]
CHAR_ID = {c: i + 2 for i, c in enumerate(CHARS)}  # the layout of `char_tokenizer` (EOS 0, unk 1)
EOS = 0


def documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(count)]


def write_corpus(path: Path, docs: list[str]) -> Path:
    if path.suffix == ".txt":
        path.write_text("".join(doc + "\n" for doc in docs))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"body": docs}), path, row_group_size=50)
    elif path.suffix == ".arrow":
        table = pa.table({"body": docs})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=50)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    char_tokenizer().save_pretrained(root / "tok")
    return {"root": root, "tok": root / "tok", "corpus": write_corpus(root / "corpus.jsonl", documents(400, 0))}


def cli_args(workspace, output: Path, *extra) -> list[str]:
    return ["--config", "muddpythia-tiny", "--tokenizer", str(workspace["tok"]), "--data", str(workspace["corpus"]),
            "--text-field", "body", "--output", str(output), "--cpu", "--block-size", "32", "--batch-size", "4",
            "--eval-blocks", "4", "--logging-steps", "1", "--learning-rate", "3e-3", "--warmup-steps", "1",
            *map(str, extra)]


def losses_by_step(output: Path) -> dict[int, float]:
    log = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in log if "loss" in entry}


def env() -> dict[str, str]:
    return dict(os.environ, **OFFLINE_ENV, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --------------------------------------------------------------------------------------------------- init


def test_random_init_is_the_papers_dense_connections_at_the_plain_residual():
    config = pretrain.load_config("muddpythia-tiny")
    model = pretrain.initial_model(config, seed=3)
    again = pretrain.initial_model(config, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    dense = [m for m in model.modules() if isinstance(m, MUDDDenseConnections)]
    assert len(dense) == 1 and len(dense[0].layers) == config.num_hidden_layers
    for aggregator in dense[0].layers:
        # spec section 5: W2 = 0 and the static weights one-hot on the newest state, so each stream reads exactly
        # the last layer's output: the plain residual stream
        assert torch.count_nonzero(aggregator.proj_out.weight) == 0
        expected = torch.zeros_like(aggregator.static_weights)
        expected[:, -1] = 1.0
        assert torch.equal(aggregator.static_weights, expected)
    std = model.model.embed_tokens.weight.std().item()
    assert abs(std - config.initializer_range) < 0.1 * config.initializer_range


# --------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".arrow"])
def test_packing_matches_an_independent_count_of_tokens_and_documents(tmp_path, suffix):
    docs = documents(120, seed=1)
    path = write_corpus(tmp_path / f"corpus{suffix}", docs)
    loaded = pretrain.load_documents([str(path)], text_field="body")
    packer = pretrain.Packer(32, EOS)
    blocks = list(pretrain.pack_blocks(loaded, char_tokenizer(), 32, packer=packer))
    # independently: each document's characters, then the end-of-text id, all concatenated
    stream = [token for doc in docs for token in [CHAR_ID[c] for c in doc] + [EOS]]
    assert len(blocks) == len(stream) // 32 and all(len(block) == 32 for block in blocks)
    flat = [token for block in blocks for token in block]
    assert flat == stream[:len(flat)]  # no token lost, repeated or reordered; no padding
    assert len(stream) - len(flat) < 32  # only the final partial block is left out
    assert (packer.documents, packer.tokens, packer.leftover) == (len(docs), len(stream), len(stream) - len(flat))
    ends = [i for i, token in enumerate(stream) if token == EOS]
    assert flat.count(EOS) == sum(1 for i in ends if i < len(flat))  # one end-of-text per document


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_streaming_and_in_memory_reading_give_the_same_blocks(tmp_path, suffix):
    path = write_corpus(tmp_path / f"corpus{suffix}", documents(200, seed=2))
    tokenizer = char_tokenizer()
    in_memory = pretrain.load_documents([str(path)], text_field="body")
    streamed = pretrain.load_documents([str(path)], text_field="body", streaming=True)
    import datasets

    assert isinstance(in_memory, datasets.Dataset) and isinstance(streamed, datasets.IterableDataset)
    expected = list(pretrain.pack_blocks(in_memory, tokenizer, 24))
    assert len(expected) > 20 and list(pretrain.pack_blocks(streamed, tokenizer, 24)) == expected
    # served for training: in memory a seeded permutation per pass; streaming in corpus order without a buffer,
    # and with one a seeded permutation of the same blocks
    blocks = torch.tensor(expected)
    served = pretrain.BlockStream(seed=5, blocks=blocks)
    first_pass = [b.tolist() for b in list(itertools_islice(served.blocks_in_order(), len(blocks)))]
    assert sorted(first_pass) == sorted(expected) and first_pass != expected
    assert first_pass == [b.tolist() for b in itertools_islice(pretrain.BlockStream(5, blocks=blocks).blocks_in_order(), len(blocks))]
    make = lambda: pretrain.pack_blocks(pretrain.load_documents([str(path)], "body", streaming=True), tokenizer, 24)  # noqa: E731
    plain = [b.tolist() for b in itertools_islice(pretrain.BlockStream(5, make_stream=make).blocks_in_order(), len(blocks))]
    assert plain == expected
    shuffled = [b.tolist() for b in itertools_islice(
        pretrain.BlockStream(5, make_stream=make, shuffle_buffer=8).blocks_in_order(), len(blocks))]
    assert sorted(shuffled) == sorted(expected) and shuffled != expected


def itertools_islice(iterable, count):
    import itertools

    return list(itertools.islice(iterable, count))


def test_a_gigantic_document_and_mixed_file_kinds_are_one_line_errors(tmp_path):
    (tmp_path / "zeros.txt").symlink_to("/dev/zero")
    with pytest.raises(training.TrainingError, match=r"zeros.txt line 1: longer than --max-document-bytes \(4096 bytes\)"):
        list(pretrain.load_documents([str(tmp_path / "zeros.txt")], streaming=True, max_document_bytes=4096))
    big = write_corpus(tmp_path / "big.parquet", ["x" * 5000])
    with pytest.raises(training.TrainingError, match=r"document 1: a document longer than --max-document-bytes"):
        list(pretrain.pack_blocks(pretrain.load_documents([str(big)], "body"), char_tokenizer(), 8, 4096))
    small = write_corpus(tmp_path / "small.txt", ["the cat"])
    with pytest.raises(training.TrainingError, match="--data: mixes file kinds"):
        pretrain.load_documents([str(small), str(big)])


# --------------------------------------------------------------------------------------------------- the command


def test_pretrain_writes_a_remote_code_folder_a_plain_twin_and_a_report(workspace, tmp_path, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {}
    step = pretrain.PretrainTrainer.training_step

    def record(self, model, inputs, num_items_in_batch=None):
        seen.setdefault(type(self.model).__name__, []).append(inputs["input_ids"].clone())
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(pretrain.PretrainTrainer, "training_step", record)
    output = tmp_path / "run"
    assert pretrain.main(cli_args(workspace, output, "--max-steps", 5, "--save-steps", 5, "--plain-twin")) == 0
    # the twin saw exactly the MUDD run's token stream, batch by batch
    assert sorted(seen) == ["GPTNeoXForCausalLM", "MUDDPythiaForCausalLM"]
    assert len(seen["MUDDPythiaForCausalLM"]) == 5
    assert all(torch.equal(a, b) for a, b in zip(seen["MUDDPythiaForCausalLM"], seen["GPTNeoXForCausalLM"], strict=True))
    # logs: tokens, FLOPs, throughput
    log = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert [entry["tokens"] for entry in log] == [4 * 32 * s for s in range(1, 6)]
    assert all(entry["tokens_per_second"] > 0 for entry in log[1:])
    flops = pretrain.forward_flops_per_token(pretrain.initial_model(pretrain.load_config("muddpythia-tiny"), 0), 32)
    assert log[-1]["train_flops"] == pytest.approx(3 * flops * log[-1]["tokens"])
    report = (output / "report.md").read_text()
    assert "| MUDD | 5 | 640 |" in report and "| plain twin (GPTNeoX) | 5 | 640 |" in report
    assert (output / "report.png").stat().st_size > 1000
    heldout = json.loads((output / "heldout_loss.json").read_text())
    assert set(heldout) == {"MUDD", "plain twin (GPTNeoX)"} and all(0 < v < 10 for v in heldout.values())
    # the folder loads as remote code in a process that never imports the package; the twin without remote code
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(output)!r}, trust_remote_code=True)
twin = AutoModelForCausalLM.from_pretrained({str(output / 'plain-twin')!r})
ids = torch.tensor([[2, 3, 4, 5, 0, 6]])
print(json.dumps({{"module": type(model).__module__, "twin": type(twin).__name__,
                   "logits": model(ids).logits[0, -1, :5].tolist()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.") and loaded["twin"] == "GPTNeoXForCausalLM"
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(output)
    expected = local(torch.tensor([[2, 3, 4, 5, 0, 6]])).logits[0, -1, :5]
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)


def test_flops_budget_gives_the_twin_the_mudd_runs_training_flops(workspace, tmp_path):
    config = pretrain.load_config("muddpythia-tiny")
    mudd, twin = pretrain.initial_model(config, 0), pretrain.initial_model(pretrain.plain_twin_config(config), 0)
    from torch.utils.flop_counter import FlopCounterMode

    def direct(model, length):  # the count at the full length, for the extrapolation
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=torch.zeros((1, length), dtype=torch.long))
        return counter.get_total_flops() / length

    for model in (mudd, twin):
        assert pretrain.forward_flops_per_token(model, 96) == pytest.approx(direct(model, 96), rel=1e-9)
    args = pretrain.parse_pretrain_args(cli_args(workspace, tmp_path, "--max-steps", 200, "--plain-twin",
                                                 "--twin-budget", "flops"))
    steps = pretrain.twin_steps(args, 3 * direct(mudd, 32), twin, 32)
    assert steps == round(200 * direct(mudd, 32) / direct(twin, 32)) and steps > 200  # the dense connections cost


@pytest.mark.parametrize("reading", [[], ["--streaming", "--shuffle-buffer", "16"]], ids=["in-memory", "streaming"])
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(workspace, tmp_path, reading):
    reference = tmp_path / "reference"
    argv = cli_args(workspace, reference, "--max-steps", 8, "--save-steps", 2, *reading)
    assert pretrain.main(argv) == 0
    killed = tmp_path / "killed"
    argv = cli_args(workspace, killed, "--max-steps", 8, "--save-steps", 2, *reading)
    result = subprocess.run([sys.executable, str(WORKER), "kill-at", "5", "--", *argv], capture_output=True,
                            text=True, env=env(), timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((killed / "checkpoint-4" / pretrain.DATA_STATE).read_text())["blocks_served"] == 16
    # the same command plus a bare --resume-from-checkpoint
    assert pretrain.main([*argv, "--resume-from-checkpoint"]) == 0
    expected, got = losses_by_step(reference), losses_by_step(killed)
    assert sorted(got) == list(range(1, 9)) and got == pytest.approx(expected, abs=1e-6)
    a, b = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resuming_with_other_data_or_seed_is_refused(workspace, tmp_path, capsys):
    output = tmp_path / "run"
    assert pretrain.main(cli_args(workspace, output, "--max-steps", 2, "--save-steps", 2)) == 0
    capsys.readouterr()
    assert pretrain.main(cli_args(workspace, output, "--max-steps", 4, "--seed", "7", "--resume-from-checkpoint")) == 1
    err = capsys.readouterr().err
    assert "--seed differs from the run that saved it (42 there, 7 now)" in err
    other = write_corpus(tmp_path / "other.jsonl", documents(400, 9))
    argv = cli_args(workspace, output, "--max-steps", 4, "--resume-from-checkpoint")
    argv[argv.index("--data") + 1] = str(other)
    assert pretrain.main(argv) == 1
    assert "--data differs from the run that saved it" in capsys.readouterr().err
    assert pretrain.main(cli_args(workspace, output, "--max-steps", 4, "--resume-from-checkpoint")) == 0  # neighbour


def test_two_processes_equal_one_process_on_the_joint_batch(workspace, tmp_path):
    single = tmp_path / "single"
    assert pretrain.main(cli_args(workspace, single, "--max-steps", 3, "--batch-size", 4)) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "modeling_muddpythia.pretrain", *cli_args(workspace, double, "--max-steps", 3, "--batch-size", 2)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(env(), GLOO_SOCKET_IFNAME="lo"), start_new_session=True)
    try:
        out, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"torchrun did not finish:\n{out[-4000:]}")
    assert process.returncode == 0, out[-6000:]
    assert losses_by_step(double) == pytest.approx(losses_by_step(single), abs=1e-5)
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    state = json.loads((double / "checkpoint-3" / pretrain.DATA_STATE).read_text())
    assert state["blocks_per_step"] == 4 and state["blocks_served"] == 12


def test_compile_and_eager_agree(workspace, tmp_path):
    """--compile captures the whole model in one graph (fullgraph) inside Trainer; the backend here is aot_eager, the
    same captured forward and backward graphs without Inductor's code generation (minutes on two CPU cores). Inductor
    against eager is tests/test_compile.py::test_compiled_training_step_equals_eager."""
    small = tmp_path / "small.json"
    preset = json.loads((REPO / "configuration" / "muddpythia-tiny.json").read_text())
    small.write_text(json.dumps(preset | {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8,
                                          "intermediate_size": 256}))
    runs = {}
    for mode in ("eager", "compiled"):
        argv = cli_args(workspace, tmp_path / mode, "--max-steps", 3)
        argv[argv.index("--config") + 1] = str(small)
        compile_options = ["--compile", "--compile-backend", "aot_eager"] if mode == "compiled" else []
        assert pretrain.main([*argv, *compile_options]) == 0
        runs[mode] = losses_by_step(tmp_path / mode)
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-4)
    a, b = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    torch._dynamo.reset()


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
    (["--max-steps", "4", "--warmup-steps", "4"], "--warmup-steps 4 must be less than --max-steps 4"),
    (["--max-steps", "4", "--twin-budget", "flops"], "--twin-budget needs --plain-twin"),
    (["--max-steps", "4", "--block-size", "1"], "argument --block-size: must be at least 2, got 1"),
    (["--max-steps", "4", "--learning-rate", "nan"], "argument --learning-rate: must be a finite number"),
])
def test_bad_options_are_one_line(workspace, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(cli_args(workspace, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_inputs_are_one_line_errors_and_leave_nothing(workspace, tmp_path, capsys):
    big = char_tokenizer()
    big.add_tokens([f"<extra_{i}>" for i in range(600)])
    big.save_pretrained(tmp_path / "big")
    cases = [
        (["--config", "no-such-preset"], "--config no-such-preset: neither a file nor a preset (muddformer-2.8b"),
        (["--block-size", "513"], "--block-size 513 exceeds the config's max_position_embeddings (512)"),
        (["--tokenizer", str(tmp_path / "big")], "--tokenizer: the tokenizer has 631 ids but the model's vocabulary has 512"),
        (["--eval-blocks", "100000"], "--eval-blocks 100000: the corpus has only"),
    ]
    for (option, value), message in cases:
        argv = cli_args(workspace, tmp_path / "out", "--max-steps", 2)
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        assert pretrain.main(argv) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and message in lines[0], (message, lines)
        assert not (tmp_path / "out").exists()


def test_help_is_fast_and_light():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "modeling_muddpythia.cli_pretrain", "--help"],
                            capture_output=True, text=True, cwd=REPO, env=env(), timeout=60)
    assert result.returncode == 0 and "--plain-twin" in result.stdout and "(default: 0.0003)" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "datasets"}


def test_a_stream_started_at_a_position_serves_the_rest_of_the_uninterrupted_order(tmp_path):
    """Resume starts the stream at the saved block position: what follows equals the uninterrupted order, across
    the end of a pass, in memory and streaming."""
    path = write_corpus(tmp_path / "corpus.jsonl", documents(60, seed=4))
    tokenizer = char_tokenizer()
    blocks = torch.tensor(list(pretrain.pack_blocks(pretrain.load_documents([str(path)], "body"), tokenizer, 16)))
    make = lambda: pretrain.pack_blocks(pretrain.load_documents([str(path)], "body", streaming=True), tokenizer, 16)  # noqa: E731
    for stream in (pretrain.BlockStream(3, blocks=blocks), pretrain.BlockStream(3, make_stream=make, shuffle_buffer=5)):
        whole = [example["input_ids"].tolist() for example in itertools_islice(iter(stream), 3 * len(blocks))]
        stream.start = len(blocks) + 7  # in the second pass
        rest = [example["input_ids"].tolist() for example in itertools_islice(iter(stream), 2 * len(blocks) - 7)]
        assert rest == whole[len(blocks) + 7:]
        assert whole[:len(blocks)] != whole[len(blocks):2 * len(blocks)]  # each pass has its own seeded order


def test_report_to_tensorboard_writes_the_logged_losses(workspace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    assert pretrain.main(cli_args(workspace, output, "--max-steps", 3, "--report-to", "tensorboard",
                                  "--peak-tflops", "0.5")) == 0
    events = EventAccumulator(str(next((output / "runs").iterdir()))).Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses_by_step(output), abs=1e-5)
    assert {"train/tokens_per_second", "train/tokens", "train/mfu"} <= set(events.Tags()["scalars"])
    # MFU: achieved training FLOP/s over the given peak
    log = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"] if "mfu" in entry]
    flops_per_token = log[-1]["train_flops"] / log[-1]["tokens"]
    assert log[-1]["mfu"] == pytest.approx(log[-1]["tokens_per_second"] * flops_per_token / 0.5e12, rel=1e-2, abs=1e-4)


def test_resuming_a_run_that_reached_max_steps_adds_no_step(workspace, tmp_path):
    """Killed after its last checkpoint (while saving the final model, or training the twin): resuming restores
    that checkpoint instead of training one more step."""
    output = tmp_path / "run"
    argv = cli_args(workspace, output, "--max-steps", 4, "--save-steps", 2)
    assert pretrain.main(argv) == 0
    before = load_file(output / "model.safetensors")
    assert pretrain.main([*argv, "--resume-from-checkpoint"]) == 0
    assert sorted(losses_by_step(output)) == [1, 2, 3, 4]
    after = load_file(output / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
