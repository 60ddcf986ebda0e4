"""The depth experiment: plain GPT-NeoX against MUDDPythia at equal training compute, three depths at one
width, three seeds. The protocol is fixed in `experiments/depth/PROTOCOL.md` (committed before any run); the
constants below are that protocol, and nothing here may be changed after the runs without saying so.

One run = one (depth, seed, architecture). Both architectures of a (depth, seed) pair start as the same function
(the MUDD model is `muddify` of the plain initialisation, as in `train_tiny.py`), see the same batches in the same
order and get equal training compute (the plain model trains proportionally more steps, FLOPs counted by torch's
FlopCounterMode exactly as `train_tiny.py` counts them). Along the way the held-out loss is measured on a fixed
held-out stream (the same for every run) at every tenth of the run; at the end, the run's own 0-shot accuracy on
the two in-context recall tasks of `tests/tasks` (MQAR 4-way choice and copying) is computed directly from the
model (the main job's lm-eval numbers for the shipped pair are checked against it by the tests).

    python -m modeling_muddpythia.depth_experiment run --depth 8 --seed 0 --arch mudd
    python -m modeling_muddpythia.depth_experiment all --jobs 2        # the 18 runs, two at a time
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .train_tiny import (
    forward_flops_per_token, heldout_loss, mudd_model_from, plain_model, token_batches, train,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = REPO_ROOT / "experiments" / "depth" / "logs"
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"

# ---- the protocol (see experiments/depth/PROTOCOL.md) ----
DEPTHS = (2, 4, 8)
SEEDS = (0, 1, 2)
ARCHS = ("plain", "mudd")
WIDTH = 64  # hidden 64, 4 heads, FFN 256: TINY_SHAPE of train_tiny.py, only num_hidden_layers varies
BATCH_SIZE = 8
SEQ_LENGTH = 256
PEAK_LR = 3e-3
MUDD_STEPS = 900  # fixed after the pilot, before the runs; see PROTOCOL.md
HELDOUT_SEED = 20_000  # one held-out stream for every run (training streams use the seeds 0, 1, 2)
HELDOUT_BATCHES = 8
CURVE_POINTS = 10  # held-out loss after every tenth of a run (and at step 0)
SHIPPED_DEPTH, SHIPPED_SEED = 8, 0  # the pair shipped as the main job's models
SHIPPED_NAMES = {"plain": f"depth{SHIPPED_DEPTH}-gptneox", "mudd": f"depth{SHIPPED_DEPTH}-muddpythia"}


def run_name(depth: int, seed: int, arch: str) -> str:
    return f"depth{depth:02d}-seed{seed}-{arch}"


def _last_logits(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each sequence, in one right-padded batch without attention mask: the models are
    causal, so padding after a sequence's last token cannot change that token's logits."""
    width = max(len(ids) for ids in sequences)
    batch = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences])
    logits = model(batch).logits
    return logits[torch.arange(len(sequences)), torch.tensor([len(ids) - 1 for ids in sequences])]


@torch.no_grad()
def recall_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 100) -> float:
    """0-shot multiple-choice accuracy as lm-eval scores `mudd_synth_recall`: every choice is a single word, so the
    choice with the highest log-likelihood is the one with the highest next-token logit after the context."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        logits = _last_logits(model, [tokenizer(row["context"])["input_ids"] for row in chunk],
                              tokenizer.pad_token_id)
        for row, row_logits in zip(chunk, logits):
            choice_ids = [tokenizer(" " + choice)["input_ids"] for choice in row["choices"]]
            if any(len(c) != 1 for c in choice_ids):
                raise ValueError(f"a recall choice is not one token: {row['choices']}")
            scores = torch.stack([row_logits[c[0]] for c in choice_ids])
            correct += int(scores.argmax().item() == row["label"])
    return correct / len(rows)


@torch.no_grad()
def copy_exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 100) -> float:
    """0-shot exact match of greedy copying (`mudd_synth_copy`): generate until "." (or end of text), at most
    `max_new_tokens` words, and compare the generated words with the target."""
    model.eval()
    stop = {tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id}
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer(row["context"])["input_ids"] for row in chunk]
        generated: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            active = [i for i, finished in enumerate(done) if not finished]
            if not active:
                break
            logits = _last_logits(model, [prompts[i] + generated[i] for i in active], tokenizer.pad_token_id)
            for i, token in zip(active, logits.argmax(-1).tolist()):
                if token in stop:
                    done[i] = True
                else:
                    generated[i].append(token)
        correct += sum(tokenizer.convert_ids_to_tokens(g) == row["target"].split() for g, row in zip(generated, chunk))
    return correct / len(rows)


def run_one(depth: int, seed: int, arch: str, mudd_steps: int, log_dir: Path = LOG_DIR,
            checkpoint_dir: Path | None = None, threads: int | None = 1, batch_size: int = BATCH_SIZE,
            seq_length: int = SEQ_LENGTH, curve_points: int = CURVE_POINTS,
            heldout_batches: int = HELDOUT_BATCHES, eval_rows: int | None = None) -> dict:
    """Train one run and write `log_dir/<run_name>.json`; with `checkpoint_dir`, also save the model there."""
    from .synthetic import build_tokenizer, task_rows

    if threads:
        torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    plain = plain_model(len(tokenizer), seed, num_hidden_layers=depth)
    mudd = mudd_model_from(plain)
    flops = {"plain": forward_flops_per_token(plain, seq_length), "mudd": forward_flops_per_token(mudd, seq_length)}
    steps = {"mudd": mudd_steps, "plain": round(mudd_steps * flops["mudd"] / flops["plain"])}[arch]
    model = {"plain": plain, "mudd": mudd}[arch]
    del plain, mudd
    batches = list(itertools.islice(token_batches(tokenizer, seed, batch_size, seq_length), steps))
    heldout = list(itertools.islice(token_batches(tokenizer, HELDOUT_SEED, batch_size, seq_length), heldout_batches))
    tokens_per_step = batch_size * seq_length
    train_flops_per_step = 3 * flops[arch] * tokens_per_step  # forward + backward ~ 3 forwards, as train_tiny.py

    marks = {round(k * steps / curve_points) for k in range(1, curve_points + 1)}
    curve = [{"step": 0, "train_flops": 0.0, "heldout_loss": heldout_loss(model, heldout)}]
    eval_seconds = [0.0]

    def after_step(done: int, m) -> None:
        if done in marks:
            started = time.perf_counter()
            curve.append({"step": done, "train_flops": train_flops_per_step * done,
                          "heldout_loss": heldout_loss(m, heldout)})
            m.train()
            eval_seconds[0] += time.perf_counter() - started

    started = time.perf_counter()
    losses = train(model, batches, PEAK_LR, desc=run_name(depth, seed, arch), after_step=after_step,
                   disable_progress=True)
    seconds = time.perf_counter() - started - eval_seconds[0]
    model.eval()
    recall_rows = task_rows("mudd_synth_recall", "test")[:eval_rows]
    copy_rows = task_rows("mudd_synth_copy", "test")[:eval_rows]
    record = {
        "run": run_name(depth, seed, arch), "depth": depth, "seed": seed, "arch": arch,
        "hidden_size": model.config.hidden_size, "batch_size": batch_size, "seq_length": seq_length,
        "peak_lr": PEAK_LR, "steps": steps, "mudd_steps": mudd_steps, "tokens": steps * tokens_per_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_token": flops[arch], "train_flops": train_flops_per_step * steps,
        "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 4),
        "threads": torch.get_num_threads(),
        "heldout_seed": HELDOUT_SEED, "heldout_tokens": heldout_batches * tokens_per_step,
        "heldout_loss": curve[-1]["heldout_loss"],
        "recall_acc_0shot": recall_accuracy(model, tokenizer, recall_rows),
        "copy_exact_match_0shot": copy_exact_match(model, tokenizer, copy_rows),
        "eval_documents": len(recall_rows),
        "curve": curve,
        # train loss averaged over blocks of 10 steps (keeps the log small)
        "train_loss_per_10_steps": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4)
                                    for i in range(0, len(losses), 10)],
    }
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{record['run']}.json").write_text(json.dumps(record, indent=1) + "\n")
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        model.save_pretrained(checkpoint_dir)
        tokenizer.save_pretrained(checkpoint_dir)
        (checkpoint_dir / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def all_runs() -> list[tuple[int, int, str]]:
    """Every (depth, seed, arch) of the protocol, longest first (so that two workers finish together)."""
    return [(d, s, a) for d in sorted(DEPTHS, reverse=True) for s in SEEDS for a in ARCHS]


# ---------------------------------------------------------------- analysis (used by the main job and experiments/depth/README.md)

ARCH_NAMES = {"plain": "GPT-NeoX", "mudd": "MUDDPythia"}


def load_logs(log_dir: str | Path = LOG_DIR) -> list[dict]:
    """Every run log (`<run>.json`) in `log_dir`, sorted by depth, seed and architecture."""
    logs = [json.loads(path.read_text()) for path in sorted(Path(log_dir).glob("depth*-seed*-*.json"))]
    return sorted(logs, key=lambda r: (r["depth"], r["seed"], ARCHS.index(r["arch"])))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, sd


def depth_summary(logs: list[dict]) -> list[dict]:
    """Per depth: the seeds and, per architecture, mean/sd over seeds of the final held-out loss and the 0-shot
    recall metrics, and the paired difference MUDD - plain of the held-out loss (same depth and seed)."""
    rows = []
    for depth in sorted({r["depth"] for r in logs}):
        runs = {(r["seed"], r["arch"]): r for r in logs if r["depth"] == depth}
        seeds = sorted({seed for seed, arch in runs if all((seed, a) in runs for a in ARCHS)})
        row = {"depth": depth, "seeds": seeds}
        for arch in ARCHS:
            chosen = [runs[(seed, arch)] for seed in seeds]
            row[arch] = {
                "parameters": chosen[0]["parameters"], "steps": chosen[0]["steps"],
                "train_flops": chosen[0]["train_flops"],
                "forward_flops_per_token": chosen[0]["forward_flops_per_token"],
                "seconds_per_step": _mean_sd([r["seconds_per_step"] for r in chosen])[0],
                **{key: _mean_sd([r[key] for r in chosen])
                   for key in ("heldout_loss", "recall_acc_0shot", "copy_exact_match_0shot")},
            }
        differences = [runs[(seed, "mudd")]["heldout_loss"] - runs[(seed, "plain")]["heldout_loss"] for seed in seeds]
        row["difference"] = _mean_sd(differences)
        row["mudd_better_seeds"] = sum(d < 0 for d in differences)
        rows.append(row)
    return rows


def _pm(mean_sd: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, sd = mean_sd
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def depth_table(summary: list[dict]) -> str:
    """Markdown: one row per depth; mean ± sample standard deviation over the seeds."""
    headers = [
        "blocks", "parameters GPT-NeoX / MUDD", "MUDD FLOPs/token", "steps GPT-NeoX / MUDD",
        "held-out loss GPT-NeoX", "held-out loss MUDDPythia", "MUDD - plain (paired)", "seeds MUDD lower",
        "MQAR acc % GPT-NeoX / MUDD", "copy EM % GPT-NeoX / MUDD",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in summary:
        plain, mudd = row["plain"], row["mudd"]
        overhead = 100 * (mudd["forward_flops_per_token"] / plain["forward_flops_per_token"] - 1)
        cells = [
            str(row["depth"]), f"{plain['parameters']:,} / {mudd['parameters']:,}", f"+{overhead:.1f}%",
            f"{plain['steps']} / {mudd['steps']}", _pm(plain["heldout_loss"]), _pm(mudd["heldout_loss"]),
            _pm(row["difference"]),
            f"{row['mudd_better_seeds']} of {len(row['seeds'])}",
            f"{_pm(plain['recall_acc_0shot'], 1, 100)} / {_pm(mudd['recall_acc_0shot'], 1, 100)}",
            f"{_pm(plain['copy_exact_match_0shot'], 1, 100)} / {_pm(mudd['copy_exact_match_0shot'], 1, 100)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def depth_figure(logs: list[dict]):
    """Two panels: final held-out loss against depth (every run a marker whose shape is its seed, a line through the
    means over seeds), and held-out loss during training against training FLOPs (mean over seeds, min-max band).
    Colour is the architecture in both; one legend per meaning (architecture, seed, depth). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    colours = {"plain": "tab:blue", "mudd": "tab:red"}
    lines = {"plain": "-", "mudd": "--"}
    depths = sorted({r["depth"] for r in logs})
    seeds = sorted({r["seed"] for r in logs})
    seed_markers = dict(zip(seeds, ("o", "s", "^", "D", "v", "P")))
    depth_markers = dict(zip(depths, ("o", "s", "^", "D", "v", "P")))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)

    for k, arch in enumerate(ARCHS):
        means = []
        for depth in depths:
            runs = sorted((r for r in logs if r["depth"] == depth and r["arch"] == arch), key=lambda r: r["seed"])
            for j, run in enumerate(runs):  # the seeds of one architecture side by side, the two architectures apart
                x = depth * 2 ** ((k - 0.5) * 0.16 + (j - (len(runs) - 1) / 2) * 0.035)
                left.scatter(x, run["heldout_loss"], s=30, marker=seed_markers[run["seed"]], facecolors="none",
                             edgecolors=colours[arch], linewidths=1.2)
            means.append(sum(r["heldout_loss"] for r in runs) / len(runs))
        left.plot([d * 2 ** ((k - 0.5) * 0.16) for d in depths], means, color=colours[arch], linestyle=lines[arch],
                  linewidth=1.5)
    left.set_xscale("log", base=2)
    left.set_xticks(depths, [str(d) for d in depths])
    left.minorticks_off()
    left.set_xlabel("blocks (width 64)")
    left.set_ylabel("held-out loss at the end of training (nats/token)")
    left.set_title("final held-out loss against depth (equal compute per pair)", fontsize=10)
    seed_handles = [
        Line2D([], [], color="0.3", marker=seed_markers[s], markerfacecolor="none", linestyle="none", label=f"seed {s}")
        for s in seeds
    ]
    left.legend(handles=seed_handles, title="one marker per run: its seed", fontsize=8, ncol=len(seeds),
                loc="upper center", bbox_to_anchor=(0.5, -0.13))

    for depth in depths:
        for arch in ARCHS:
            runs = [r for r in logs if r["depth"] == depth and r["arch"] == arch]
            points = list(zip(*[[(p["train_flops"], p["heldout_loss"]) for p in r["curve"][1:]] for r in runs]))
            flops = [sum(f for f, _ in point) / len(point) / 1e12 for point in points]
            losses = [[loss for _, loss in point] for point in points]
            mean = [sum(v) / len(v) for v in losses]
            right.plot(flops, mean, color=colours[arch], marker=depth_markers[depth], markersize=4,
                       linestyle=lines[arch])
            right.fill_between(flops, [min(v) for v in losses], [max(v) for v in losses], color=colours[arch],
                               alpha=0.12, linewidth=0)
    right.set_xscale("log")
    lowest, highest = right.get_xlim()
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lowest <= t <= highest]
    right.set_xticks(ticks, [f"{t:g}" for t in ticks])
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlabel("training FLOPs (10^12)")
    right.set_ylabel("held-out loss (nats/token)")
    right.set_title("held-out loss during training (band: min-max over seeds)", fontsize=10)
    depth_handles = [
        Line2D([], [], color="0.3", marker=depth_markers[d], linestyle="none", label=f"{d} blocks") for d in depths
    ]
    right.legend(handles=depth_handles, title="one marker shape per depth", fontsize=8, ncol=len(depths),
                 loc="upper center", bbox_to_anchor=(0.5, -0.13))
    architecture_handles = [
        Line2D([], [], color=colours[a], linestyle=lines[a], label=f"{ARCH_NAMES[a]} (line: mean over seeds)")
        for a in ARCHS
    ]
    # the figure's title heads the architecture legend (a separate suptitle would overlap it)
    figure.legend(handles=architecture_handles, loc="outside upper center", ncol=len(ARCHS), fontsize=9,
                  frameon=False, title_fontsize=11,
                  title=f"GPT-NeoX vs MUDDPythia, {len(logs)} runs: depths {', '.join(map(str, depths))}; "
                        f"seeds {', '.join(map(str, seeds))}")
    return figure


def plot_depth(logs: list[dict], path: str | Path) -> None:
    """`depth_figure(logs)` saved as a PNG."""
    import matplotlib.pyplot as plt

    figure = depth_figure(logs)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _run_command(args) -> int:
    checkpoint = None
    if (args.depth, args.seed) == (SHIPPED_DEPTH, SHIPPED_SEED) and not args.no_checkpoint:
        checkpoint = CHECKPOINTS_DIR / SHIPPED_NAMES[args.arch]
    record = run_one(args.depth, args.seed, args.arch, args.mudd_steps, Path(args.log_dir), checkpoint,
                     threads=args.threads, eval_rows=args.eval_rows)
    print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "train_loss_per_10_steps")}))
    return 0


def _all_command(args) -> int:
    """Run every run of the protocol as subprocesses, `--jobs` at a time, each logging to `<log_dir>/<run>.out`."""
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [r for r in all_runs() if not (log_dir / f"{run_name(*r)}.json").exists()]
    running: list[subprocess.Popen] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    while pending or running:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < args.jobs:
            depth, seed, arch = pending.pop(0)
            out = open(log_dir / f"{run_name(depth, seed, arch)}.out", "w")
            command = [sys.executable, "-m", "modeling_muddpythia.depth_experiment", "run", "--depth", str(depth),
                       "--seed", str(seed), "--arch", arch, "--mudd-steps", str(args.mudd_steps),
                       "--log-dir", str(log_dir)]
            running.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT))
            print(time.strftime("%H:%M:%S"), "started", run_name(depth, seed, arch), flush=True)
        time.sleep(5)
    print(time.strftime("%H:%M:%S"), "all runs done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="depth_experiment", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one run")
    one.add_argument("--depth", type=int, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--arch", choices=ARCHS, required=True)
    one.add_argument("--mudd-steps", type=int, default=MUDD_STEPS)
    one.add_argument("--log-dir", default=str(LOG_DIR))
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("--eval-rows", type=int, default=None)
    one.add_argument("--no-checkpoint", action="store_true")
    one.set_defaults(run=_run_command)
    every = commands.add_parser("all", help="every run of the protocol, --jobs at a time")
    every.add_argument("--jobs", type=int, default=2)
    every.add_argument("--mudd-steps", type=int, default=MUDD_STEPS)
    every.add_argument("--log-dir", default=str(LOG_DIR))
    every.set_defaults(run=_all_command)
    args = parser.parse_args(argv)
    if args.mudd_steps is None:
        parser.error("--mudd-steps is required until the protocol fixes MUDD_STEPS")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
