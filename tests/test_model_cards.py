"""Model cards (model_cards/*.md), the card chooser used by the converters, and the paper's published numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

yaml = pytest.importorskip("yaml")

from modeling_muddpythia import MUDDPythiaConfig
from modeling_muddpythia.evaluation import table3_markdown
from modeling_muddpythia.model_cards import MODEL_CARDS_DIR, REQUIRED_METADATA, card_names, model_card_for, model_index
from modeling_muddpythia.paper_results import TABLE3, TABLE3_COLUMNS, TABLE3_TASKS


REPO = Path(__file__).resolve().parent.parent
CARD_FILES = sorted(MODEL_CARDS_DIR.glob("*.md"))


def front_matter(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, f"{path.name} has no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_one_card_per_published_model():
    assert [p.stem for p in CARD_FILES] == sorted(card_names())
    assert sorted(card_names()) == ["MUDDFormer-2.8B", "MUDDPythia-1.4B", "MUDDPythia-2.8B", "MUDDViT-S-16"]


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.stem)
def test_card_metadata(path):
    metadata, body = front_matter(path)
    missing = [key for key in REQUIRED_METADATA if not metadata.get(key)]
    assert not missing, f"{path.name} lacks {missing}"
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] in {"mit", "apache-2.0"}
    assert metadata["pipeline_tag"] in {"text-generation", "image-classification"}
    assert "custom_code" in metadata["tags"] and "mudd" in metadata["tags"]
    # the model-index holds exactly the paper's published numbers for this model
    assert metadata["model-index"] == model_index(path.stem)
    for result in metadata["model-index"][0]["results"]:
        assert {"task", "dataset", "metrics", "source"} <= set(result)
        assert all(isinstance(metric["value"], float) for metric in result["metrics"])
    assert "trust_remote_code=True" in body and "@inproceedings{xiao2025muddformer" in body


@pytest.mark.parametrize("name", ["MUDDPythia-1.4B", "MUDDPythia-2.8B", "MUDDFormer-2.8B"])
def test_language_card_lists_its_table3_row(name):
    metadata, _ = front_matter(MODEL_CARDS_DIR / f"{name}.md")
    results = metadata["model-index"][0]["results"]
    zero_shot = [r["metrics"][0]["value"] for r in results if r["dataset"].get("args", {}).get("num_few_shot") == 0]
    five_shot = [r["metrics"][0]["value"] for r in results if r["dataset"].get("args", {}).get("num_few_shot") == 5]
    assert zero_shot == list(TABLE3[name][0][:-1]) and five_shot == list(TABLE3[name][5][:-1])


def test_model_card_for_matches_shapes():
    presets = REPO / "configuration"
    assert model_card_for("muddpythia", MUDDPythiaConfig.from_json_file(presets / "muddpythia-1.4b.json")) == (
        MODEL_CARDS_DIR / "MUDDPythia-1.4B.md"
    )
    assert model_card_for("muddpythia", MUDDPythiaConfig.from_json_file(presets / "muddpythia-2.8b.json")) == (
        MODEL_CARDS_DIR / "MUDDPythia-2.8B.md"
    )
    # the authors' config names, as in their Hub folders
    assert model_card_for("muddformer", {"n_layer": 32, "dim": 2560}) == MODEL_CARDS_DIR / "MUDDFormer-2.8B.md"
    assert model_card_for("MUDDViT", {"num_hidden_layers": 12, "hidden_size": 384, "patch_size": 16}) == (
        MODEL_CARDS_DIR / "MUDDViT-S-16.md"
    )
    # anything else gets no card rather than the card of another model
    assert model_card_for("muddpythia", MUDDPythiaConfig.from_json_file(presets / "muddpythia-405m.json")) is None
    assert model_card_for("muddvit", {"num_hidden_layers": 12, "hidden_size": 384, "patch_size": 32}) is None
    assert model_card_for("muddformer", {"num_hidden_layers": 24, "hidden_size": 2048}) is None
    assert model_card_for("llama", {"num_hidden_layers": 32, "hidden_size": 2560}) is None


def test_card_usage_runs_on_a_saved_folder(tmp_path):
    """The MUDDPythia cards' Python usage block, pointed at a small saved MUDDPythia folder, runs as written."""
    from modeling_muddpythia.synthetic import build_tokenizer
    from modeling_muddpythia import MUDDPythiaForCausalLM

    tokenizer = build_tokenizer()
    config = MUDDPythiaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    MUDDPythiaForCausalLM(config).save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    _, body = front_matter(MODEL_CARDS_DIR / "MUDDPythia-1.4B.md")
    code = re.search(r"```python\n(.*?)```", body, flags=re.S).group(1)
    code = re.sub(r'folder = "[^"]*"', f'folder = "{tmp_path / "folder"}"', code)
    namespace: dict = {}
    exec(compile(code, "model card usage", "exec"), namespace)  # noqa: S102 - our own card's snippet
    assert namespace["model"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- the paper's numbers


@pytest.mark.parametrize("model", sorted(TABLE3))
@pytest.mark.parametrize("shots", [0, 5])
def test_published_averages_are_consistent(model, shots):
    """Each published row's average is the mean of its 11 task columns up to rounding (columns and average are each
    rounded to 0.1, the paper averaged unrounded numbers), which catches a mistyped or shifted number."""
    *accuracies, average = TABLE3[model][shots]
    assert len(accuracies) == len(TABLE3_COLUMNS) == 11
    assert abs(sum(accuracies) / len(accuracies) - average) <= 0.1


def test_table3_markdown_layout():
    scores = {0: {task: 0.5 for task in TABLE3_TASKS}, 5: {task: 0.25 for task in TABLE3_TASKS[:-1]}}
    table = table3_markdown("my-model", scores)
    header = next(line for line in table.splitlines() if line.startswith("| Model"))
    assert header.split(" | ")[3:14] == [h for _, _, h in TABLE3_COLUMNS]
    rows = [line for line in table.splitlines() if line.startswith("| **my-model**")]
    assert rows[0].endswith("| 50.0 |") and rows[1].endswith("| – | 25.0* |")
    assert table.count("| MUDDPythia-2.8B | 6.29 | 7.50 | 68.5 |") == 1
