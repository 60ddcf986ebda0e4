"""The benchmark command end to end on a tiny size, and its bookkeeping (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import run


def test_benchmark_command_runs_on_a_tiny_size(tmp_path):
    status = run.main([
        "--sizes", "tiny", "--seq-lens", "16", "--image-sizes", "32", "--repeats", "1", "--warmup", "0",
        "--new-tokens", "3", "--out", str(tmp_path),
    ])
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == "cpu" and results["machine"]["torch"] == torch.__version__
    families = {case["family"] for case in results["cases"]} | {s.split(":")[0] for s in results["skipped"]}
    assert families == {"pythia", "llama", "vit"}
    pythia = next(case for case in results["cases"] if case["family"] == "pythia")
    assert pythia["seq_len"] == 16 and pythia["size"] == "tiny" and not pythia["failures"]
    assert set(pythia["metrics"]) == {"forward", "train_step", "decode", "peak_memory"}
    # the MUDD model is the plain model plus its dense connections, nothing else
    assert 0 < pythia["parameters"]["mudd"] - pythia["parameters"]["plain"] < 0.1 * pythia["parameters"]["plain"]
    for metric in pythia["metrics"].values():
        assert metric["ratio"] > 0 and metric["plain"]["median"] > 0 and len(metric["mudd"]["samples"]) == 1
    # peak memory covers at least the parameters and their gradients
    assert pythia["metrics"]["peak_memory"]["plain"]["median"] * 2**20 > 2 * 4 * pythia["parameters"]["plain"]
    try:
        import matplotlib  # noqa: F401  (the `bench` extra)
    except ImportError:
        return
    assert (tmp_path / "results.png").stat().st_size > 0


def test_measurements_alternate_and_ratios_compare_medians():
    calls = []
    samples = run.interleaved(
        {"plain": lambda: calls.append("plain") or 2.0, "mudd": lambda: calls.append("mudd") or 3.0},
        repeats=3, warmup=1,
    )
    assert calls == ["plain", "mudd", "mudd", "plain", "plain", "mudd", "mudd", "plain"]
    assert samples == {"plain": [2.0] * 3, "mudd": [3.0] * 3}
    summary = run.summarize({"plain": [1.0, 2.0, 4.0], "mudd": [1.5, 2.2, 4.0]}, higher_is_better=False)
    assert summary["ratio"] == pytest.approx(1.1) and summary["ratio_spread"] == [1.0, 1.5]


def test_peak_memory_reset_and_read_follow_the_process_peak():
    device = torch.device("cpu")
    big = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, resident once written
    del big
    run._reset_peak(device)
    after_reset = run._current_peak_bytes(device)
    held = torch.ones(48 * 2**20, dtype=torch.uint8)
    peak = run._current_peak_bytes(device)
    assert peak - after_reset >= 40 * 2**20  # the new allocation shows, the freed one before the reset does not
    del held


def test_serving_throughput_runs_on_a_tiny_size_for_both_decoder_families(tmp_path):
    status = run.main([
        "--families", "pythia", "llama", "--sizes", "tiny", "--seq-lens", "24", "--repeats", "1", "--warmup", "0",
        "--new-tokens", "3", "--metrics", "generate_batch", "--out", str(tmp_path),
    ])
    assert status == 0
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert [case["family"] for case in cases] == ["pythia", "llama"]
    for case in cases:
        assert set(case["metrics"]) == {"generate_batch"} and not case["failures"]
        metric = case["metrics"]["generate_batch"]
        assert metric["ratio"] > 0 and metric["plain"]["median"] > 0 and metric["higher_is_better"]


def test_serving_prompts_mix_lengths_from_short_to_the_sequence_length():
    prompts = run.serving_prompts(vocab_size=100, longest=200)
    lengths = [len(prompt) for prompt in prompts]
    assert len(prompts) == run.SERVING_REQUESTS and min(lengths) == 8 and max(lengths) == 200
    assert len(set(lengths)) == len(lengths) and lengths != sorted(lengths)  # all different, not in order
    assert all(0 <= token < 100 for prompt in prompts for token in prompt)
    assert run.serving_prompts(vocab_size=100, longest=200) == prompts  # the same for both models and every run


def test_compiled_metrics_run_on_a_tiny_size(tmp_path):
    status = run.main([
        "--families", "pythia", "--sizes", "tiny", "--seq-lens", "16", "--repeats", "1", "--warmup", "0",
        "--metrics", "compiled_train_step", "--out", str(tmp_path),
    ])
    assert status == 0
    (case,) = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert set(case["metrics"]) == {"compiled_train_step"} and not case["failures"]
    assert all(metric["ratio"] > 0 for metric in case["metrics"].values())


def test_each_metric_prints_one_labelled_ratio():
    summary = run.summarize({"plain": [1.0, 2.0, 4.0], "mudd": [1.5, 2.2, 4.0]}, higher_is_better=False)
    line = run.metric_line("forward", summary, "cpu")
    assert line.count("ratio") == 0 and line.count(" = ") == 1 and "MUDD/plain time = 1.100 (lower is better, per-repeat 1.000..1.500)" in line
    assert "target <= 1.030: MISSED" in line
    speed = run.metric_line("decode", run.summarize({"plain": [10.0], "mudd": [9.7]}, higher_is_better=True), "cpu")
    assert "MUDD/plain speed = 0.970 (higher is better)" in speed and "met" in speed


def test_quick_mode_fills_only_what_was_not_given():
    quick = run.parse_args(["--quick"])
    assert (quick.repeats, quick.warmup, quick.new_tokens, quick.seq_lens) == (3, 1, 8, [256])
    given = run.parse_args(["--quick", "--repeats", "7", "--seq-lens", "64"])
    assert (given.repeats, given.seq_lens) == (7, [64])
    full = run.parse_args([])
    assert (full.repeats, full.warmup, full.new_tokens, full.seq_lens) == (5, 1, 32, [512])
