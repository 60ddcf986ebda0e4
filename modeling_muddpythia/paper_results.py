"""Results published in the MUDDFormer paper (Xiao et al., ICML 2025, arXiv:2502.12170v2), kept as data.

`TABLE3` is the paper's Table 3 ("Zero-shot and five-shot downstream evaluations results"): accuracy in percent
per task, the paper's 11-task average, and the Pile / FLAN perplexities (zero-shot part only). The Pythia rows are
the paper's own evaluations (its 0-shot Pythia numbers equal the Pythia paper's; some 5-shot ones differ from it).
The paper does not name the lm-eval metric; its numbers are plain accuracy (`acc`, not `acc_norm`): e.g. its
HellaSwag 40.5 / 50.3 for Pythia-1.4B / 12B are those models' `acc`, whose `acc_norm` is above 50 / 65.
`VIT_TABLE7` is the ImageNet-1k result of Table 7. Nothing here is estimated: a number we could not read from the
paper is absent.
"""

from __future__ import annotations

PAPER = "MUDDFormer: Breaking Residual Bottlenecks in Transformers via Multiway Dynamic Dense Connections"
PAPER_URL = "https://arxiv.org/abs/2502.12170"

# (lm-eval task, metric, column header) in the paper's column order.
# lm-eval's `race` is RACE-high; RACE-middle is the same dataset's "middle" configuration (see evaluation.py).
TABLE3_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("lambada_openai", "acc", "LAMBADA"),
    ("piqa", "acc", "PIQA"),
    ("winogrande", "acc", "WinoGrande"),
    ("arc_easy", "acc", "ARC-E"),
    ("arc_challenge", "acc", "ARC-C"),
    ("sciq", "acc", "SciQ"),
    ("logiqa", "acc", "LogiQA"),
    ("boolq", "acc", "BoolQ"),
    ("hellaswag", "acc", "HellaSwag"),
    ("race_middle", "acc", "RACE-M"),
    ("race", "acc", "RACE-H"),
)
TABLE3_TASKS = tuple(task for task, _, _ in TABLE3_COLUMNS)

# model -> {"ppl": (Pile, FLAN), 0: (accuracies in TABLE3_COLUMNS order..., average), 5: (...)}
TABLE3: dict[str, dict] = {
    "Pythia-1.4B": {
        "ppl": (7.29, 9.30),
        0: (61.6, 71.0, 57.2, 60.5, 26.1, 86.6, 21.4, 63.3, 40.5, 37.3, 33.9, 50.8),
        5: (54.5, 71.0, 57.5, 63.1, 28.9, 92.2, 22.9, 63.0, 40.5, 35.4, 34.6, 51.2),
    },
    "MUDDPythia-1.4B": {
        "ppl": (6.92, 8.54),
        0: (63.9, 71.8, 57.4, 61.6, 26.2, 87.2, 23.0, 62.0, 42.6, 38.7, 34.7, 51.7),
        5: (58.2, 73.0, 59.0, 64.1, 28.2, 94.0, 23.8, 61.5, 42.6, 37.9, 35.2, 52.5),
    },
    "Pythia-2.8B": {
        "ppl": (6.63, 8.16),
        0: (64.7, 73.9, 59.4, 64.4, 29.5, 88.2, 21.2, 64.5, 45.4, 38.1, 34.9, 53.1),
        5: (60.5, 73.6, 60.6, 67.3, 32.3, 94.3, 21.7, 65.6, 45.1, 38.4, 35.6, 54.1),
    },
    "MUDDPythia-2.8B": {
        "ppl": (6.29, 7.50),
        0: (68.5, 74.6, 61.4, 66.5, 31.9, 90.4, 21.5, 68.1, 46.8, 39.0, 36.7, 55.0),
        5: (63.6, 75.5, 63.6, 70.3, 34.0, 95.5, 28.1, 67.5, 47.1, 44.5, 37.3, 57.0),
    },
    "Pythia-6.9B": {
        "ppl": (6.29, 7.85),
        0: (67.3, 75.2, 60.9, 67.3, 31.3, 89.7, 25.3, 63.7, 48.0, 40.6, 37.0, 55.1),
        5: (63.8, 75.5, 63.7, 70.2, 35.6, 95.1, 27.0, 65.7, 48.1, 39.0, 36.5, 56.4),
    },
    "Pythia-12B": {
        "ppl": (6.01, 7.26),
        0: (70.5, 76.0, 63.9, 70.2, 31.8, 90.2, 22.4, 67.4, 50.3, 40.6, 38.3, 56.5),
        5: (67.3, 76.0, 64.2, 71.0, 36.5, 95.3, 21.8, 68.0, 50.3, 40.1, 38.8, 57.2),
    },
    "MUDDFormer-2.8B": {
        "ppl": (6.01, 7.08),
        0: (70.7, 75.7, 63.4, 70.4, 34.2, 91.8, 24.0, 67.4, 49.5, 40.6, 38.1, 56.9),
        5: (65.6, 76.4, 66.8, 73.0, 39.2, 95.6, 25.2, 70.9, 49.8, 41.4, 38.0, 58.4),
    },
}

# Table 7: ImageNet-1k top-1 accuracy (%) after 90 and 300 epochs, and validation loss, trained from scratch.
VIT_TABLE7: dict[str, dict[str, float]] = {
    "ViT-S/16": {"val_loss": 0.993, "acc_epoch90": 53.4, "acc_epoch300": 76.0},
    "MUDDViT-S/16": {"val_loss": 0.877, "acc_epoch90": 56.0, "acc_epoch300": 78.0},
    "ViT-M/16": {"val_loss": 0.890, "acc_epoch90": 55.2, "acc_epoch300": 77.9},
}


def table3_row(model: str, shots: int) -> dict[str, float]:
    """`{column header: accuracy, ..., "Avg": average}` of one published row (`shots` 0 or 5)."""
    values = TABLE3[model][shots]
    headers = [header for _, _, header in TABLE3_COLUMNS] + ["Avg"]
    return dict(zip(headers, values))
