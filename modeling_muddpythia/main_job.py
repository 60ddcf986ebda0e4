"""The main job (`make run` = `mudd main`): MUDD against a plain Transformer, on a fresh machine, offline.

It evaluates the two tiny models shipped in `checkpoints/` (the 8-block pair of seed 0 of the depth experiment,
`depth_experiment.py`: a GPT-NeoX and the MUDDPythia made from the same initial weights, same data, equal training
compute) with lm-evaluation-harness on the synthetic tasks in `tests/tasks/`, 0- and 5-shot, and writes to
`outputs/`:

* `tiny_models_table.md`: the side-by-side table (also printed), sample generations of both models;
* `lm_eval_results.json`: lm-eval's raw results;
* `dense_weights_heatmap.png` / `dense_weights.json`: the MUDD model's mean dense-connection weights per layer,
  stream and source depth (the paper's analysis view);
* `depth_experiment.png` / `depth_experiment.md`: the depth experiment's held-out loss against depth and against
  training compute for both architectures, with the spread over seeds, from the shipped training logs in
  `experiments/depth/logs/` (nothing is retrained).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .depth_experiment import LOG_DIR, SHIPPED_NAMES, depth_summary, depth_table, load_logs, plot_depth
from .evaluation import evaluate_model, metric_value, task_manager


REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
TASKS_DIR = REPO_ROOT / "tests" / "tasks"
# (checkpoint folder, column name)
MODELS = ((SHIPPED_NAMES["plain"], "GPT-NeoX"), (SHIPPED_NAMES["mudd"], "MUDDPythia"))
# (task, metric, description, higher is better)
TABLE_ROWS = (
    ("mudd_synth_recall", "acc", "associative recall (MQAR), 4-way choice", True),
    ("mudd_synth_copy", "exact_match", "copy a symbol string, generated", True),
    ("mudd_synth_story", "acc", "story's last word (LAMBADA style), greedy", True),
    ("mudd_synth_story", "perplexity", "story's last word, perplexity", False),
    ("mudd_synth_arithmetic", "acc", "arithmetic facts, 4-way choice", True),
    ("mudd_synth_perplexity", "word_perplexity", "held-out documents, per-word perplexity", False),
)
TASKS = tuple(dict.fromkeys(task for task, *_ in TABLE_ROWS))
STREAMS = ("query", "key", "value", "residual")


def check_checkpoints(checkpoints: Path) -> None:
    for folder, _ in MODELS:
        if not (checkpoints / folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoints / folder} is missing: the tiny models ship with the repository (git checkout "
                "checkpoints/), or recreate them with `python -m modeling_muddpythia.depth_experiment run --depth 8 "
                "--seed 0 --arch plain|mudd` (see experiments/depth/PROTOCOL.md)"
            )


def _cell(value: float | None, higher_is_better: bool, other: float | None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.1f}" if higher_is_better else f"{value:.2f}"
    if other is not None and value != other and (value > other) == higher_is_better:
        text = f"**{text}**"
    return text


def results_table(scores: dict, shots: tuple[int, ...], n_shots: dict) -> str:
    """Markdown: one row per task metric, one column per (shots, model); the better of each pair in bold.

    `scores[(model_column, shots)][(task, metric)]` are lm-eval values (accuracies as fractions).
    """
    (_, plain), (_, mudd) = MODELS
    headers = ["task", "metric"] + [f"{name} {n}-shot" for n in shots for name in (plain, mudd)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for task, metric, description, higher in TABLE_ROWS:
        cells = [description, metric + (" (%)" if higher else "")]
        for n in shots:
            a, b = scores[(plain, n)].get((task, metric)), scores[(mudd, n)].get((task, metric))
            mark = "" if n_shots.get((task, n), n) == n else " (0-shot task)"
            cells += [_cell(a, higher, b) + mark, _cell(b, higher, a) + mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_prompts() -> list[tuple[str, str]]:
    """(prompt, expected continuation) pairs, one per kind of synthetic document."""
    from .synthetic import task_rows

    recall = task_rows("mudd_synth_recall", "test")[0]
    story = task_rows("mudd_synth_story", "test")[0]
    copy = task_rows("mudd_synth_copy", "test")[0]
    arithmetic = task_rows("mudd_synth_arithmetic", "test")[0]
    return [
        (recall["context"], recall["choices"][recall["label"]] + " ..."),
        (copy["context"], copy["target"] + " ."),
        (story["context"], story["target"] + " ."),
        (arithmetic["context"], arithmetic["choices"][arithmetic["label"]] + " ."),
        ("count 17 18 19", "20 21 ... ."),
    ]


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    """Greedy continuation of `prompt`, cut after the first "." (the synthetic language's end of document)."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    words = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split()
    return " ".join(words[: words.index(".") + 1] if "." in words else words)


@torch.no_grad()
def mean_dense_weights(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Token-weighted mean over `texts` of every dense connection's weights: layer i -> `[C_i, i + 2]`."""
    sums, count = None, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        weights = model(ids, output_dense_weights=True).dense_weights
        per_layer = [w[0].sum(0).double() for w in weights]  # [C_i, i + 2], summed over positions
        sums = per_layer if sums is None else [s + w for s, w in zip(sums, per_layer)]
        count += ids.shape[1]
    return [s / count for s in sums]


def dense_weight_grid(mean_weights: list[torch.Tensor]) -> torch.Tensor:
    """`[4 streams, L, L + 1]` (NaN where undefined): entry `[c, i, j]` is the weight of `X_j` in stream c made after
    block i. The last block's single stream (into the final norm) is shown as the residual stream."""
    num_layers = len(mean_weights)
    grid = torch.full((len(STREAMS), num_layers, num_layers + 1), float("nan"), dtype=torch.float64)
    for i, weights in enumerate(mean_weights):
        rows = range(len(STREAMS)) if weights.shape[0] == len(STREAMS) else [len(STREAMS) - 1]
        for stream_row, stream in zip(weights, rows):
            grid[stream, i, : i + 2] = stream_row
    return grid


def relative_luminance(rgba) -> float:
    """WCAG 2 relative luminance of an sRGB colour (components in 0..1)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def annotation_colour(rgba) -> str:
    """"black" or "white", whichever has the higher contrast ratio against a cell of colour `rgba`."""
    luminance = relative_luminance(rgba)
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


EMPTY_CELL_NOTE = (
    "Grey cells have no weight: right of the diagonal the source X_j is not computed yet after block i; "
    "the bottom row is the last connection, which makes only the residual stream (the input of the final norm), "
    "so its query/key/value rows are empty."
)


def heatmap_figure(grid: torch.Tensor, title: str):
    """The heatmap of `dense_weight_grid(...)`: one panel per stream, each cell annotated with its value in black or
    white against the cell's colour; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = grid.shape[1]
    limit = float(torch.nan_to_num(grid.abs(), nan=0.0).max()) or 1.0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")
    norm = matplotlib.colors.Normalize(vmin=-limit, vmax=limit)
    figure, axes = plt.subplots(
        1, len(STREAMS), figsize=(3.2 * len(STREAMS) + 1.2, 0.55 * num_layers + 2.8), constrained_layout=True
    )
    for stream, (axis, name) in enumerate(zip(axes, STREAMS)):
        image = axis.imshow(grid[stream].numpy(), cmap=cmap, norm=norm, aspect="auto")
        for i in range(num_layers):
            for j in range(num_layers + 1):
                value = grid[stream, i, j].item()
                if value == value:  # not NaN
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color=annotation_colour(cmap(norm(value))))
        if torch.isnan(grid[stream, num_layers - 1]).all():
            axis.text(num_layers / 2, num_layers - 1, "none: the last connection\nmakes only the residual stream",
                      ha="center", va="center", fontsize=6.5, color="#444444")
        axis.set_title(f"{name} stream")
        axis.set_xticks(range(num_layers + 1), ["emb"] + [f"{j}" for j in range(1, num_layers + 1)], fontsize=8)
        axis.set_yticks(range(num_layers), [f"{i}" for i in range(num_layers - 1)] + [f"{num_layers - 1} (last)"],
                        fontsize=8)
        axis.set_xlabel("source X_j (output of block j-1)")
        if stream == 0:
            axis.set_ylabel("connection after block i (inputs of block i+1)")
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="mean weight")
    figure.suptitle(title)
    figure.supxlabel(EMPTY_CELL_NOTE, fontsize=7.5, wrap=True)
    return figure


def plot_dense_weights(grid: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    figure = heatmap_figure(grid, title)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_main_job(
    output: str | Path = "outputs",
    shots: tuple[int, ...] = (0, 5),
    batch_size: int = 32,
    limit: int | None = None,
    checkpoints: str | Path = CHECKPOINTS_DIR,
    tasks_dir: str | Path = TASKS_DIR,
    heatmap_documents: int = 64,
    log_dir: str | Path = LOG_DIR,
) -> dict:
    """Run the main job; returns `{"table": markdown, "scores": ..., "generations": ..., "dense_weights": ...}`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import quiet_third_party, stage_bar
    from .synthetic import task_rows

    output, checkpoints = Path(output), Path(checkpoints)
    check_checkpoints(checkpoints)
    # lm-eval logs a warning per task and setting; its progress bars and bootstrap messages go (quiet_third_party)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    output.mkdir(parents=True, exist_ok=True)
    manager = task_manager(include_path=str(tasks_dir), include_defaults=False)

    scores, n_shots, raw = {}, {}, {}
    runs = [(folder, name, n) for n in shots for folder, name in MODELS]
    stage = f"stage 1 of 3: lm-eval, {len(runs)} runs of {len(TASKS)} tasks"
    for folder, name, n in stage_bar(runs, desc=stage, unit="run"):
        with quiet_third_party():
            results = evaluate_model(
                checkpoints / folder, list(TASKS), n, manager=manager, batch_size=batch_size, limit=limit, device="cpu"
            )
        scores[(name, n)] = {(task, metric): metric_value(results, task, metric) for task, metric, *_ in TABLE_ROWS}
        n_shots.update({(task, n): results["n-shot"].get(task, n) for task in TASKS})
        # "limit": documents per task, None when lm-eval scored them all
        raw[f"{name} {n}-shot"] = {"results": results["results"], "n-shot": results["n-shot"], "limit": limit}
    table = results_table(scores, shots, n_shots)

    models, logs = {}, {}
    for folder, name in MODELS:
        with quiet_third_party():
            models[name] = AutoModelForCausalLM.from_pretrained(checkpoints / folder, trust_remote_code=True).eval()
        log_path = checkpoints / folder / "training_log.json"
        logs[name] = json.loads(log_path.read_text()) if log_path.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / MODELS[1][0])

    generations = []
    for prompt, expected in stage_bar(sample_prompts(), desc="stage 2 of 3: sample generations", unit="prompt"):
        generations.append(
            {"prompt": prompt, "expected": expected,
             **{name: greedy_continuation(model, tokenizer, prompt) for name, model in models.items()}}
        )

    mudd_name = MODELS[1][1]
    texts = [row["text"] for row in task_rows("mudd_synth_perplexity", "test")[:heatmap_documents]]
    mean_weights = mean_dense_weights(
        models[mudd_name], tokenizer, stage_bar(texts, desc="stage 3 of 3: dense-connection weights", unit="document")
    )
    grid = dense_weight_grid(mean_weights)
    plot_dense_weights(
        grid, output / "dense_weights_heatmap.png",
        f"tiny MUDDPythia: mean dense-connection weights over {len(texts)} held-out documents",
    )
    (output / "dense_weights.json").write_text(json.dumps([w.tolist() for w in mean_weights]) + "\n")

    written = ["dense_weights_heatmap.png", "dense_weights.json"]
    depth_logs = load_logs(log_dir)
    depth_md = depth_table(depth_summary(depth_logs)) if depth_logs else ""
    if depth_logs:
        plot_depth(depth_logs, output / "depth_experiment.png")
        (output / "depth_experiment.md").write_text(depth_md)
        written += ["depth_experiment.png", "depth_experiment.md"]

    partial = partial_note(limit)
    report = _report(table, generations, logs, shots, depth_md, partial)
    (output / "tiny_models_table.md").write_text(report)
    (output / "lm_eval_results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    written = ["tiny_models_table.md", "lm_eval_results.json"] + written
    print(report)
    if partial:
        print(partial)
    print(f"Wrote {len(written)} files to {output}: {', '.join(written)}")
    return {"table": table, "depth_table": depth_md, "scores": scores, "generations": generations,
            "dense_weights": mean_weights, "report": report}


def partial_note(limit: int | None) -> str:
    """The line that marks a `--limit` run's numbers as partial ("" for a full run)."""
    if limit is None:
        return ""
    return (f"PARTIAL RUN (--limit {limit}): lm-eval scored only the first {limit} documents of each task; these "
            "numbers are not the full evaluation.")


def _report(table: str, generations: list[dict], logs: dict, shots: tuple[int, ...], depth_md: str = "",
            partial: str = "") -> str:
    (_, plain), (_, mudd) = MODELS
    lines = ["# Tiny GPT-NeoX vs tiny MUDDPythia on the synthetic tasks", ""]
    if partial:
        lines += [f"**{partial}**", ""]
    if depth_md:
        lines += [
            "## The depth experiment (experiments/depth/PROTOCOL.md; from the shipped training logs)", "",
            "Final held-out loss (nats/token) and 0-shot recall, mean ± standard deviation over the seeds; each "
            "pair starts from the same function, sees the same data and gets equal training compute:", "",
            depth_md, "Curves: `depth_experiment.png`.", "",
            f"## The shipped {logs.get(mudd, {}).get('depth', '')}-block pair", "",
        ]
    if logs.get(plain) and logs.get(mudd):
        a, b = logs[plain], logs[mudd]
        overhead = 100 * (b["forward_flops_per_token"] / a["forward_flops_per_token"] - 1)
        lines += [
            f"Both trained by `depth_experiment.py` (seed {b.get('seed')}) from the same initial function on the same "
            f"stream of documents with "
            f"equal training compute ({b['train_flops'] / 1e12:.2f} TFLOPs): {mudd} {b['steps']} steps, {plain} "
            f"{a['steps']} steps (the dense connections cost {overhead:.1f}% more FLOPs per token). Parameters: "
            f"{plain} {a['parameters']:,}, {mudd} {b['parameters']:,} "
            f"(+{100 * (b['parameters'] / a['parameters'] - 1):.1f}%). Held-out loss: {plain} "
            f"{a['heldout_loss']:.3f}, {mudd} {b['heldout_loss']:.3f}.",
            "",
        ]
    lines += [
        f"lm-evaluation-harness ({', '.join(f'{n}-shot' for n in shots)}; accuracies in %, better of each pair "
        "in bold):", "", table,
        "## Sample generations (greedy)", "",
        f"| prompt | expected | {plain} | {mudd} |", "|---|---|---|---|",
    ]
    for row in generations:
        lines.append(f"| `{row['prompt']}` | {row['expected']} | {row[plain]} | {row[mudd]} |")
    lines += ["", "Dense-connection weights: `dense_weights_heatmap.png` (values: `dense_weights.json`).", ""]
    return "\n".join(lines)
