"""The depth experiment: the shipped logs follow the protocol, the summary and the write-up's table follow
from the logs, the shipped checkpoints give their logged numbers, and the run script's metrics are right."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modeling_muddpythia import depth_experiment as experiment
from modeling_muddpythia.synthetic import build_tokenizer, task_rows
from modeling_muddpythia.train_tiny import TINY_SHAPE, token_batches


ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "experiments" / "depth" / "PROTOCOL.md"
LOGS = experiment.load_logs()
needs_logs = pytest.mark.skipif(not LOGS, reason="no depth-experiment logs shipped yet")


def test_protocol_file_states_the_constants_the_code_uses():
    text = PROTOCOL.read_text()
    assert f"MUDD_STEPS = {experiment.MUDD_STEPS}**" in text
    depths = ", ".join(map(str, experiment.DEPTHS[:-1])) + f" and {experiment.DEPTHS[-1]} blocks"
    assert f"**Depths**: {depths}" in text
    assert "**Seeds**: " + ", ".join(map(str, experiment.SEEDS)) + "." in text
    assert f"token_batches(tokenizer, {experiment.HELDOUT_SEED}, {experiment.BATCH_SIZE}, {experiment.SEQ_LENGTH})" in text
    assert f"The depth-{experiment.SHIPPED_DEPTH} pair of seed {experiment.SHIPPED_SEED}" in text


@needs_logs
def test_shipped_logs_are_the_protocols_18_runs():
    runs = {(r["depth"], r["seed"], r["arch"]) for r in LOGS}
    assert runs == set(itertools.product(experiment.DEPTHS, experiment.SEEDS, experiment.ARCHS))
    assert len(LOGS) == 18
    for r in LOGS:
        assert (r["batch_size"], r["seq_length"], r["peak_lr"]) == (8, 256, 3e-3), r["run"]
        assert (r["hidden_size"], r["heldout_seed"], r["heldout_tokens"]) == (64, 20_000, 8 * 8 * 256), r["run"]
        assert r["mudd_steps"] == experiment.MUDD_STEPS and r["eval_documents"] == 300, r["run"]
        # held-out loss at step 0 and after every tenth; the outcome is the last point (no checkpoint selection)
        assert [p["step"] for p in r["curve"]] == [round(k * r["steps"] / 10) for k in range(11)], r["run"]
        assert r["curve"][-1]["heldout_loss"] == r["heldout_loss"], r["run"]
        assert r["tokens"] == r["steps"] * 8 * 256


@needs_logs
def test_each_pair_starts_equal_and_gets_equal_compute():
    by_run = {(r["depth"], r["seed"], r["arch"]): r for r in LOGS}
    for depth, seed in itertools.product(experiment.DEPTHS, experiment.SEEDS):
        plain, mudd = by_run[(depth, seed, "plain")], by_run[(depth, seed, "mudd")]
        # same function at step 0 -> the same held-out loss; the dense connections only add parameters
        assert plain["curve"][0]["heldout_loss"] == pytest.approx(mudd["curve"][0]["heldout_loss"], abs=1e-5)
        assert mudd["parameters"] > plain["parameters"]
        assert mudd["steps"] == experiment.MUDD_STEPS
        ratio = mudd["forward_flops_per_token"] / plain["forward_flops_per_token"]
        assert plain["steps"] == round(experiment.MUDD_STEPS * ratio)
        assert plain["train_flops"] == pytest.approx(mudd["train_flops"], rel=2e-3)
        # FlopCounterMode's count of the plain model, by hand: 2 FLOPs per weight of every matmul (q/k/v, output,
        # two FFN layers per block, the untied head). Attention scores are not in it: torch's CPU sdpa kernel is
        # not counted, so the MUDD overhead is relative to the projection and FFN FLOPs only.
        hidden, ffn = TINY_SHAPE["hidden_size"], TINY_SHAPE["intermediate_size"]
        per_block = 2 * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * ffn)
        assert plain["forward_flops_per_token"] == depth * per_block + 2 * hidden * 200


@needs_logs
def test_summary_is_mean_and_sample_sd_of_the_logs():
    summary = {row["depth"]: row for row in experiment.depth_summary(LOGS)}
    for depth in experiment.DEPTHS:
        for arch in experiment.ARCHS:
            values = [r["heldout_loss"] for r in LOGS if r["depth"] == depth and r["arch"] == arch]
            assert summary[depth][arch]["heldout_loss"][0] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert summary[depth][arch]["heldout_loss"][1] == pytest.approx(statistics.stdev(values), abs=1e-12)
        runs = {(r["seed"], r["arch"]): r["heldout_loss"] for r in LOGS if r["depth"] == depth}
        differences = [runs[(s, "mudd")] - runs[(s, "plain")] for s in experiment.SEEDS]
        assert summary[depth]["difference"][0] == pytest.approx(statistics.mean(differences), abs=1e-12)
        assert summary[depth]["difference"][1] == pytest.approx(statistics.stdev(differences), abs=1e-12)
        assert summary[depth]["mudd_better_seeds"] == sum(d < 0 for d in differences)


@needs_logs
def test_written_up_depth_table_is_the_one_the_logs_give():
    table = experiment.depth_table(experiment.depth_summary(LOGS))
    page = ROOT / "experiments" / "depth" / "README.md"
    assert table in page.read_text(), "experiments/depth/README.md's table is not what the shipped logs give"
    # the table has one row per depth with the numbers of the logs, to the printed precision
    rows = [line for line in table.splitlines()[2:]]
    assert [int(row.split("|")[1]) for row in rows] == list(experiment.DEPTHS)
    first = LOGS[0]
    assert f"{first['parameters']:,}" in rows[0]


@needs_logs
def test_shipped_checkpoints_give_their_logged_heldout_loss():
    """Reload the two shipped models and recompute the held-out loss with a plain cross-entropy over shifted logits:
    it must be the loss logged at the end of training (so the checkpoints are the final models of those runs)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    heldout = list(itertools.islice(token_batches(tokenizer, experiment.HELDOUT_SEED, 8, 256), 8))
    for arch, folder in experiment.SHIPPED_NAMES.items():
        path = experiment.CHECKPOINTS_DIR / folder
        log = json.loads((path / "training_log.json").read_text())
        assert log == json.loads((experiment.LOG_DIR / f"{log['run']}.json").read_text())
        assert (log["depth"], log["seed"], log["arch"]) == (experiment.SHIPPED_DEPTH, experiment.SHIPPED_SEED, arch)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            losses = []
            for batch in heldout:
                logits = model(batch).logits[:, :-1]
                losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                batch[:, 1:].reshape(-1)).item())
        assert sum(losses) / len(losses) == pytest.approx(log["heldout_loss"], abs=1e-4), folder


class _Oracle(torch.nn.Module):
    """A stand-in causal LM: at every position, a one-hot logit on the word `table` says follows that prefix (the
    end-of-text token where it says nothing). Causal by construction, so padding after a prefix changes nothing."""

    def __init__(self, table: dict[tuple[int, ...], int], vocab: int):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                logits[b, t, self.table.get(tuple(row[: t + 1]), 0)] = 1.0
        return SimpleNamespace(logits=logits)


def test_recall_accuracy_scores_the_chosen_value():
    tokenizer = build_tokenizer()
    rows = task_rows("mudd_synth_recall", "test")[:40]
    ids = lambda text: tuple(tokenizer(text)["input_ids"])  # noqa: E731
    right = {ids(r["context"]): tokenizer.convert_tokens_to_ids(r["choices"][r["label"]]) for r in rows}
    first = {ids(r["context"]): tokenizer.convert_tokens_to_ids(r["choices"][0]) for r in rows}
    outside = {ids(r["context"]): tokenizer.convert_tokens_to_ids("v31" if "v31" not in r["choices"] else "v30")
               for r in rows}
    vocab = len(tokenizer)
    assert experiment.recall_accuracy(_Oracle(right, vocab), tokenizer, rows, batch_size=7) == 1.0
    expected = sum(r["label"] == 0 for r in rows) / len(rows)
    assert 0 < expected < 1
    assert experiment.recall_accuracy(_Oracle(first, vocab), tokenizer, rows) == pytest.approx(expected)
    # a value outside the choices ties all four choices at 0: the first choice wins, as with lm-eval's argmax
    assert experiment.recall_accuracy(_Oracle(outside, vocab), tokenizer, rows) == pytest.approx(expected)


def test_copy_exact_match_needs_the_whole_string_and_the_stop():
    tokenizer = build_tokenizer()
    rows = task_rows("mudd_synth_copy", "test")[:30]

    def oracle(transform, stop="."):
        table = {}
        for r in rows:
            prefix = list(tokenizer(r["context"])["input_ids"])
            for word in transform(r["target"].split()) + ([stop] if stop else []):
                table[tuple(prefix)] = tokenizer.convert_tokens_to_ids(word)
                prefix.append(table[tuple(prefix)])
        return _Oracle(table, len(tokenizer))

    assert experiment.copy_exact_match(oracle(lambda w: w), tokenizer, rows, batch_size=4) == 1.0
    assert experiment.copy_exact_match(oracle(lambda w: w, stop="<|endoftext|>"), tokenizer, rows) == 1.0
    assert experiment.copy_exact_match(oracle(lambda w: w[:-1]), tokenizer, rows) == 0.0
    assert experiment.copy_exact_match(oracle(lambda w: w + ["A"]), tokenizer, rows) == 0.0
    # no stop within max_new_tokens: the string keeps going, so it is not the target
    assert experiment.copy_exact_match(oracle(lambda w: w + ["A"] * 20, stop=None), tokenizer, rows) == 0.0


def test_run_one_trains_a_pair_from_one_function_with_equal_compute(tmp_path):
    records = {
        arch: experiment.run_one(2, 7, arch, mudd_steps=40, log_dir=tmp_path, threads=None, batch_size=2,
                                 seq_length=32, heldout_batches=1, eval_rows=4)
        for arch in experiment.ARCHS
    }
    plain, mudd = records["plain"], records["mudd"]
    assert plain["curve"][0]["heldout_loss"] == pytest.approx(mudd["curve"][0]["heldout_loss"], abs=1e-5)
    assert mudd["steps"] == 40 and plain["steps"] == round(40 * mudd["forward_flops_per_token"]
                                                           / plain["forward_flops_per_token"])
    assert plain["steps"] > mudd["steps"]
    assert plain["train_flops"] == pytest.approx(mudd["train_flops"], rel=0.02)
    for record in records.values():
        assert json.loads((tmp_path / f"{record['run']}.json").read_text()) == record
        assert len(record["curve"]) == 11 and record["curve"][-1]["heldout_loss"] < record["curve"][0]["heldout_loss"]
    assert experiment.load_logs(tmp_path) == [plain, mudd]


@needs_logs
def test_depth_figure_shows_every_run_by_seed_with_one_legend_per_meaning():
    import matplotlib.pyplot as plt

    figure = experiment.depth_figure(LOGS)
    try:
        left, right = figure.axes
        # left: one marker per run at its final held-out loss, no error bars whose caps could pass for runs
        assert not left.containers and len(left.collections) == len(LOGS)
        by_loss = {round(r["heldout_loss"], 9): r for r in LOGS}
        shapes = {}
        for collection in left.collections:
            (x, y), = collection.get_offsets()
            run = by_loss[round(float(y), 9)]
            assert abs(x / run["depth"] - 1) < 0.2, run["run"]  # plotted beside its depth
            shapes.setdefault(run["seed"], set()).add(collection.get_paths()[0].vertices.tobytes())
        assert all(len(paths) == 1 for paths in shapes.values())  # a seed has one marker shape ...
        assert len({next(iter(paths)) for paths in shapes.values()}) == len(experiment.SEEDS)  # ... its own
        # one legend per meaning: seeds (left), depths (right), architectures (the figure's)
        assert [t.get_text() for t in left.get_legend().get_texts()] == [f"seed {s}" for s in experiment.SEEDS]
        assert [t.get_text() for t in right.get_legend().get_texts()] == [f"{d} blocks" for d in experiment.DEPTHS]
        (architectures,) = figure.legends
        labels = [t.get_text() for t in architectures.get_texts()]
        assert len(labels) == 2 and labels[0].startswith("GPT-NeoX") and labels[1].startswith("MUDDPythia")
        assert right.get_xlabel().startswith("training FLOPs")
    finally:
        plt.close(figure)
