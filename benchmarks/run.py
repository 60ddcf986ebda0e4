"""Measure each MUDD model against the transformers model of the same shape, in one process.

    python -m benchmarks.run --families pythia --sizes 160m --seq-lens 512 --batch-size 2 --threads 2
    python -m benchmarks.run --device cuda --dtype bfloat16 --sizes 1.4b 2.8b --seq-lens 2048 --compile-decode

For every family, size and sequence length the plain model and its muddified twin (see `benchmarks.families`) are
measured alternately (plain, MUDD, MUDD, plain, ...), so that drift in the machine's load hits both alike:

* forward: one full forward over `[batch, seq]` tokens (images for ViT), no grad, no cache;
* train_step: forward + backward of the model's own loss (labels = inputs), gradients from scratch;
* decode: greedy `generate` with the default (dynamic) cache after a prompt of `seq` tokens; tokens/s counts the
  new tokens of the batch from the first to the last decoding step (the prompt's forward is not in it);
* generate_batch (serving throughput, not in the defaults): continuous batching (`model.generate_batch`, what
  `transformers serve --continuous-batching` and `mudd serve` run) of 32 greedy requests with prompts of mixed
  lengths (8 to `seq` tokens), `--new-tokens` each; tokens/s counts all new tokens over the whole call, prompts'
  prefill and scheduling included;
* peak_memory: the peak memory of one training step (after a first step has created the gradients), each model
  measured in a fresh process of its own that holds only that model: on CUDA the allocator's peak, on CPU the
  process's peak resident set size (VmHWM, reset before the step);
* compiled_forward / compiled_train_step: the forward and the training step through
  `torch.compile(model, fullgraph=True)` (default inductor backend), both models compiled the same way;
* with `--compile-decode`: a `StaticCache` decode loop through `torch.compile(model.forward, fullgraph=True)`;
  a graph break or a recompilation during the timed steps is reported as a failure (exit status 1).

Each value is the median over `--repeats` runs (after `--warmup` runs); the ratio is MUDD / plain of the medians and
the spread is the range of the per-repeat ratios. Each metric shows one progress bar while it runs and then one line
with the ratio to read. `--quick` is a short look (3 repeats, 8 new tokens, T=256 unless given). Writes
`results.json` and `results.png` to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import StaticCache

from benchmarks.families import FAMILIES, Family, build_pair


# The targets: MUDD / plain ratios (time and memory: at most; speed: at least).
TARGETS = {
    "cpu": {
        "forward": ("<=", 1.03), "train_step": ("<=", 1.08), "decode": (">=", 0.95), "peak_memory": ("<=", 1.10),
        "generate_batch": (">=", 0.95),
        "compiled_forward": ("<=", 1.05), "compiled_train_step": ("<=", 1.10),
    },
    # compiled decode: at most 1.10x the time per token, i.e. at least 1 / 1.10 of the plain model's tokens/s
    "cuda": {
        "train_step": ("<=", 1.30), "compiled_train_step": ("<=", 1.15), "peak_memory": ("<=", 1.15),
        "compiled_decode": (">=", 1 / 1.10),
    },
}
METRICS = {  # name -> (unit, higher is better)
    "forward": ("s", False),
    "train_step": ("s", False),
    "decode": ("tokens/s", True),
    "generate_batch": ("tokens/s", True),
    "peak_memory": ("MiB", False),
    "compiled_forward": ("s", False),
    "compiled_train_step": ("s", False),
    "compiled_decode": ("tokens/s", True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ backend logs its start and stop straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# `cpu` (this process's CPU time, CPU runs only) is far less sensitive than wall time to other jobs competing for a
# shared machine's cores; use it with `--threads 1`, where no time is spent waiting for other threads.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


class _StepClock(LogitsProcessor):
    """Records the time at which each decoding step's logits are ready (called once per generated token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _sync(self.device)
        self.times.append(clock())
        return scores


# --------------------------------------------------------------------------- one measurement of one model


def _model_inputs(family: Family, model, batch_size: int, seq_len: int, device: torch.device, dtype: torch.dtype):
    """Inputs for the forward and the training step: token ids (labels = ids) or images with class labels."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    if family.kind == "causal-lm":
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        return {"input_ids": ids, "use_cache": False}, {"labels": ids}
    pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator)
    return {"pixel_values": pixels.to(device, dtype)}, {"labels": labels.to(device)}


def _forward(model, inputs: dict) -> Callable[[], float]:
    def run() -> None:
        with torch.no_grad():
            model(**inputs)

    return run


def _train_step(model, inputs: dict, labels: dict) -> Callable[[], None]:
    def run() -> None:
        model(**inputs, **labels).loss.backward()

    return run


def _start_train_step(model) -> None:
    model.zero_grad(set_to_none=True)


def time_once(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = clock()
    run()
    _sync(device)
    return clock() - start


def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Greedy `generate` with the default cache; new tokens of the whole batch per second of decoding steps."""
    clock = _StepClock(device)
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
    )
    steps = len(clock.times) - 1
    return prompt.shape[0] * steps / (clock.times[-1] - clock.times[0])


SERVING_REQUESTS = 32
SERVING_PAGE_SIZE = 32  # tokens per paged KV cache block: the cache is allocated for exactly the requests
SERVING_BATCH_TOKENS = 512  # tokens per continuous batching step (prefill is split into chunks of this size)


def serving_prompts(vocab_size: int, longest: int, count: int = SERVING_REQUESTS, shortest: int = 8) -> list[list[int]]:
    """`count` prompts of token ids whose lengths are spread evenly over `shortest..longest`, in a shuffled order
    (fixed seed), so that long and short requests share the batches as they would on a server."""
    generator = torch.Generator().manual_seed(0)
    shortest = min(shortest, longest)
    lengths = torch.linspace(shortest, longest, count).round().long()[torch.randperm(count, generator=generator)]
    return [torch.randint(0, vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def generate_batch_tokens_per_second(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Greedy continuous batching of `prompts` (`model.generate_batch`), `new_tokens` each; new tokens of all
    requests per second of the whole call. The paged cache holds every request at once, so none waits for room."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    blocks = sum(-(-(len(p) + new_tokens) // SERVING_PAGE_SIZE) for p in prompts)
    cache = ContinuousBatchingConfig(page_size=SERVING_PAGE_SIZE, num_blocks=blocks,
                                     max_batch_tokens=SERVING_BATCH_TOKENS)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = clock()
    outputs = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cache)
    elapsed = clock() - start
    generated = sum(len(output.generated_tokens) for output in outputs.values())
    if generated != len(prompts) * new_tokens:
        raise RuntimeError(f"generate_batch returned {generated} tokens, expected {len(prompts)} x {new_tokens}")
    return generated / elapsed


def _current_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:  # Linux: the peak resident set size since the last reset
        return 1024 * int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # hand freed heap pages back to the system, so that they do not count as resident
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS
        clear_refs.write("5")


def measure_peak_memory_alone(
    family_name: str, size: str, length: int, which: str, batch_size: int, device: str, dtype: str, attn: str,
    threads: int | None,
) -> float:
    """Run in a fresh process: build the pair, keep only `which` ("plain" or "mudd"), and return the peak memory
    (bytes) of a training step after a first one. Both sides build and drop the same models, so neither carries
    the other's weights."""
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    device_, dtype_ = torch.device(device), getattr(torch, dtype)
    family = FAMILIES[family_name]
    pair = dict(zip(("plain", "mudd"), build_pair(family, size, device_, dtype_, attn, image_size=length)))
    model = pair.pop(which)
    del pair
    model.train()
    inputs, labels = _model_inputs(family, model, batch_size, length, device_, dtype_)
    step = _train_step(model, inputs, labels)
    step()  # the gradients exist from here on, as in any training loop
    _sync(device_)
    _reset_peak(device_)
    step()
    _sync(device_)
    return float(_current_peak_bytes(device_))


def peak_memory_in_own_processes(
    family: Family, size: str, length: int, args: argparse.Namespace, progress: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """MiB per model, each measured by `measure_peak_memory_alone` in a fresh (spawned) process."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    samples = {}
    for which in ("plain", "mudd"):
        with context.Pool(1) as pool:
            peak = pool.apply(measure_peak_memory_alone, (
                family.name, size, length, which, args.batch_size, args.device, args.dtype, args.attn, args.threads,
            ))
        samples[which] = [peak / 2**20]
        if progress is not None:
            progress()
    return samples


class GraphBreakError(RuntimeError):
    """`torch.compile(fullgraph=True)` could not compile a decoding step in one graph, or had to recompile."""


def compiled_decode_tokens_per_second(
    model, prompt: torch.Tensor, new_tokens: int, mode: str, device: torch.device, warmup_steps: int = 3
) -> float:
    """Greedy decoding with a `StaticCache` through `torch.compile(model.forward, fullgraph=True)`.

    The prompt runs eagerly; the first `warmup_steps` steps compile (and record CUDA graphs); the timed steps then
    must not recompile. Raises `GraphBreakError` naming the problem otherwise.
    """
    batch_size, prompt_len = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + warmup_steps + new_tokens)
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, mode=None if mode == "default" else mode)
    with torch.no_grad():
        token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        def decode(position: int) -> torch.Tensor:
            positions = torch.full((batch_size, 1), position, dtype=torch.long, device=device)
            logits = step(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True).logits
            return logits[:, -1:].argmax(-1).clone()  # CUDA graphs reuse their output buffers

        try:
            for position in range(prompt_len, prompt_len + warmup_steps):
                token = decode(position)
        except Exception as error:  # dynamo raises Unsupported / UserError subclasses on a graph break
            raise GraphBreakError(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}") from error
        start_position = prompt_len + warmup_steps
        _sync(device)
        start = clock()
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                for position in range(start_position, start_position + new_tokens):
                    token = decode(position)
        except Exception as error:
            raise GraphBreakError(f"recompiled during decoding: {str(error).strip().splitlines()[0]}") from error
        _sync(device)
    return batch_size * new_tokens / (clock() - start)


# --------------------------------------------------------------------------- interleaved comparison


def interleaved(
    measure: dict[str, Callable[[], float]], repeats: int, warmup: int, prepare: dict[str, Callable[[], None]] | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Run each model's measurement `warmup + repeats` times in the order A B B A A B ... and keep the last
    `repeats` values per model; alternating the order cancels linear drift of the machine's speed. `progress` is
    called after each measurement."""
    names = list(measure)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            if prepare:
                prepare[name]()
            value = measure[name]()
            if index >= warmup:
                samples[name].append(value)
            if progress is not None:
                progress()
    return samples


def summarize(samples: dict[str, list[float]], higher_is_better: bool) -> dict:
    """Medians, ranges, the ratio MUDD / plain of the medians and the range of the per-repeat ratios."""
    result = {}
    for name, values in samples.items():
        result[name] = {
            "median": statistics.median(values), "min": min(values), "max": max(values), "samples": values,
        }
    pair_ratios = [m / p for m, p in zip(samples["mudd"], samples["plain"])]
    result["ratio"] = result["mudd"]["median"] / result["plain"]["median"]
    result["ratio_spread"] = [min(pair_ratios), max(pair_ratios)]
    result["pair_ratio_median"] = statistics.median(pair_ratios)
    result["higher_is_better"] = higher_is_better
    return result


def benchmark_case(
    family: Family, size: str, seq_len: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict:
    """All requested metrics for one (family, size, sequence length or image size)."""
    plain, mudd = build_pair(family, size, device, dtype, args.attn, image_size=seq_len)
    models = {"plain": plain, "mudd": mudd}
    case = {
        "family": family.name, "size": size, "batch_size": args.batch_size, "dtype": args.dtype,
        "device": device.type, "attn_implementation": args.attn,
        "seq_len" if family.kind == "causal-lm" else "image_size": seq_len,
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "metrics": {},
        "failures": [],
    }
    inputs = {name: _model_inputs(family, model, args.batch_size, seq_len, device, dtype) for name, model in models.items()}

    def record(metric: str, samples: dict[str, list[float]]) -> None:
        case["metrics"][metric] = summarize(samples, METRICS[metric][1])
        _print_metric(metric, case["metrics"][metric], device.type)

    @contextlib.contextmanager
    def stage(metric: str, runs_per_model: int):
        """One progress bar per metric: one step per measurement of either model."""
        from tqdm.auto import tqdm

        with tqdm(total=2 * runs_per_model, desc=f"  {metric}", unit="run", leave=False, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            yield bar.update

    rounds = args.warmup + args.repeats

    def timed_forward(metric: str, runners: dict, warmup: int) -> None:
        """`metric`: the forward of each model through `runners[name]` (the model itself, or its compiled form)."""
        runs = {name: _forward(runners[name], inputs[name][0]) for name in models}
        with stage(metric, warmup + args.repeats) as step:
            samples = interleaved({n: (lambda r=r: time_once(r, device)) for n, r in runs.items()},
                                  args.repeats, warmup, progress=step)
        record(metric, samples)

    def timed_train_step(metric: str, runners: dict, warmup: int) -> None:
        """`metric`: the training step of each model through `runners[name]`, gradients from scratch each time."""
        for model in models.values():
            model.train()
        runs = {name: _train_step(runners[name], *inputs[name]) for name in models}
        prepare = {name: (lambda m=model: _start_train_step(m)) for name, model in models.items()}
        with stage(metric, warmup + args.repeats) as step:
            samples = interleaved({n: (lambda r=r: time_once(r, device)) for n, r in runs.items()},
                                  args.repeats, warmup, prepare, progress=step)
        record(metric, samples)
        for model in models.values():
            model.zero_grad(set_to_none=True)
            model.eval()

    print(f"\n== {_case_label(case)}  ({case['parameters']['plain'] / 1e6:.1f}M plain, "
          f"{case['parameters']['mudd'] / 1e6:.1f}M MUDD parameters)", flush=True)
    if "forward" in args.metrics:
        timed_forward("forward", models, args.warmup)
    if "train_step" in args.metrics:
        timed_train_step("train_step", models, args.warmup)
    if "peak_memory" in args.metrics:
        with stage("peak_memory", 1) as step:
            record("peak_memory", peak_memory_in_own_processes(family, size, seq_len, args, progress=step))
    if "compiled_forward" in args.metrics or "compiled_train_step" in args.metrics:
        torch._dynamo.reset()
        compiled = {name: torch.compile(model, fullgraph=True) for name, model in models.items()}
        warmup = max(args.warmup, 1)  # the first (warm-up) run compiles
        if "compiled_forward" in args.metrics:
            timed_forward("compiled_forward", compiled, warmup)
        if "compiled_train_step" in args.metrics:
            timed_train_step("compiled_train_step", compiled, warmup)
        del compiled
        torch._dynamo.reset()
    if family.kind == "causal-lm" and ({"decode", "generate_batch"} & set(args.metrics) or args.compile_decode):
        prompt_len = min(args.prompt_len or seq_len, plain.config.max_position_embeddings - args.new_tokens - 8)
        prompt = inputs["plain"][0]["input_ids"][:, :prompt_len]
        if "decode" in args.metrics:
            with stage("decode", rounds) as step:
                samples = interleaved(
                    {name: (lambda m=model: decode_tokens_per_second(m, prompt, args.new_tokens, device))
                     for name, model in models.items()},
                    args.repeats, args.warmup, progress=step,
                )
            record("decode", samples)
        if "generate_batch" in args.metrics:
            prompts = serving_prompts(plain.config.vocab_size, prompt_len)
            with stage("generate_batch", rounds) as step:
                samples = interleaved(
                    {name: (lambda m=model: generate_batch_tokens_per_second(m, prompts, args.new_tokens))
                     for name, model in models.items()},
                    args.repeats, args.warmup, progress=step,
                )
            record("generate_batch", samples)
        if args.compile_decode:
            samples = {}
            for name, model in models.items():
                try:
                    samples[name] = [
                        compiled_decode_tokens_per_second(model, prompt, args.new_tokens, args.compile_mode, device)
                        for _ in range(args.repeats)
                    ]
                except GraphBreakError as error:
                    case["failures"].append(f"compiled decode of the {name} model: {error}")
                    print(f"  compiled_decode  FAILED for {name}: {error}", flush=True)
            if len(samples) == 2:
                record("compiled_decode", samples)
    del plain, mudd
    models.clear()  # the last references, before the memory is released
    _release(device)
    return case


# --------------------------------------------------------------------------- reporting


def _case_label(case: dict) -> str:
    length = f"T={case['seq_len']}" if "seq_len" in case else f"img={case['image_size']}"
    return f"{case['family']} {case['size']} {length} B={case['batch_size']} {case['dtype']} {case['device']}"


def _target_status(metric: str, ratio: float, device_type: str) -> str:
    target = TARGETS.get(device_type, {}).get(metric)
    if target is None:
        return ""
    op, bound = target
    met = ratio <= bound if op == "<=" else ratio >= bound
    return f"target {op} {bound:.3f}: {'met' if met else 'MISSED'}"


# what the MUDD / plain ratio of each metric is a ratio of
RATIO_NAMES = {"forward": "time", "train_step": "time", "decode": "speed", "generate_batch": "speed",
               "peak_memory": "memory",
               "compiled_forward": "time", "compiled_train_step": "time", "compiled_decode": "speed"}


def metric_line(metric: str, result: dict, device_type: str) -> str:
    """One line per metric: both medians, then the one ratio to read (MUDD / plain of the medians) and which way is
    better; the range of the per-repeat ratios shows how steady it was."""
    unit = METRICS[metric][0]
    low, high = result["ratio_spread"]
    better = "higher is better" if result["higher_is_better"] else "lower is better"
    spread = f", per-repeat {low:.3f}..{high:.3f}" if len(result["plain"]["samples"]) > 1 else ""
    target = _target_status(metric, result["ratio"], device_type)
    return (
        f"  {metric:<19} plain {result['plain']['median']:10.4g} {unit:<8} MUDD {result['mudd']['median']:10.4g} "
        f"{unit:<8} MUDD/plain {RATIO_NAMES[metric]} = {result['ratio']:.3f} ({better}{spread})"
        + (f"  {target}" if target else "")
    )


def _print_metric(metric: str, result: dict, device_type: str) -> None:
    print(metric_line(metric, result, device_type), flush=True)


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def plot(results: dict, path: Path) -> bool:
    """Bar chart of the MUDD / plain ratio per metric and case, with the per-repeat range and the targets."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", file=sys.stderr)
        return False
    metrics = [m for m in METRICS if any(m in case["metrics"] for case in results["cases"])]
    if not metrics:
        return False
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        cases = [case for case in results["cases"] if metric in case["metrics"]]
        labels = [_case_label(case).rsplit(" ", 3)[0].replace(" ", "\n", 2) for case in cases]
        ratios = [case["metrics"][metric]["ratio"] for case in cases]
        spreads = [case["metrics"][metric]["ratio_spread"] for case in cases]
        errors = [[r - s[0] for r, s in zip(ratios, spreads)], [s[1] - r for r, s in zip(ratios, spreads)]]
        axis.errorbar(range(len(cases)), ratios, yerr=errors, fmt="o", capsize=4, color="tab:blue")
        for x, ratio in enumerate(ratios):
            axis.annotate(f"{ratio:.3f}", (x, ratio), textcoords="offset points", xytext=(8, 0), fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        target = TARGETS.get(results["device"], {}).get(metric)
        if target is not None:
            axis.axhline(target[1], color="tab:red", linestyle="--", linewidth=1, label=f"target {target[0]} {target[1]:.2f}")
            axis.legend(loc="lower right", fontsize=8)
        better = "higher is better" if METRICS[metric][1] else "lower is better"
        axis.set_title(f"{metric} (MUDD / plain, {better})", fontsize=9)
        axis.set_xticks(range(len(cases)), labels, fontsize=7)
        axis.set_xlim(-0.6, len(cases) - 0.4)
        low = min(min(s[0] for s in spreads), target[1] if target else 1.0, 1.0)
        high = max(max(s[1] for s in spreads), target[1] if target else 1.0, 1.0)
        axis.set_ylim(low - 0.1 * (high - low + 0.05), high + 0.1 * (high - low + 0.05))
    machine = results["machine"]
    figure.suptitle(f"MUDD vs plain, {machine['gpu'] or machine['cpu']} ({results['dtype']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["pythia", "llama", "vit"],
                        help="model families to compare (default: all three)")
    parser.add_argument("--sizes", nargs="+", help="size names (default: each family's own default); "
                        + "; ".join(f"{f.name}: {', '.join(f.sizes)}" for f in FAMILIES.values()))
    parser.add_argument("--quick", action="store_true",
                        help="a short look: --repeats 3 --warmup 1 --new-tokens 8 --seq-lens 256 unless given")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, help="decoder sequence lengths (default: 512)")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224], help="ViT image sizes")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences or images per batch (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of both models (default: float32)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of both models")
    parser.add_argument("--metrics", nargs="+", default=["forward", "train_step", "decode", "peak_memory"],
                        choices=["forward", "train_step", "decode", "peak_memory", "generate_batch", "compiled_forward",
                                 "compiled_train_step"],
                        help="what to measure (default: the first four); generate_batch: continuous batching "
                        "throughput of 32 requests; compiled_*: through torch.compile(fullgraph=True), which takes "
                        "minutes to compile at 160m")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured runs per model, the median is reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured runs per model before the repeats (default: 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per decode run (default: 32)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens before decoding (default: the sequence length, within the model's limit)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also decode with StaticCache + torch.compile(fullgraph=True); a graph break fails the run")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for --compile-decode (default: reduce-overhead on CUDA, default on CPU)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (CPU device only; steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"), help="folder for results.json/.png")
    args = parser.parse_args(argv)
    defaults = {"repeats": 3, "warmup": 1, "new_tokens": 8, "seq_lens": [256]} if args.quick else \
        {"repeats": 5, "warmup": 1, "new_tokens": 32, "seq_lens": [512]}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "repeats", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be non-negative")
    if any(length < 1 for length in args.seq_lens + args.image_sizes):
        parser.error("--seq-lens and --image-sizes must be positive")
    if args.sizes:
        known = set().union(*(FAMILIES[f].sizes for f in args.families))
        unknown = sorted(set(args.sizes) - known)
        if unknown:
            parser.error(f"unknown size(s) {unknown} for families {args.families}")
    if args.timer == "cpu" and not args.device.startswith("cpu"):
        parser.error("--timer cpu measures CPU runs only")
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.timer]
    transformers.logging.set_verbosity_error()
    results = {
        "machine": machine_description(device), "device": device.type, "dtype": args.dtype,
        "command": " ".join(sys.argv), "timer": args.timer, "targets": TARGETS.get(device.type, {}), "cases": [], "skipped": [],
    }
    print(f"machine: {json.dumps(results['machine'])}")
    for family_name in args.families:
        family = FAMILIES[family_name]
        reason = family.unavailable_reason()
        if reason is not None:
            results["skipped"].append(f"{family_name}: {reason}")
            print(f"\n-- skipping {family_name}: {reason}")
            continue
        sizes = [s for s in args.sizes if s in family.sizes] if args.sizes else list(family.default_sizes)
        for size in args.sizes or []:
            if size not in family.sizes:
                print(f"\n-- {family_name} has no size {size!r} (known: {', '.join(family.sizes)})")
        lengths = args.seq_lens if family.kind == "causal-lm" else args.image_sizes
        for size in sizes:
            for length in lengths:
                results["cases"].append(benchmark_case(family, size, length, args, device, dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    wrote_plot = plot(results, args.out / "results.png")
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {args.out / 'results.png'}" if wrote_plot else ""))
    failures = [f"{_case_label(case)}: {failure}" for case in results["cases"] for failure in case["failures"]]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
