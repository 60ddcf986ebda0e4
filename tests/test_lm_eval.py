"""lm-evaluation-harness on MUDD models, offline, on the local synthetic tasks in tests/tasks/.

lm-eval's numbers are checked against the model itself (log-probabilities computed directly, greedy generation),
against transformers' own GPT-NeoX (a muddified model must score exactly like its source), and against themselves
at other batch sizes. The models load through lm-eval's `hf` backend with `trust_remote_code=True`, i.e. from the
folder's own copy of our code.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from modeling_muddpythia import MUDDPythiaForCausalLM
from modeling_muddpythia.evaluation import evaluate_model, metric_value, task_manager
from modeling_muddpythia.synthetic import build_tokenizer, write_task_data
from modeling_muddpythia.train_tiny import mudd_model_from

from mudd_reference import randomize_


TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ["mudd_synth_recall", "mudd_synth_arithmetic", "mudd_synth_story", "mudd_synth_copy", "mudd_synth_perplexity"]
LIMIT = 6


def _plain_gpt_neox(vocab_size: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, rotary_pct=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random GPT-NeoX, the muddified copy (identity dense connections) and a MUDD model with random,
    non-identity weights everywhere; each saved with the synthetic tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval_models")
    tokenizer = build_tokenizer()
    plain = _plain_gpt_neox(len(tokenizer))
    identity = mudd_model_from(plain).eval()
    random_mudd = mudd_model_from(plain).eval()
    randomize_(random_mudd, seed=1)
    paths = {}
    for name, model in (("gptneox", plain), ("identity_mudd", identity), ("random_mudd", random_mudd)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def manager():
    return task_manager(include_path=str(TASKS_DIR), include_defaults=False)


_RUNS: dict = {}


def run(folders, manager, name: str, shots: int, batch_size: int) -> dict:
    key = (name, shots, batch_size)
    if key not in _RUNS:
        _RUNS[key] = evaluate_model(
            folders[name], TASKS, shots, manager=manager, batch_size=batch_size, limit=LIMIT, device="cpu",
            log_samples=True, bootstrap_iters=0,
        )
    return _RUNS[key]


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy continuation, from one unpadded forward."""
    context_ids = tokenizer(context)["input_ids"] if context else [tokenizer.bos_token_id]
    continuation_ids = tokenizer(continuation)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    targets = continuation_ids
    total = sum(logprobs[p, t].item() for p, t in zip(positions, targets))
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, targets))
    return total, greedy


@pytest.fixture(scope="module")
def random_mudd(folders):
    return MUDDPythiaForCausalLM.from_pretrained(folders["random_mudd"]).eval(), build_tokenizer()


# --------------------------------------------------------------------------- data


def test_task_files_are_reproducible(tmp_path):
    """The committed JSONL files are exactly what `synthetic.write_task_data` generates."""
    for path in write_task_data(tmp_path):
        assert path.read_bytes() == (TASKS_DIR / "data" / path.name).read_bytes(), path.name


def test_tokenizer_loads_offline_and_round_trips(folders):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["random_mudd"], trust_remote_code=True)
    text = "recall k3 v17 k9 v2 ; k9 v2 . copy A Q = A Q . alice gave the red ball to bob . 3 plus 4 is 7 ."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())
    # decoding writes a space before every word (see synthetic.build_tokenizer), the text's first one included
    assert tokenizer.decode(ids) == " " + text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 1)
    assert tokenizer("zebra")["input_ids"] == [tokenizer.unk_token_id]


# --------------------------------------------------------------------------- request types


@pytest.mark.parametrize("task", ["mudd_synth_recall", "mudd_synth_arithmetic", "mudd_synth_story"])
@pytest.mark.parametrize("shots", [0, 5])
def test_loglikelihood_equals_direct_computation(folders, manager, random_mudd, task, shots):
    """Multiple choice and LAMBADA-style loglikelihood: every (context, continuation) score lm-eval reports equals
    the log-probability computed directly from the model, and `acc` follows from those scores."""
    model, tokenizer = random_mudd
    results = run(folders, manager, "random_mudd", shots, batch_size=4)
    samples = results["samples"][task]
    assert len(samples) == LIMIT
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), ((logprob, greedy),) in zip(sample["arguments"], sample["resps"]):
            expected, expected_greedy = _direct_loglikelihood(model, tokenizer, context, continuation)
            assert logprob == pytest.approx(expected, abs=1e-4)
            assert greedy == expected_greedy
            scores.append(logprob)
        if task == "mudd_synth_story":
            correct += int(sample["resps"][0][0][1])
        else:
            correct += int(max(range(len(scores)), key=scores.__getitem__) == sample["target"])
    assert metric_value(results, task, "acc") == pytest.approx(correct / LIMIT)
    if shots:  # five solved examples precede the question
        assert samples[0]["arguments"][0][0].count(" . ") >= 5


def test_rolling_loglikelihood_equals_direct_computation(folders, manager, random_mudd):
    """Perplexity task: each document's rolling loglikelihood is log p(document | bos), and word perplexity is
    exp(-sum logp / words)."""
    model, tokenizer = random_mudd
    results = run(folders, manager, "random_mudd", 0, batch_size=4)
    total_logprob, total_words = 0.0, 0
    for sample in results["samples"]["mudd_synth_perplexity"]:
        (text,) = sample["arguments"][0]
        expected, _ = _direct_loglikelihood(model, tokenizer, "", text)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
        total_logprob += expected
        total_words += len(text.split())
    got = metric_value(results, "mudd_synth_perplexity", "word_perplexity")
    assert got == pytest.approx(math.exp(-total_logprob / total_words), rel=1e-5)
    assert results["n-shot"]["mudd_synth_perplexity"] == 0


def test_generate_until_equals_greedy_generation(folders, manager, random_mudd):
    """generate_until (left-padded batches with an attention mask): lm-eval's outputs equal our own greedy
    generation of each prompt alone, cut at the stop string."""
    model, tokenizer = random_mudd
    results = run(folders, manager, "random_mudd", 0, batch_size=4)
    for sample in results["samples"]["mudd_synth_copy"]:
        context, generation_kwargs = sample["arguments"][0]
        ids = tokenizer(context, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=generation_kwargs["max_gen_toks"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert sample["filtered_resps"][0] == text.split(".")[0].strip()


# --------------------------------------------------------------------------- batch size, reference model


def _per_request_responses(results: dict) -> dict:
    return {
        (task, sample["doc_id"]): sample["filtered_resps"]
        for task, samples in results["samples"].items()
        for sample in samples
    }


def _flatten(response) -> list:
    if isinstance(response, (list, tuple)):
        return [item for part in response for item in _flatten(part)]
    return [response]


def assert_same_responses(a: dict, b: dict, atol: float) -> None:
    """Every request's filtered response matches: log-probabilities within `atol`, greedy flags and generated
    strings exactly."""
    assert a.keys() == b.keys()
    for key in a:
        left, right = _flatten(a[key]), _flatten(b[key])
        assert len(left) == len(right), key
        for x, y in zip(left, right):
            if isinstance(x, float) and not isinstance(x, bool):
                assert x == pytest.approx(y, abs=atol), key
            else:
                assert x == y, key


@pytest.mark.parametrize("shots", [0, 5])
def test_batch_size_4_scores_equal_batch_size_1(folders, manager, shots):
    """lm-eval right-pads loglikelihood batches (no mask) and left-pads generation batches (with a mask): every
    per-request score and every metric is the same at batch size 4 as at batch size 1."""
    one = run(folders, manager, "random_mudd", shots, batch_size=1)
    four = run(folders, manager, "random_mudd", shots, batch_size=4)
    assert_same_responses(_per_request_responses(one), _per_request_responses(four), atol=1e-4)
    for task in TASKS:
        for metric in ("acc", "exact_match"):
            assert metric_value(one, task, metric) == metric_value(four, task, metric)
        for metric in ("perplexity", "word_perplexity"):
            value = metric_value(one, task, metric)
            assert value is None or value == pytest.approx(metric_value(four, task, metric), rel=1e-5)


def test_muddified_model_scores_like_transformers_gpt_neox(folders, manager):
    """A MUDD model with identity dense connections, loaded by lm-eval through remote code, gives the same
    per-request scores as the GPT-NeoX it was made from, loaded as transformers' own class."""
    mudd = run(folders, manager, "identity_mudd", 5, batch_size=4)
    plain = run(folders, manager, "gptneox", 5, batch_size=4)
    assert_same_responses(_per_request_responses(mudd), _per_request_responses(plain), atol=1e-4)


def test_lm_eval_command_line_with_remote_code(folders, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` in a fresh process in which our
    package cannot be imported: the folder's own copy of the code serves lm-eval's command line."""
    hide_package = (
        "import sys; sys.modules['modeling_muddpythia'] = None; "
        "from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"
    )
    command = [
        sys.executable, "-c", hide_package, "--model", "hf",
        "--model_args", f"pretrained={folders['random_mudd']},trust_remote_code=True",
        "--device", "cpu", "--include_path", str(TASKS_DIR), "--tasks", "mudd_synth_recall,mudd_synth_copy",
        "--limit", "4", "--batch_size", "2", "--output_path", str(tmp_path / "out"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"mudd_synth_recall", "mudd_synth_copy"}
    assert results["n-samples"]["mudd_synth_recall"]["effective"] == 4


# --------------------------------------------------------------------------- the Table 3 runner


def test_table3_runner_without_datasets_fails_clearly(folders, tmp_path):
    """Offline with an empty cache, `mudd-eval` names every missing dataset, says what to do, evaluates nothing and
    exits non-zero."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds")
    )
    output = tmp_path / "table3"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.evaluation", str(folders["random_mudd"]), "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the Table 3 datasets are not available on this machine" in result.stderr
    for task, dataset in (("lambada_openai", "EleutherAI/lambada_openai"), ("race_middle", "EleutherAI/race"),
                          ("hellaswag", "Rowan/hellaswag"), ("boolq", "aps/super_glue")):
        assert f"  {task}: {dataset}:" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr
    assert not output.exists()


def test_table3_runner_rejects_a_folder_without_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_muddpythia.evaluation", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "no config.json" in result.stderr
