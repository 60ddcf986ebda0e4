"""MUDD models from the command line: the main job, the paper's evaluation suite, tiny models, task data, a demo.

`mudd <command>` (or `python -m modeling_muddpythia.cli <command>`).

Arguments are parsed before torch and transformers are imported, so that `mudd --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# argparse only: evaluation.py imports lm-eval and torch lazily
from .evaluation import HelpFormatter, integer_at_least, table3_arguments
from .serve import add_serve_arguments, serve_from_arguments  # argparse only: serve.py imports the server lazily


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO_ROOT / "configuration" / "muddpythia-tiny.json"

_REMOTE_GENERATE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_muddpythia"] = None  # prove the folder works without our package
    import torch
    from transformers import AutoModelForCausalLM
    folder, prompt = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=int(sys.argv[3]), do_sample=False)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "tokens": out[0].tolist()}))
    """
)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import MUDDPythiaConfig, MUDDPythiaForCausalLM

    try:
        config = MUDDPythiaConfig.from_json_file(args.preset)
    except (ValueError, TypeError) as error:  # the config's own validation names the field
        print(f"mudd demo: error: --preset {args.preset}: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = MUDDPythiaForCausalLM(config).eval()
    dense = sum(p.numel() for n, p in model.named_parameters() if ".dense." in n)
    total = sum(p.numel() for p in model.parameters())
    print(f"Built MUDDPythia from {args.preset}: {total:,} parameters, of which {dense:,} "
          f"({100 * dense / (total - dense):.2f}% extra) in the dense connections.")

    output = Path(args.output)
    model.save_pretrained(output)
    print(f"Saved with remote code to {output}: {sorted(p.name for p in output.iterdir())}")

    prompt = [int(t) % config.vocab_size for t in range(1, 9)]
    local = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)[0].tolist()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_GENERATE, str(output), json.dumps(prompt), str(args.max_new_tokens)],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        print("Remote-code load in a fresh process FAILED", file=sys.stderr)
        return 1
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"Reloaded in a fresh process (package hidden) as {remote['class']}")
    print(f"prompt:             {prompt}")
    print(f"greedy, in-process: {local[len(prompt):]}")
    print(f"greedy, remote:     {remote['tokens'][len(prompt):]}")
    if remote["tokens"] != local:
        print("MISMATCH between in-process and remote-code generation", file=sys.stderr)
        return 1
    print("OK: identical generations.")
    return 0


def _main_job(args: argparse.Namespace) -> int:
    from .main_job import run_main_job

    run_main_job(output=args.output, shots=tuple(args.shots), batch_size=args.batch_size, limit=args.limit)
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from .train_tiny import check_training_options, train_tiny_models

    options = dict(steps=args.steps, batch_size=args.batch_size, seq_length=args.seq_length, peak_lr=args.lr,
                   seed=args.seed, threads=args.threads)
    try:
        check_training_options(**options)
    except ValueError as error:
        print(f"mudd train-tiny: error: {error}", file=sys.stderr)
        return 2
    summary = train_tiny_models(output=args.output, **options)
    print(json.dumps(summary, indent=1))
    return 0


def _write_tasks(args: argparse.Namespace) -> int:
    from .synthetic import write_task_data

    for path in write_task_data(args.output):
        print(path)
    return 0


def _table3(args: argparse.Namespace) -> int:
    from .evaluation import run_table3

    return run_table3(args.model_dir, args.output, tuple(args.shots), args.batch_size, args.limit, args.device)


def _positive_finite(text: str) -> float:
    """An argparse `type`: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _preset(text: str) -> str:
    """An argparse `type`: a readable JSON file holding an object (the config is validated when it is built)."""
    try:
        with open(text, encoding="utf-8") as handle:
            value = json.loads(handle.read(1 << 20))  # a preset is a few hundred bytes
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read a JSON config from {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} does not hold a JSON object")
    return text


def build_parser() -> argparse.ArgumentParser:
    formatter = HelpFormatter
    parser = argparse.ArgumentParser(prog="mudd", description=__doc__.split("\n\n")[0], formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=formatter)

    main_job = command(
        "main", "the main job: lm-eval of the shipped tiny GPT-NeoX and MUDDPythia on the synthetic tasks "
        "(0- and 5-shot), side-by-side table, sample generations, dense-weight heatmap, depth experiment figure"
    )
    main_job.add_argument("--output", default="outputs", help="folder for the table, results and heatmap")
    main_job.add_argument("--shots", type=int, nargs="+", default=[0, 5], help="few-shot settings to evaluate")
    main_job.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size")
    main_job.add_argument("--limit", type=int, default=None, help="documents per task (quick look; default: all)")
    main_job.set_defaults(run=_main_job)

    evaluate = command(
        "eval", "the paper's Table 3 lm-eval suite on a model folder (same as the `mudd-eval` command)"
    )
    table3_arguments(evaluate).set_defaults(run=_table3)

    train = command(
        "train-tiny", "train a tiny GPT-NeoX and MUDDPythia pair (6 blocks; the main job's models come from the depth "
        "experiment, python -m modeling_muddpythia.depth_experiment)"
    )
    train.add_argument("--output", default="outputs/train-tiny", help="folder for the two model folders")
    train.add_argument("--steps", type=integer_at_least(1), default=1200,
                       help="training steps of the MUDD model (the plain model gets more, for equal compute)")
    train.add_argument("--batch-size", type=integer_at_least(1), default=8, help="sequences per step")
    # Two tokens at least: a sequence of one has no next token to predict (the loss would be NaN).
    train.add_argument("--seq-length", type=integer_at_least(2), default=256,
                       help="tokens per sequence (at most the tiny models' 512 positions)")
    train.add_argument("--lr", type=_positive_finite, default=3e-3,
                       help="peak AdamW learning rate (warm-up, then cosine)")
    train.add_argument("--seed", type=integer_at_least(0), default=0,
                       help="seed of the initial weights and of the data stream")
    train.add_argument("--threads", type=integer_at_least(0), default=2, help="torch CPU threads (0: as many as torch chooses)")
    train.set_defaults(run=_train_tiny)

    tasks = command("write-tasks", "regenerate the synthetic lm-eval task data (JSONL)")
    tasks.add_argument("--output", default=str(REPO_ROOT / "tests" / "tasks" / "data"), help="folder for the JSONL files")
    tasks.set_defaults(run=_write_tasks)

    demo = command(
        "demo", "build a small MUDDPythia from a preset, save it with remote code, reload it in a fresh "
        "process with trust_remote_code and generate"
    )
    demo.add_argument("--preset", type=_preset, default=str(DEFAULT_PRESET),
                      help="JSON config preset (see configuration/)")
    demo.add_argument("--output", default="outputs/demo", help="folder to save the model to")
    demo.add_argument("--seed", type=integer_at_least(0), default=0, help="seed of the random weights")
    demo.add_argument("--max-new-tokens", type=integer_at_least(1), default=12, help="tokens to generate greedily")
    demo.set_defaults(run=_demo)

    serve = command(
        "serve", "serve a MUDDPythia or MUDDFormer folder through transformers' OpenAI-compatible server "
        "(/v1/completions, /v1/chat/completions, streaming, continuous batching; needs the `serve` extra)"
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=serve_from_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import load_package

    load_package()  # torch, transformers and the Auto-class registration, now that the arguments are valid
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
