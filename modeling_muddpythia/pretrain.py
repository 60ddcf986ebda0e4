"""Pretrain a MUDD causal LM from random initialisation: `mudd-pretrain` (or `python -m modeling_muddpythia.pretrain`).

The model comes from a preset of `configuration/` (or a config.json) and starts as the paper's: every dense
connection at the plain residual (`W2 = 0`, static weights one-hot on the newest state, `mudd.init_dense_connection_`),
everything else from `initializer_range`. The corpus is read with `datasets` (txt, jsonl/json, parquet, arrow; in
memory or `--streaming`), tokenized, each document closed with the end-of-text token, and packed into blocks of
`--block-size` tokens (`pack_blocks`): no padding, documents continue across blocks, only the final partial block is
left out. The first `--eval-blocks` blocks are held out.

Training blocks are served by `BlockStream` in an order fixed by `--seed` (in memory: a seeded permutation per pass;
streaming: a seeded shuffle buffer). Every checkpoint records the data position (`mudd_data_state.json`: blocks
served, block size, seed, a fingerprint of the data files), and a resumed run starts the stream exactly there, so
it repeats the losses and weights of an uninterrupted run.

The engine is the one of `mudd-finetune` (`training.py`): output claim and ownership, Trainer setup, non-finite
guards, checksummed checkpoints, verification before resume, the final model published in one rename (into
`--output` itself). `--plain-twin` trains the plain transformers model of the same shape (`plain_twin_config`) on the
same token stream into `--output/plain-twin` and writes `report.md` / `report.png` (`write_report`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, default_data_collator

from .convert_plans import _PLAIN_CONFIG_FIELDS
from .safe_output import display
from .train_options import parse_pretrain_args
from .train_tiny import forward_flops_per_token as flops_per_token_at
from .training import (
    DATA_STATE, ChecksumCallback, FiniteWeightsCallback, GuardedTrainer, OwnedOutput, TrainingError, check_data_files,
    check_tokenizer_fits, line_documents, load_tokenizer, resolve_checkpoint, run_command, say, train,
    training_arguments,
)


TOOL = "mudd-pretrain"
PRESET_DIR = Path(__file__).resolve().parent.parent / "configuration"
# --data suffix -> the `datasets` builder that reads it
DATA_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TWIN_FOLDER = "plain-twin"
# Dense bf16 peak FLOP/s of common accelerators (vendor data sheets), matched against the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "MI300X": 1307e12}
_TOKENIZE_BATCH = 256


# --------------------------------------------------------------------------------------------------- config


def load_config(spec: str):
    """The MUDD config of a preset name (`configuration/NAME.json`) or of a config.json path."""
    path = Path(spec)
    if not path.is_file():
        path = PRESET_DIR / f"{spec}.json"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json")) if PRESET_DIR.is_dir() else []
        raise TrainingError(f"--config {spec}: neither a file nor a preset ({', '.join(presets) or 'none found'})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingError(f"--config {display(path)}: cannot be read as JSON ({error})") from None
    model_type = values.pop("model_type", None) if isinstance(values, dict) else None
    if model_type not in ("muddpythia", "muddformer"):
        raise TrainingError(f"--config {display(path)}: model_type {model_type!r} is not a MUDD causal LM "
                            "(muddpythia or muddformer)")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as error:
        raise TrainingError(f"--config {display(path)}: {error}") from None


def initial_model(config, seed: int):
    """The model of `config`, randomly initialised from `seed` by the model's `_init_weights` (dense connections at
    the plain residual)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def plain_twin_config(config):
    """The plain transformers config of the same shape: GPT-NeoX for MUDDPythia, Llama for MUDDFormer (the fields
    `muddify` maps the other way; qk-norm, FFN re-allocation and the dense connections have no plain counterpart)."""
    shared = {name: getattr(config, name) for name in _PLAIN_CONFIG_FIELDS}
    rope = dict(config.rope_parameters)
    if config.model_type == "muddpythia":
        return GPTNeoXConfig(**shared, rope_parameters=rope, layer_norm_eps=config.layer_norm_eps,
                             use_parallel_residual=config.use_parallel_residual)
    return LlamaConfig(**shared, rope_parameters=rope, rms_norm_eps=config.rms_norm_eps, mlp_bias=config.mlp_bias,
                       num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim)


def forward_flops_per_token(model, block_size: int) -> float:
    """Forward FLOPs per token at `block_size` (matmuls and attention, counted by torch's FlopCounterMode).

    Per token, the count is `a + b * T` at sequence length `T` (attention grows with `T`, the rest does not), so two
    counts at 8 and 16 tokens give it exactly at `block_size` without running a forward pass of that length."""
    short, long = flops_per_token_at(model, 8), flops_per_token_at(model, 16)
    return short + (long - short) * (block_size - 8) / 8


# --------------------------------------------------------------------------------------------------- data


def _check_text(text, where: str, text_field: str, max_document_bytes: int) -> str:
    if not isinstance(text, str):
        raise TrainingError(f"--data {where}: expected a string field {text_field!r}, got {type(text).__name__}")
    if len(text) > max_document_bytes and len(text.encode("utf-8")) > max_document_bytes:
        raise TrainingError(f"--data {where}: a document longer than --max-document-bytes ({max_document_bytes} bytes)")
    return text


def _line_rows(paths: Sequence[str], text_field: str, max_document_bytes: int) -> Iterator[dict]:
    for text in line_documents(paths, text_field, max_document_bytes):
        yield {"text": text}


def load_documents(paths: Sequence[str], text_field: str = "text", streaming: bool = False,
                   max_document_bytes: int = 16 << 20):
    """The corpus as a `datasets` dataset with one document per row in a `text` column: an in-memory `Dataset`, or
    with `streaming` an `IterableDataset` that reads the files as it goes. txt and jsonl/json are read line by line
    with a bound (`training.bounded_lines`); parquet and arrow by `datasets`' own builders."""
    check_data_files(paths, tuple(DATA_BUILDERS))
    builders = {DATA_BUILDERS[Path(p).suffix] for p in paths}
    if len(builders) > 1:
        raise TrainingError(f"--data: mixes file kinds ({', '.join(sorted(builders))}); give files of one kind")
    try:
        import datasets
    except ImportError as error:
        raise ImportError("mudd-pretrain needs the `train` extra: pip install -e '.[train]' in this package's clone") from error
    builder = builders.pop()
    files = [str(p) for p in paths]
    with tempfile.TemporaryDirectory(prefix="mudd-pretrain-") as cache:
        if builder in ("text", "json"):
            kwargs = {"paths": files, "text_field": text_field, "max_document_bytes": max_document_bytes}
            if streaming:
                return datasets.IterableDataset.from_generator(_line_rows, gen_kwargs=kwargs)
            return datasets.Dataset.from_generator(_line_rows, gen_kwargs=kwargs, cache_dir=cache, keep_in_memory=True)
        dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming,
                                        cache_dir=cache, **({} if streaming else {"keep_in_memory": True}))
        if text_field not in dataset.column_names:
            raise TrainingError(f"--text-field {text_field!r}: no such column in the --data files "
                                f"(columns: {', '.join(dataset.column_names)})")
        return dataset.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" \
            else dataset.select_columns(["text"])


def document_texts(documents, max_document_bytes: int, text_field: str = "text") -> Iterator[str]:
    for index, row in enumerate(documents):
        yield _check_text(row["text"], f"document {index + 1}", text_field, max_document_bytes)


def token_documents(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """The token ids of each document (no special tokens added: the packer adds the end-of-text token)."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, _TOKENIZE_BATCH)):
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


class Packer:
    """Packs token documents into blocks of `block_size`: each document followed by `eos`, concatenated, cut every
    `block_size` tokens. After iteration `documents` and `tokens` count what was read and `leftover` the tokens of
    the final partial block (left out)."""

    def __init__(self, block_size: int, eos: int):
        self.block_size, self.eos = block_size, eos
        self.documents = self.tokens = self.leftover = 0

    def __call__(self, documents: Iterable[list[int]]) -> Iterator[list[int]]:
        buffer: list[int] = []
        for ids in documents:
            buffer.extend(ids)
            buffer.append(self.eos)
            self.documents += 1
            self.tokens += len(ids) + 1
            start = 0
            while len(buffer) - start >= self.block_size:
                yield buffer[start:start + self.block_size]
                start += self.block_size
            del buffer[:start]
        self.leftover = len(buffer)


def pack_blocks(documents, tokenizer, block_size: int, max_document_bytes: int = 16 << 20,
                packer: Packer | None = None) -> Iterator[list[int]]:
    """The packed blocks of a `load_documents` dataset, in corpus order (`packer` keeps the counts)."""
    packer = packer or Packer(block_size, tokenizer.eos_token_id)
    return packer(token_documents(document_texts(documents, max_document_bytes), tokenizer))


class BlockStream(torch.utils.data.IterableDataset):
    """The training blocks as `{"input_ids", "labels"}` examples (labels = the ids; the model shifts them), endless,
    starting at block `start` of the seeded order.

    In memory (`blocks`, a `[N, block_size]` tensor) pass `p` serves a permutation of all blocks drawn from
    `seed + p`; streaming (`make_stream`, a function returning a fresh iterator of the training blocks) pass `p`
    reads the corpus again through a shuffle buffer of `shuffle_buffer` blocks seeded with `seed + p`.
    """

    def __init__(self, seed: int, blocks: torch.Tensor | None = None,
                 make_stream: Callable[[], Iterator[list[int]]] | None = None, shuffle_buffer: int = 0):
        self.seed, self.blocks, self.make_stream, self.shuffle_buffer = seed, blocks, make_stream, shuffle_buffer
        self.start = 0

    def _pass(self, index: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + index)
        if self.blocks is not None:
            for row in torch.randperm(len(self.blocks), generator=generator).tolist():
                yield self.blocks[row]
            return
        buffer: list[list[int]] = []
        served = False
        for block in self.make_stream():
            if self.shuffle_buffer == 0:
                served = True
                yield torch.tensor(block)
                continue
            buffer.append(block)
            if len(buffer) > self.shuffle_buffer:
                served = True
                yield torch.tensor(buffer.pop(int(torch.randint(len(buffer), (1,), generator=generator))))
        while buffer:
            served = True
            yield torch.tensor(buffer.pop(int(torch.randint(len(buffer), (1,), generator=generator))))
        if not served:
            raise TrainingError("--data: no training blocks (the corpus is shorter than --eval-blocks + 1 blocks)")

    def blocks_in_order(self) -> Iterator[torch.Tensor]:
        return itertools.chain.from_iterable(self._pass(index) for index in itertools.count())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for block in itertools.islice(self.blocks_in_order(), self.start, None):
            yield {"input_ids": block, "labels": block}


def data_fingerprint(paths: Sequence[str]) -> list[dict]:
    """Names, sizes and the SHA-256 of the first MiB of each data file: enough to notice other data on resume
    without reading a large corpus again."""
    result = []
    for path in map(Path, paths):
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
        result.append({"name": path.name, "size": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()})
    return result


# --------------------------------------------------------------------------------------------------- training


class PretrainTrainer(GuardedTrainer):
    """Adds tokens seen, training FLOPs, tokens/s and model FLOPs utilisation to every log entry."""

    def __init__(self, *args, tokens_per_step: int, train_flops_per_token: float, peak_flops: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_per_step, self.train_flops_per_token = tokens_per_step, train_flops_per_token
        self.peak_flops = peak_flops
        self._last = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            tokens = step * self.tokens_per_step
            logs["tokens"] = tokens
            logs["train_flops"] = tokens * self.train_flops_per_token
            if self._last is not None and step > self._last[1]:
                rate = (step - self._last[1]) * self.tokens_per_step / (now - self._last[0])
                logs["tokens_per_second"] = round(rate, 1)
                if self.peak_flops:
                    logs["mfu"] = round(rate * self.train_flops_per_token / (self.peak_flops * self.args.world_size), 4)
            self._last = (now, step)
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._last is None:
            self._last = (time.perf_counter(), self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.cpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


class DataPlan:
    """Everything about the data of one run: the held-out blocks, the training stream and the data state."""

    def __init__(self, args: argparse.Namespace, tokenizer, block_size: int):
        self.args, self.tokenizer, self.block_size = args, tokenizer, block_size
        self.fingerprint = data_fingerprint(args.data)
        documents = load_documents(args.data, args.text_field, args.streaming, args.max_document_bytes)
        packer = Packer(block_size, tokenizer.eos_token_id)
        blocks = pack_blocks(documents, tokenizer, block_size, args.max_document_bytes, packer)
        self.heldout = torch.tensor(list(itertools.islice(blocks, args.eval_blocks)), dtype=torch.long).reshape(
            -1, block_size)
        if len(self.heldout) < args.eval_blocks:
            raise TrainingError(f"--eval-blocks {args.eval_blocks}: the corpus has only {len(self.heldout)} blocks "
                                f"of --block-size {block_size}")
        if args.streaming:
            def make_stream() -> Iterator[list[int]]:
                stream = pack_blocks(documents, tokenizer, block_size, args.max_document_bytes)
                return itertools.islice(stream, args.eval_blocks, None)

            self.stream = BlockStream(args.seed, make_stream=make_stream, shuffle_buffer=args.shuffle_buffer)
        else:
            train = torch.tensor(list(blocks), dtype=torch.long).reshape(-1, block_size)
            if len(train) == 0:
                raise TrainingError("--data: no training blocks (the corpus is shorter than --eval-blocks + 1 blocks)")
            self.stream = BlockStream(args.seed, blocks=train)
            say(TOOL, f"corpus: {packer.documents} documents, {packer.tokens} tokens: {len(train)} training and "
                f"{len(self.heldout)} held-out blocks of {block_size} tokens; the last {packer.leftover} tokens (less "
                "than a block) are left out")

    def blocks_per_step(self, world_size: int) -> int:
        return self.args.batch_size * self.args.gradient_accumulation_steps * world_size

    def state(self, global_step: int, world_size: int) -> dict:
        return {"format": 1, "blocks_served": global_step * self.blocks_per_step(world_size),
                "blocks_per_step": self.blocks_per_step(world_size), "block_size": self.block_size,
                "seed": self.args.seed, "eval_blocks": self.args.eval_blocks, "streaming": self.args.streaming,
                "shuffle_buffer": self.args.shuffle_buffer if self.args.streaming else None,
                "files": self.fingerprint}

    def resume_at(self, checkpoint: str, world_size: int) -> None:
        """Start the stream at the checkpoint's data position, after checking that the data and the way they are
        served are the same."""
        path = Path(checkpoint) / DATA_STATE
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            step = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as error:
            raise TrainingError(f"--resume-from-checkpoint {display(checkpoint)}: no readable data position "
                                f"({DATA_STATE}: {error}); not a mudd-pretrain checkpoint") from None
        expected = self.state(step, world_size)
        options = {"block_size": "--block-size", "seed": "--seed", "eval_blocks": "--eval-blocks",
                   "streaming": "--streaming", "shuffle_buffer": "--shuffle-buffer", "files": "--data",
                   "blocks_per_step": "--batch-size x --gradient-accumulation-steps x processes"}
        for key, option in options.items():
            if saved.get(key) != expected[key]:
                raise TrainingError(f"--resume-from-checkpoint {display(checkpoint)}: {option} differs from the run "
                                    f"that saved it ({saved.get(key)!r} there, {expected[key]!r} now); resuming "
                                    "would serve other blocks")
        self.stream.start = saved["blocks_served"]


def _data_state_writer(plan: DataPlan, world_size: int):
    def write(folder: Path, state) -> None:
        (folder / DATA_STATE).write_text(json.dumps(plan.state(state.global_step, world_size), indent=1) + "\n")
    return write


def build_trainer(args: argparse.Namespace, model, plan: DataPlan, tokenizer, output_dir: str | Path,
                  max_steps: int) -> PretrainTrainer:
    """A `PretrainTrainer` over `plan`'s block stream for `model`, checkpointing into `output_dir` (and with
    `--report-to tensorboard` logging into `output_dir/runs/`)."""
    overrides = dict(output_dir=str(output_dir), max_steps=max_steps, ignore_data_skip=True,
                     dataloader_drop_last=True, include_num_input_tokens_seen="no",
                     report_to=[args.report_to] if args.report_to != "none" else "none")
    training_args = training_arguments(args, **overrides)
    flops = 3 * forward_flops_per_token(model, plan.block_size)  # forward + backward
    if args.compile:
        model.compile(fullgraph=True, backend=args.compile_backend)
    world = training_args.world_size
    return PretrainTrainer(
        model=model, args=training_args, train_dataset=plan.stream, data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[FiniteWeightsCallback(), ChecksumCallback([_data_state_writer(plan, world)])],
        tokens_per_step=plan.blocks_per_step(world) * plan.block_size, train_flops_per_token=flops,
        peak_flops=peak_flops(args),
    )


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int) -> float | None:
    """Mean next-token loss over the held-out blocks (all blocks have the same number of targets); None without
    held-out blocks (`--eval-blocks 0`)."""
    if len(blocks) == 0:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return total / len(blocks)


def twin_steps(args: argparse.Namespace, mudd_flops_per_token: float, twin, block_size: int) -> int:
    """The twin's steps: the MUDD run's, or with `--twin-budget flops` as many as spend its training FLOPs."""
    if args.twin_budget == "steps":
        return args.max_steps
    return max(1, round(args.max_steps * mudd_flops_per_token / (3 * forward_flops_per_token(twin, block_size))))


def train_one(args, model, plan, tokenizer, output_dir: Path, max_steps: int, resume: bool | str | None):
    trainer = build_trainer(args, model, plan, tokenizer, output_dir, max_steps)
    checkpoint = resolve_checkpoint(resume, output_dir, TOOL, model=model) if resume else None
    if checkpoint:
        plan.resume_at(checkpoint, trainer.args.world_size)
    else:
        plan.stream.start = 0
    train(trainer, checkpoint, TOOL)
    return trainer


def write_report(folder: Path, runs: dict[str, dict]) -> None:
    """`report.md` (held-out loss table) and `report.png` (training loss against tokens and against FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        points = [entry for entry in run["log"] if "loss" in entry and "tokens" in entry]
        by_tokens.plot([p["tokens"] for p in points], [p["loss"] for p in points], label=name)
        by_flops.plot([p["train_flops"] for p in points], [p["loss"] for p in points], label=name)
    by_tokens.set_xlabel("tokens")
    by_flops.set_xlabel("training FLOPs (3 x forward, FlopCounterMode)")
    for axis in (by_tokens, by_flops):
        axis.set_ylabel("training loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "report.png", dpi=100)
    plt.close(figure)
    lines = ["# Pretraining report", "", "![training loss](report.png)", "",
             "| model | steps | tokens | training FLOPs | final training loss | held-out loss |",
             "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        heldout = "none (--eval-blocks 0)" if run["heldout_loss"] is None else f"{run['heldout_loss']:.4f}"
        lines.append(f"| {name} | {run['steps']} | {run['tokens']} | {run['train_flops']:.3g} | "
                     f"{run['final_loss']:.4f} | {heldout} |")
    lines += ["", f"Held-out loss: mean next-token loss on the first {runs['MUDD']['heldout_blocks']} blocks of the "
              "corpus, which neither model trained on."]
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def _summary(trainer, heldout: torch.Tensor, batch_size: int) -> dict:
    log = trainer.state.log_history
    losses = [entry["loss"] for entry in log if "loss" in entry]
    tokens = trainer.state.global_step * trainer.tokens_per_step
    return {"log": log, "steps": trainer.state.global_step, "tokens": tokens,
            "train_flops": tokens * trainer.train_flops_per_token, "final_loss": losses[-1] if losses else float("nan"),
            "heldout_loss": heldout_loss(trainer.model, heldout, batch_size), "heldout_blocks": len(heldout)}


def run(args: argparse.Namespace) -> int:
    """Run the parsed and checked `mudd-pretrain` command line; returns the exit code (errors: one line, 1)."""

    def body() -> None:
        config = load_config(args.config)
        block_size = args.block_size or config.max_position_embeddings
        if block_size > config.max_position_embeddings:
            raise TrainingError(f"--block-size {block_size} exceeds the config's max_position_embeddings "
                                f"({config.max_position_embeddings})")
        tokenizer = load_tokenizer(args.tokenizer)
        check_tokenizer_fits(tokenizer, config.vocab_size)
        if tokenizer.eos_token_id is None:
            raise TrainingError(f"--tokenizer {display(args.tokenizer)}: has no end-of-text (EOS) token to put between "
                                "documents")
        if args.attn_implementation:
            config._attn_implementation = args.attn_implementation
        check_data_files(args.data, tuple(DATA_BUILDERS))
        with OwnedOutput(args.output, TOOL, force=args.force, inputs=[("the tokenizer folder", args.tokenizer)],
                         resume=args.resume_from_checkpoint is not None) as owned:
            plan = DataPlan(args, tokenizer, block_size)
            model = initial_model(config, args.seed)
            trainer = train_one(args, model, plan, tokenizer, Path(args.output), args.max_steps,
                                args.resume_from_checkpoint)
            main_process = trainer.is_world_process_zero()
            if main_process:
                owned.prepare_staging()
            trainer.save_model(str(owned.staging))  # every rank takes part (FSDP gathers); process zero writes
            runs = {"MUDD": _summary(trainer, plan.heldout, args.batch_size) if main_process else None}
            if args.plain_twin:
                twin_config = plain_twin_config(config)
                if args.attn_implementation:
                    twin_config._attn_implementation = args.attn_implementation
                twin_model = initial_model(twin_config, args.seed)
                steps = twin_steps(args, trainer.train_flops_per_token, twin_model, block_size)
                twin_dir = owned.staging / TWIN_FOLDER
                say(TOOL, f"training the plain twin ({type(twin_config).__name__}, {steps} steps, --twin-budget "
                    f"{args.twin_budget}); it is not checkpointed apart from the MUDD run")
                twin = train_one(args, twin_model, plan, tokenizer, twin_dir, steps, None)
                twin.save_model(str(twin_dir))
                if main_process:
                    twin.state.save_to_json(str(twin_dir / "trainer_state.json"))
                    for checkpoint in twin_dir.glob("checkpoint-*"):
                        shutil.rmtree(checkpoint)  # the twin restarts with its run; its checkpoints serve nothing
                    name = f"plain twin ({type(twin_config).__name__.removesuffix('Config')})"
                    runs[name] = _summary(twin, plan.heldout, args.batch_size)
            if not main_process:
                return
            trainer.state.save_to_json(str(owned.staging / "trainer_state.json"))
            if args.plain_twin:
                write_report(owned.staging, runs)
            (owned.staging / "heldout_loss.json").write_text(json.dumps(
                {name: run["heldout_loss"] for name, run in runs.items()}, indent=1) + "\n")
            owned.publish_final()
            print(f"Saved to {display(args.output)}")

    return run_command(TOOL, args.output, body)


def main(argv: list[str] | None = None) -> int:
    return run(parse_pretrain_args(argv))


if __name__ == "__main__":
    sys.exit(main())
