"""lm-evaluation-harness for MUDD models: a thin programmatic wrapper and the paper's Table 3 runner (`mudd-eval`).

MUDD folders load through lm-eval's ordinary `hf` backend with remote code, exactly like

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --device cpu --tasks ...

(lm-eval's default device is "cuda", so CPU machines must say `--device cpu`; `evaluate_model` picks it).
MUDD models are causal without an attention mask, so lm-eval's right-padded, mask-free loglikelihood batches give
the same scores at every batch size (tested in tests/test_lm_eval.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .paper_results import PAPER_URL, TABLE3, TABLE3_COLUMNS, TABLE3_TASKS


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "lm-evaluation-harness is not installed: `pip install -e \".[eval]\"` (or `make setup`)."
        ) from error


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_task_files(include_path: str | Path | list) -> None:
    """`ValueError` naming the first task file (or folder) under `include_path` that lm-eval cannot read: its
    `TaskManager` skips such files without a word, and the task then seems not to exist."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager indexes task files with

    for root in map(Path, include_path if isinstance(include_path, (list, tuple)) else [include_path]):
        if not root.exists():
            raise ValueError(f"{root}: task folder not found")
        for file in [root] if root.is_file() else sorted(root.glob("**/*.yaml")):
            try:
                load_yaml(file, resolve_func=False, recursive=True)
            except Exception as error:  # yaml and lm-eval raise many types for a bad file
                reason = (str(error).strip().splitlines() or [""])[0]
                raise ValueError(f"{file}: not a valid lm-eval task file ({type(error).__name__}: {reason[:160]})") from None


def task_manager(include_path: str | Path | list | None = None, include_defaults: bool = True):
    """lm-eval's `TaskManager` over extra task folders (each task file checked first, see `check_task_files`);
    `include_defaults=False` skips indexing the built-in tasks."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        check_task_files(include_path)
    if isinstance(include_path, (list, tuple)):
        include_path = [str(path) for path in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_evaluation_options(num_fewshot: int, batch_size: int, limit: int | None, bootstrap_iters: int = 0) -> None:
    """`ValueError` naming the first option lm-eval would mis-run (a division by zero, a negative shot count)."""
    for name, value, low in (("num_fewshot", num_fewshot, 0), ("batch_size", batch_size, 1),
                             ("bootstrap_iters", bootstrap_iters, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer (documents per task) or None, got {limit!r}")


def evaluate_model(
    model_dir: str | Path,
    tasks: list[str],
    num_fewshot: int,
    manager=None,
    batch_size: int = 16,
    limit: int | None = None,
    device: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """Run lm-eval's `hf` backend on a saved model folder (remote code allowed) and return its results dict.

    `results["results"][task]["acc,none"]` etc. hold the metrics, `results["n-shot"][task]` the shots used.
    Options lm-eval would mis-run are refused first (`check_evaluation_options`).
    """
    check_evaluation_options(num_fewshot, batch_size, limit, bootstrap_iters)
    if not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ValueError(f"`tasks` must be a non-empty list of task names, got {tasks!r}")
    _require_lm_eval()
    import lm_eval

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model folder (no config.json)")
    refuse_incomplete(model_dir)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "trust_remote_code": True},
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device or default_device(),
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )


def refuse_incomplete(model_dir: Path) -> None:
    """`ValueError` when a MUDD model folder's weights lack tensors the model needs: loading would fill them with
    random values and the scores would be those of a partly random model."""
    from .convert_io import ConversionError, missing_weights

    try:
        missing = missing_weights(model_dir)
    except ConversionError as error:
        raise ValueError(str(error)) from None
    if missing:
        raise ValueError(f"{model_dir}: the saved weights lack {len(missing)} tensors the model needs (e.g. "
                         f"{missing[:3]}); evaluating would score random values")


def metric_value(results: dict, task: str, metric: str) -> float | None:
    """The value of `metric` for `task` whatever lm-eval's filter suffix (`acc,none`, `exact_match,trimmed`)."""
    for key, value in results["results"].get(task, {}).items():
        name, _, _ = key.partition(",")
        if name == metric and not key.startswith(f"{metric}_stderr"):
            return value
    return None


# --------------------------------------------------------------------------- Table 3 runner

_RACE_MIDDLE_YAML = """\
# RACE-middle: lm-eval's `race` task (RACE-high) on the dataset's "middle" configuration.
include: {race_yaml}
task: race_middle
dataset_name: middle
"""


def table3_task_manager(workdir: str | Path):
    """A TaskManager with the built-in tasks plus `race_middle` (written into `workdir`)."""
    import lm_eval.tasks

    race_yaml = Path(lm_eval.tasks.__file__).resolve().parent / "race" / "race.yaml"
    if not race_yaml.is_file():
        raise FileNotFoundError(f"lm-eval's RACE task is missing ({race_yaml}); lm-eval changed its layout")
    (Path(workdir) / "race_middle.yaml").write_text(_RACE_MIDDLE_YAML.format(race_yaml=race_yaml))
    return task_manager(include_path=str(workdir), include_defaults=True)


def unavailable_tasks(tasks: list[str], manager) -> dict[str, str]:
    """Try to build each task (which loads its dataset); return `{task: reason}` for those that fail.

    With `HF_HUB_OFFLINE=1` and no local copy, `datasets` fails at once instead of downloading.
    """
    missing = {}
    for task in tasks:
        if task not in manager.all_tasks:
            missing[task] = "lm-eval has no task of this name"
            continue
        try:
            manager.load([task])
        except Exception as error:  # datasets raises many types here (offline, not found, connection)
            config = manager.task_index[task].cfg or {}
            dataset = config.get("dataset_path") or "its dataset"
            reason = (str(error).strip().splitlines() or [""])[0]
            missing[task] = f"{dataset}: {type(error).__name__}: {reason[:160]}"
    return missing


def _format(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def table3_markdown(model_name: str, scores: dict[int, dict[str, float | None]]) -> str:
    """The paper's Table 3 layout: per shot count, the published rows then this run's row (bold).

    `scores[shots][task]` is a fraction in [0, 1] (or None when not run). The published "Avg" is the paper's
    11-task mean; this run's "Avg" is the mean of the columns it has (marked `*` when some are missing).
    """
    headers = ["Model", "Pile ppl", "FLAN ppl", *(header for _, _, header in TABLE3_COLUMNS), "Avg acc"]
    lines = []
    for shots in sorted(scores):
        lines += [f"**{shots}-shot**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for paper_model, row in TABLE3.items():
            ppl = [f"{value:.2f}" for value in row["ppl"]] if shots == 0 else ["–", "–"]
            lines.append("| " + " | ".join([paper_model, *ppl, *(f"{v:.1f}" for v in row[shots])]) + " |")
        ours = [scores[shots].get(task) for task in TABLE3_TASKS]
        present = [value for value in ours if value is not None]
        average = _format(sum(present) / len(present)) if present else "–"
        if present and len(present) < len(ours):
            average += "*"
        cells = [f"**{model_name}** (this run)", "–", "–", *(_format(v) for v in ours), average]
        lines += ["| " + " | ".join(cells) + " |", ""]
    lines.append(
        f"Published rows: Table 3 of the MUDDFormer paper ({PAPER_URL}), accuracy in %. This run: lm-eval "
        "`acc` per task; RACE-H is lm-eval's `race`, RACE-M the same task on the `middle` split; Pile/FLAN "
        "perplexities are not part of the harness run. `*`: average over the columns that ran."
    )
    return "\n".join(lines) + "\n"


def run_table3(
    model_dir: str | Path,
    output: str | Path,
    shots: tuple[int, ...] = (0, 5),
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    tasks: tuple[str, ...] = TABLE3_TASKS,
) -> int:
    """Evaluate `model_dir` on the Table 3 suite and write `table3.md` + `table3_results.json` to `output`.

    Returns the process exit status: 2 when a dataset is unavailable (nothing is evaluated then).
    """
    model_dir, output = Path(model_dir), Path(output)
    if output.exists() and not output.is_dir():  # found before the evaluation, not after it
        print(f"error: --output {output} exists and is not a folder", file=sys.stderr)
        return 2
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir} is not a saved model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        refuse_incomplete(model_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _require_lm_eval()
    with tempfile.TemporaryDirectory(prefix="mudd-table3-") as workdir:
        manager = table3_task_manager(workdir)
        missing = unavailable_tasks(list(tasks), manager)
        if missing:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            print("error: the Table 3 datasets are not available on this machine:", file=sys.stderr)
            for task, reason in missing.items():
                print(f"  {task}: {reason}", file=sys.stderr)
            print(
                "lm-eval loads them with `datasets` from the Hugging Face Hub. "
                + ("HF_HUB_OFFLINE is set, so only a local cache is used: run once with network access "
                   "(unset HF_HUB_OFFLINE) to cache them, or point HF_DATASETS_CACHE/HF_HOME at a cache that has them."
                   if offline else "Check the network connection or set HF_DATASETS_CACHE/HF_HOME to a filled cache."),
                file=sys.stderr,
            )
            return 2
        scores: dict[int, dict[str, float | None]] = {}
        raw = {}
        for shot in shots:
            results = evaluate_model(
                model_dir, list(tasks), shot, manager=manager, batch_size=batch_size, limit=limit, device=device
            )
            scores[shot] = {
                task: metric_value(results, task, metric) for task, metric, _ in TABLE3_COLUMNS if task in tasks
            }
            raw[shot] = {"results": results["results"], "n-shot": results.get("n-shot")}
    output.mkdir(parents=True, exist_ok=True)
    table = table3_markdown(model_dir.name, scores)
    (output / "table3.md").write_text(table)
    (output / "table3_results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(table)
    print(f"Wrote {output / 'table3.md'} and {output / 'table3_results.json'}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to each option's help unless the help already names its default or it is None."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def integer_at_least(low: int):
    """An argparse `type`: an integer >= `low` (the error names the bound; argparse names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def table3_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_dir", help="a saved or converted model folder (config.json, weights, tokenizer)")
    parser.add_argument("--output", default="outputs/table3", help="folder for table3.md and table3_results.json")
    parser.add_argument("--shots", type=integer_at_least(0), nargs="+", default=[0, 5],
                        help="few-shot settings (paper: 0 and 5)")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=8, help="lm-eval batch size")
    parser.add_argument("--limit", type=integer_at_least(1), default=None,
                        help="documents per task, for a quick look only (default: all)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def table3_main(argv: list[str] | None = None) -> int:
    """Console script `mudd-eval`: the paper's Table 3 suite for one model folder."""
    parser = table3_arguments(argparse.ArgumentParser(
        prog="mudd-eval",
        formatter_class=HelpFormatter,
        description="Run the MUDDFormer paper's Table 3 lm-eval suite (0- and 5-shot) on a model folder and write "
        "a Markdown table with the paper's published rows beside it.",
    ))
    args = parser.parse_args(argv)  # before torch, transformers and lm-eval are imported: --help answers at once
    from . import load_package

    load_package()
    return run_table3(args.model_dir, args.output, tuple(args.shots), args.batch_size, args.limit, args.device)


if __name__ == "__main__":
    sys.exit(table3_main())
