"""The main job and the tiny models it evaluates: shipped checkpoints, training script, analysis pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from modeling_muddpythia import MUDDPythiaForCausalLM
from modeling_muddpythia.main_job import (
    CHECKPOINTS_DIR, MODELS, STREAMS, TABLE_ROWS, dense_weight_grid, mean_dense_weights, run_main_job,
)
from modeling_muddpythia.synthetic import build_tokenizer, task_rows
from modeling_muddpythia.train_tiny import MUDD_NAME, PLAIN_NAME, mudd_model_from, plain_model, train_tiny_models

EVALUATION_PAGE = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"
SHIPPED_MUDD = MODELS[1][0]  # the checkpoint folder of the main job's MUDD model (carries its remote code)


PROBE = "recall k3 v17 k9 v2 ; k9 v2 k3 v17 . copy A Q Z = A Q Z . alice and bob went to the park ."


def test_shipped_checkpoints_are_small_safetensors_with_tokenizer():
    total = 0
    for folder, _ in MODELS:
        path = CHECKPOINTS_DIR / folder
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, folder
        assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files), folder
        total += sum(p.stat().st_size for p in path.iterdir())
    assert total <= 20 * 2**20
    config = json.loads((CHECKPOINTS_DIR / SHIPPED_MUDD / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_muddpythia.MUDDPythiaForCausalLM"
    for task in ("SequenceClassification", "TokenClassification", "QuestionAnswering"):
        assert config["auto_map"][f"AutoModelFor{task}"] == f"modeling_muddpythia.MUDDPythiaFor{task}"
    plain, mudd = (json.loads((CHECKPOINTS_DIR / f / "training_log.json").read_text()) for f, _ in MODELS)
    assert (plain["arch"], mudd["arch"]) == ("plain", "mudd")
    # same data stream, same starting function, same training compute
    for key in ("depth", "batch_size", "seq_length", "seed", "peak_lr", "heldout_seed"):
        assert plain[key] == mudd[key], key
    assert plain["curve"][0]["heldout_loss"] == pytest.approx(mudd["curve"][0]["heldout_loss"], abs=1e-5)
    assert plain["train_flops"] == pytest.approx(mudd["train_flops"], rel=0.01)
    for folder, _ in MODELS:  # the folders hold the models of the right architecture and depth
        config = json.loads((CHECKPOINTS_DIR / folder / "config.json").read_text())
        assert config["num_hidden_layers"] == plain["depth"]
    assert json.loads((CHECKPOINTS_DIR / MODELS[0][0] / "config.json").read_text())["model_type"] == "gpt_neox"
    assert config["model_type"] == "muddpythia"


def test_shipped_mudd_checkpoint_remote_code_equals_package():
    """The folder's own copy of the modeling code (loaded in a process where our package cannot be imported) gives
    the same logits as the installed package: the shipped remote code is not stale."""
    folder = CHECKPOINTS_DIR / SHIPPED_MUDD
    tokenizer = build_tokenizer()
    ids = tokenizer(PROBE)["input_ids"]
    script = textwrap.dedent(
        """
        import json, sys
        sys.modules["modeling_muddpythia"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor([json.loads(sys.argv[2])])).logits
        print(json.dumps({"module": type(model).__module__, "logits": logits[0, -3:].tolist()}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), json.dumps(ids)], capture_output=True, text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert not remote["module"].startswith("modeling_muddpythia.")
    model = MUDDPythiaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        local = model(torch.tensor([ids])).logits[0, -3:]
    assert (torch.tensor(remote["logits"]) - local).abs().max().item() < 1e-5


def test_train_tiny_trains_both_from_the_same_function_on_the_same_data(tmp_path):
    summary = train_tiny_models(output=tmp_path, steps=20, batch_size=2, seq_length=32, seed=3, threads=None)
    assert summary["start_max_logit_diff"] < 1e-5
    logs = {name: json.loads((tmp_path / name / "training_log.json").read_text()) for name in (PLAIN_NAME, MUDD_NAME)}
    plain, mudd = logs[PLAIN_NAME], logs[MUDD_NAME]
    # identical function and identical first batch -> identical first loss; MUDD has the extra dense parameters
    assert plain["losses"][0] == pytest.approx(mudd["losses"][0], abs=1e-5)
    # equal compute: the plain model makes up for the dense connections' FLOPs with extra steps on the same stream
    assert mudd["steps"] == 20 and plain["steps"] > 20
    assert plain["train_flops"] == pytest.approx(mudd["train_flops"], rel=0.05)
    assert mudd["forward_flops_per_token"] > plain["forward_flops_per_token"]
    extra = logs[MUDD_NAME]["parameters"] / logs[PLAIN_NAME]["parameters"] - 1
    assert 0 < extra < 0.05  # the compact weight generators (dense_round64=False): ~3% at width 64
    for name in (PLAIN_NAME, MUDD_NAME):
        assert (tmp_path / name / "model.safetensors").is_file() and (tmp_path / name / "tokenizer.json").is_file()


def test_heatmap_of_identity_connections_is_one_hot_on_the_newest_state():
    """Before training, every stream is the newest state: the analysis must show weight 1 on X_{i+1}, 0 elsewhere."""
    tokenizer = build_tokenizer()
    mudd = mudd_model_from(plain_model(len(tokenizer), seed=0)).eval()
    texts = [row["text"] for row in task_rows("mudd_synth_perplexity", "test")[:3]]
    weights = mean_dense_weights(mudd, tokenizer, texts)
    num_layers = mudd.config.num_hidden_layers
    assert [tuple(w.shape) for w in weights] == [(4, i + 2) for i in range(num_layers - 1)] + [(1, num_layers + 1)]
    grid = dense_weight_grid(weights)
    assert grid.shape == (len(STREAMS), num_layers, num_layers + 1)
    for i in range(num_layers):
        streams = range(len(STREAMS)) if i < num_layers - 1 else [len(STREAMS) - 1]
        for c in streams:
            expected = torch.zeros(i + 2, dtype=torch.float64)
            expected[-1] = 1.0
            assert torch.allclose(grid[c, i, : i + 2], expected, atol=1e-6)
            assert torch.isnan(grid[c, i, i + 2:]).all()
    assert torch.isnan(grid[:3, num_layers - 1]).all()  # the last connection makes only the output stream


def test_mean_dense_weights_are_token_weighted_means():
    tokenizer = build_tokenizer()
    mudd = mudd_model_from(plain_model(len(tokenizer), seed=0)).eval()
    with torch.no_grad():
        for layer in mudd.model.dense.layers:
            layer.proj_out.weight.normal_(0, 0.5)  # position-dependent weights
    texts = ["copy A B = A B .", "3 plus 4 is 7 . count 1 2 3 4 ."]
    got = mean_dense_weights(mudd, tokenizer, texts)
    with torch.no_grad():
        per_token = [
            mudd(tokenizer(t, return_tensors="pt")["input_ids"], output_dense_weights=True).dense_weights for t in texts
        ]
    for i, mean in enumerate(got):
        stacked = torch.cat([weights[i][0] for weights in per_token]).double()  # [all tokens, C, i + 2]
        assert torch.allclose(mean, stacked.mean(0), atol=1e-6)


@pytest.fixture(scope="module")
def main_job_output(tmp_path_factory):
    """The main job exactly as `make run` runs it (all documents, 0- and 5-shot), once for this module."""
    output = tmp_path_factory.mktemp("main_job")
    return output, run_main_job(output=output)


def test_main_job_on_the_shipped_checkpoints(main_job_output):
    """Every output is written, every table cell is filled."""
    output, result = main_job_output
    table = (output / "tiny_models_table.md").read_text()
    assert "GPT-NeoX 5-shot" in table and "MUDDPythia 0-shot" in table
    for _, _, description, _ in TABLE_ROWS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {description} |"))
        assert "–" not in row, row
    for picture in ("dense_weights_heatmap.png", "depth_experiment.png"):
        assert (output / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    raw = json.loads((output / "lm_eval_results.json").read_text())
    assert set(raw) == {"GPT-NeoX 0-shot", "MUDDPythia 0-shot", "GPT-NeoX 5-shot", "MUDDPythia 5-shot"}
    assert raw["MUDDPythia 5-shot"]["n-shot"]["mudd_synth_recall"] == 5
    assert raw["MUDDPythia 5-shot"]["n-shot"]["mudd_synth_perplexity"] == 0
    assert {entry["limit"] for entry in raw.values()} == {None}  # every document scored
    assert len(result["generations"]) == 5 and all(g["MUDDPythia"] for g in result["generations"])
    assert len(json.loads((output / "dense_weights.json").read_text())) == len(result["dense_weights"])
    assert (output / "depth_experiment.md").read_text() == result["depth_table"]


def test_documented_tables_are_what_the_shipped_checkpoints_and_logs_give(main_job_output):
    """docs/evaluation.md's lm-eval table of the shipped pair and its sentence with the pair's held-out losses, and
    the depth experiment's table in experiments/depth/README.md, are exactly what the main job prints today."""
    _, result = main_job_output
    readme = EVALUATION_PAGE.read_text()
    assert result["table"] in readme, "docs/evaluation.md's lm-eval table differs from the main job's: update it"
    depth_page = EVALUATION_PAGE.parent.parent / "experiments" / "depth" / "README.md"
    assert result["depth_table"] in depth_page.read_text(), "the depth table differs from the shipped logs"
    plain, mudd = (json.loads((CHECKPOINTS_DIR / f / "training_log.json").read_text()) for f, _ in MODELS)
    sentence = (  # prose wraps lines: compare with whitespace collapsed
        f"Equal training compute ({mudd['train_flops'] / 1e12:.2f} TFLOPs); parameters: GPT-NeoX "
        f"{plain['parameters']:,}, MUDDPythia {mudd['parameters']:,} "
        f"(+{100 * (mudd['parameters'] / plain['parameters'] - 1):.1f}%); held-out loss: GPT-NeoX "
        f"{plain['heldout_loss']:.3f}, MUDDPythia {mudd['heldout_loss']:.3f}."
    )
    assert sentence in " ".join(readme.split())


def test_run_scripts_recall_metrics_equal_lm_eval(main_job_output):
    """The depth experiment scores recall and copying itself (for all 18 runs); on the shipped pair its 0-shot
    numbers must be lm-eval's, an independent implementation of the same two metrics."""
    _, result = main_job_output
    for folder, name in MODELS:
        log = json.loads((CHECKPOINTS_DIR / folder / "training_log.json").read_text())
        assert log["eval_documents"] == 300
        assert log["recall_acc_0shot"] == pytest.approx(result["scores"][(name, 0)][("mudd_synth_recall", "acc")],
                                                         abs=1e-9), name
        assert log["copy_exact_match_0shot"] == pytest.approx(
            result["scores"][(name, 0)][("mudd_synth_copy", "exact_match")], abs=1e-9), name


def test_main_job_without_checkpoints_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="depth_experiment"):
        run_main_job(output=tmp_path / "out", checkpoints=tmp_path / "nothing")


def test_shipped_remote_code_is_the_package_code():
    # the tiny MUDD checkpoint loads through trust_remote_code where the package is absent: its copy of our modules
    # must be today's, not the one from the day it was trained
    folder = CHECKPOINTS_DIR / SHIPPED_MUDD
    shipped = sorted(p.name for p in folder.glob("*.py"))
    assert "mudd.py" in shipped and "mudd_triton.py" in shipped
    package = Path(__file__).resolve().parent.parent / "modeling_muddpythia"
    for name in shipped:
        assert (folder / name).read_text() == (package / name).read_text(), f"{name} is stale: copy it from the package"


def _contrast(colour_a, colour_b) -> float:
    """WCAG 2 contrast ratio, written out here as the reference for the heatmap's text colours."""
    import matplotlib.colors

    def luminance(colour):
        channels = []
        for c in matplotlib.colors.to_rgb(colour):
            channels.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]

    high, low = sorted((luminance(colour_a), luminance(colour_b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_heatmap_values_are_readable_and_the_empty_row_is_explained():
    import matplotlib.pyplot as plt

    from modeling_muddpythia.main_job import EMPTY_CELL_NOTE, heatmap_figure

    num_layers = 4
    grid = torch.full((len(STREAMS), num_layers, num_layers + 1), float("nan"), dtype=torch.float64)
    values = torch.linspace(-3.5, 3.5, 4 * 15, dtype=torch.float64).reshape(4, 15)
    for c in range(len(STREAMS)):
        k = 0
        for i in range(num_layers if c == len(STREAMS) - 1 else num_layers - 1):
            for j in range(i + 2):
                grid[c, i, j] = values[c, k % 15]
                k += 1
    grid[0, 0, 0], grid[3, 0, 0] = -3.5, 3.5
    figure = heatmap_figure(grid, "test")
    try:
        checked = 0
        for axis in figure.axes[: len(STREAMS)]:
            image = axis.images[0]
            for text in axis.texts:
                if text.get_text().startswith("none"):
                    continue
                j, i = (int(round(v)) for v in text.get_position())
                cell = image.cmap(image.norm(float(text.get_text())))
                assert _contrast(cell, text.get_color()) >= 4.5, (text.get_text(), text.get_color())
                checked += 1
        assert checked == int((~torch.isnan(grid)).sum())
        # the strongest weights (darkest cells) are written in white, the near-zero ones in black
        texts = {t.get_text(): t.get_color() for axis in figure.axes[:4] for t in axis.texts}
        assert texts["3.50"] == "white" and texts["-3.50"] == "white"
        for axis in figure.axes[:3]:  # q, k, v panels: the empty last row says why
            assert any("only the residual stream" in t.get_text() for t in axis.texts)
        assert not any(t.get_text().startswith("none") for t in figure.axes[3].texts)
        assert "residual stream" in EMPTY_CELL_NOTE and figure._supxlabel.get_text() == EMPTY_CELL_NOTE
    finally:
        plt.close(figure)


def test_main_job_output_has_no_third_party_noise(tmp_path, capfd):
    run_main_job(output=tmp_path, shots=(0,), batch_size=8, limit=2, heatmap_documents=2)
    out, err = capfd.readouterr()
    assert "bootstrapping for stddev" not in out + err
    assert "Running loglikelihood requests" not in err and "Loading weights" not in err
    assert not [line for line in err.split("\n")[:-1] if not line.strip()], "blank lines on stderr"
    stages = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert {line.split(":")[0] for line in stages} <= {"stage 1 of 3", "stage 2 of 3", "stage 3 of 3"}, stages[:5]
    assert "stage 1 of 3: lm-eval, 2 runs of 5 tasks" in err
    # a --limit run says that its numbers are partial, in the report and on the console
    assert out.count("PARTIAL RUN (--limit 2)") == 2
    assert "PARTIAL RUN (--limit 2)" in (tmp_path / "tiny_models_table.md").read_text()
    assert {entry["limit"] for entry in json.loads((tmp_path / "lm_eval_results.json").read_text()).values()} == {2}
    # the last line names every file the job wrote
    written = sorted(path.name for path in tmp_path.iterdir())
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"Wrote {len(written)} files to {tmp_path}: ")
    assert sorted(last.split(": ", 1)[1].split(", ")) == written


def test_shipped_tokenizers_are_the_built_one_and_space_continuations(tmp_path):
    """The shipped folders' tokenizer is `build_tokenizer()` as saved, and decoding puts a space before every word,
    so that a pipeline's text is the prompt, a space and the continuation (not "9 plus 1 is9 .")."""
    from transformers import AutoTokenizer, pipeline

    built = build_tokenizer()
    built.save_pretrained(tmp_path)
    for folder, _ in MODELS:
        shipped = json.loads((CHECKPOINTS_DIR / folder / "tokenizer.json").read_text())
        assert shipped == json.loads((tmp_path / "tokenizer.json").read_text()), folder
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS_DIR / MODELS[0][0])
    ids = tokenizer("9 plus 1 is 10 .")["input_ids"]
    assert ids == built("9 plus 1 is 10 .")["input_ids"] and len(ids) == 6
    assert tokenizer.decode(ids[4:]) == " 10 ." and tokenizer.decode(ids) == " 9 plus 1 is 10 ."
    generator = pipeline("text-generation", model=str(CHECKPOINTS_DIR / SHIPPED_MUDD), trust_remote_code=True)
    text = generator("9 plus 1 is", max_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert text.startswith("9 plus 1 is ") and "  " not in text and len(text.split()) == 6, text
