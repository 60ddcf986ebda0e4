"""Hub model cards (`model_cards/*.md`) for the published MUDD models, and which card a converted model gets.

The converters call `model_card_for(model_type, config)` and copy the card it names into their output folder as
`README.md`. `model_index(card_name)` renders the `model-index` metadata from the paper's published numbers
(`paper_results.py`); the cards' front matter must equal it (tests/test_model_cards.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .paper_results import PAPER_URL, TABLE3, TABLE3_COLUMNS, VIT_TABLE7


MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
REQUIRED_METADATA = ("license", "library_name", "pipeline_tag", "tags", "datasets", "model-index")

# (model_type, num_hidden_layers, hidden_size) -> card name (file `model_cards/<name>.md`)
_CARDS = {
    ("muddpythia", 24, 2048): "MUDDPythia-1.4B",
    ("muddpythia", 32, 2560): "MUDDPythia-2.8B",
    ("muddformer", 32, 2560): "MUDDFormer-2.8B",
    ("muddvit", 12, 384): "MUDDViT-S-16",
}
# card name -> the model's row in the paper's tables
_PAPER_NAMES = {
    "MUDDPythia-1.4B": "MUDDPythia-1.4B",
    "MUDDPythia-2.8B": "MUDDPythia-2.8B",
    "MUDDFormer-2.8B": "MUDDFormer-2.8B",
    "MUDDViT-S-16": "MUDDViT-S/16",
}
# lm-eval task -> (dataset shown on the Hub, Hub dataset id, config, split lm-eval scores)
_TABLE3_DATASETS = {
    "lambada_openai": ("LAMBADA (OpenAI)", "EleutherAI/lambada_openai", "default", "test"),
    "piqa": ("PIQA", "baber/piqa", None, "validation"),
    "winogrande": ("WinoGrande", "allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "test"),
    "sciq": ("SciQ", "allenai/sciq", None, "test"),
    "logiqa": ("LogiQA", "EleutherAI/logiqa", "logiqa", "test"),
    "boolq": ("BoolQ", "aps/super_glue", "boolq", "validation"),
    "hellaswag": ("HellaSwag", "Rowan/hellaswag", None, "validation"),
    "race_middle": ("RACE-middle", "EleutherAI/race", "middle", "test"),
    "race": ("RACE-high", "EleutherAI/race", "high", "test"),
}
_SOURCE = {"name": "MUDDFormer paper (Xiao et al., ICML 2025)", "url": PAPER_URL}


def _config_value(config, *names):
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_card_for(model_type: str, config) -> Path | None:
    """The card of the published model whose shape `config` has, or None (a card must not describe another model).

    `config`: a transformers config or a dict, with our field names (`num_hidden_layers`, `hidden_size`) or the
    authors' (`n_layer`, `dim`). Returns `model_cards/<name>.md` when that file exists.
    """
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _config_value(config, "hidden_size", "dim", "d_model")
    name = _CARDS.get((str(model_type).lower(), layers, hidden))
    if name is None:
        return None
    patch_size = _config_value(config, "patch_size")
    if name.startswith("MUDDViT") and patch_size not in (None, 16):
        return None
    path = MODEL_CARDS_DIR / f"{name}.md"
    return path if path.is_file() else None


def _table3_results(paper_name: str) -> list[dict]:
    results = []
    for shots in (0, 5):
        for (task, metric, _), value in zip(TABLE3_COLUMNS, TABLE3[paper_name][shots]):
            title, dataset_id, config, split = _TABLE3_DATASETS[task]
            dataset = {"name": f"{title} ({shots}-shot)", "type": dataset_id, "split": split,
                       "args": {"num_few_shot": shots}}
            if config:
                dataset["config"] = config
            results.append({
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": dataset,
                "metrics": [{"type": metric, "value": value, "name": f"accuracy ({shots}-shot)"}],
                "source": dict(_SOURCE),
            })
    pile_ppl, _ = TABLE3[paper_name]["ppl"]
    results.append({
        "task": {"type": "text-generation", "name": "Text Generation"},
        "dataset": {"name": "The Pile (validation)", "type": "EleutherAI/pile", "split": "validation"},
        "metrics": [{"type": "perplexity", "value": pile_ppl, "name": "perplexity"}],
        "source": dict(_SOURCE),
    })
    return results


def _vit_results(paper_name: str) -> list[dict]:
    row = VIT_TABLE7[paper_name]
    return [{
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"name": "ImageNet-1k (300 epochs from scratch)", "type": "ILSVRC/imagenet-1k",
                    "split": "validation"},
        "metrics": [{"type": "accuracy", "value": row["acc_epoch300"], "name": "top-1 accuracy"}],
        "source": dict(_SOURCE),
    }]


def model_index(card_name: str) -> list[dict]:
    """The `model-index` metadata of a card: the paper's published results for that model."""
    paper_name = _PAPER_NAMES[card_name]
    results = _vit_results(paper_name) if paper_name in VIT_TABLE7 else _table3_results(paper_name)
    return [{"name": card_name, "results": results}]


def card_names() -> list[str]:
    return list(_PAPER_NAMES)
