"""Fine-tune a MUDD causal LM with transformers' `Trainer`: `mudd-finetune` (or `python -m modeling_muddpythia.finetune`).

The model folder holds one of our models (saved with `save_pretrained`) or, with `--muddify`, a plain model
(GPT-NeoX/Pythia or Llama) that is turned into the equivalent MUDD model (identity dense connections) before
training. The data are local files: `.txt` (one example per non-empty line) or `.jsonl` / `.json` (JSON lines;
the text is in `--text-field`). Each example is tokenized, closed with the EOS token, truncated to `--max-length`
and padded per batch; padded positions are left out of the loss.

`--lora` trains LoRA adapters (peft) on the attention and FFN projections; the dense connections, 0.2% of the
parameters and the part a muddified model has to learn from scratch, stay fully trainable (`--lora-freeze-dense`
freezes them). Multi-process data parallel: start the same command with `torchrun --nproc_per_node N -m
modeling_muddpythia.finetune ...` or `accelerate launch --multi_gpu --num_processes N -m
modeling_muddpythia.finetune ...`; on GPUs `--fsdp` shards the model (FSDP2), one unit per `_no_split_modules`
class.

Reliability: `--output` may not be, contain or lie inside the model or tokenizer folder; the model must load with
all weights present and finite; a non-finite loss or weight stops training (`NonFiniteError`); every checkpoint
gets a checksum manifest (`mudd_checkpoint.json`) and is verified before resuming (auto-resume skips partial or
damaged ones, saying so); the final model is staged in `--output/.final.partial` and moved in by rename, weights
last. Command-line errors are one line naming the path and the cause (exit code 1). The argument parser lives in
`modeling_muddpythia.cli_finetune` (no torch import before parsing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments,
)
from transformers.utils import is_torch_bf16_gpu_available

from modeling_muddpythia.cli_finetune import LORA_TARGET_MODULES, MUDDIFIABLE, build_parser  # noqa: F401  (public names)

from .convert_io import open_safetensors, write_failure_message
from .modeling_mudd_decoder import MUDDDecoderForCausalLM
from .mudd import MUDDDenseConnections
from .muddify import muddify
from .safe_output import describe_os_error, display, fsync_path, fsync_tree, same_or_nested


TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
TRAIN_EXTRA_HINT = (
    "mudd-finetune needs the `train` extra: pip install -e '.[train]' in this package's clone (peft, datasets, pillow)"
)
# Written into every checkpoint after Trainer has saved it: file sizes and SHA-256 sums (see `checkpoint_problem`).
CHECKPOINT_MANIFEST = "mudd_checkpoint.json"
FINAL_STAGING = ".final.partial"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class FinetuneError(ValueError):
    """A problem with the command line, a path, the data or a checkpoint; the message is one line for the user."""


class NonFiniteError(FinetuneError):
    """The loss or a weight became NaN or infinite during training."""


@dataclass
class CausalLMPaddingCollator:
    """Right-pads `{"input_ids": [...]}` examples to the longest one and adds `labels`.

    Returns `input_ids`, `attention_mask` and `labels`, each `[batch, longest]`; `labels` are the input ids with the
    padded positions set to -100 (the model shifts them). Padding is recognised by position, not by
    `pad_token_id`, so an EOS token that doubles as the pad token (Pythia's `<|endoftext|>`) is still learned,
    which `DataCollatorForLanguageModeling(mlm=False)` would mask out.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(example["input_ids"]) for example in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _data_lines(path: Path):
    """(line number, text) of a UTF-8 file; a byte-order mark at the start is dropped; a line that is not UTF-8 is
    an error naming the file, the line and the byte."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise FinetuneError(describe_os_error(error, path, "read it")) from None
    with handle:
        try:
            for line_no, raw in enumerate(handle, 1):
                if line_no == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise FinetuneError(
                        f"{display(path)} line {line_no}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte "
                        f"{error.start + 1} of the line); save the file as UTF-8"
                    ) from None
        except OSError as error:
            raise FinetuneError(describe_os_error(error, path, "read it")) from None


def check_data_files(paths: Sequence[str | Path]) -> None:
    for path in map(Path, paths):
        if not path.exists():
            raise FinetuneError(f"--data {display(path)}: no such file")
        if path.is_dir():
            raise FinetuneError(f"--data {display(path)}: is a folder; give the data files themselves")
        if path.suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
            raise FinetuneError(f"{display(path)}: unsupported data file type {path.suffix!r} (use .txt, .jsonl or .json)")


def read_texts(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """The examples of local `.txt` files (one per non-empty line) and `.jsonl`/`.json` files (JSON lines, one object
    per line with the text in `text_field`), read as UTF-8 (a leading byte-order mark is dropped). Raises
    `FinetuneError` (a `ValueError`) naming the file, and the line of a bad record or of bytes that are not UTF-8."""
    check_data_files(paths)
    texts = []
    for path in map(Path, paths):
        for line_no, line in _data_lines(path):
            if not line.strip():
                continue
            if path.suffix in TEXT_SUFFIXES:
                texts.append(line.rstrip("\r\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FinetuneError(f"{display(path)} line {line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise FinetuneError(f"{display(path)} line {line_no}: expected an object with a string field {text_field!r}")
            texts.append(record[text_field])
    if not texts:
        raise FinetuneError(f"no examples in {[display(p) for p in paths]}")
    return texts


def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int):
    """A `datasets.Dataset` with one `input_ids` list per text: the tokens, then EOS (when the tokenizer has one and
    did not add it), truncated to `max_length` tokens."""
    try:
        from datasets import Dataset
    except ImportError as error:
        raise ImportError(TRAIN_EXTRA_HINT) from error
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    examples = []
    for ids in encoded:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if len(ids) > 1:  # a lone token has nothing to predict
            examples.append(ids[:max_length])
    if not examples:
        raise FinetuneError("every example tokenized to fewer than two tokens")
    return Dataset.from_dict({"input_ids": examples})


def check_model_folder(path: str | Path, what: str = "model folder") -> Path:
    """`path` as a local transformers folder with a readable config.json, or `FinetuneError` saying what it is."""
    folder = Path(path)
    if not folder.exists():
        raise FinetuneError(f"{display(folder)}: no such {what} (mudd-finetune reads local folders only, no Hub ids)")
    if not folder.is_dir():
        raise FinetuneError(f"{display(folder)}: is a file, not a {what} (give the folder that holds config.json)")
    config = folder / "config.json"
    if not config.is_file():
        raise FinetuneError(f"{display(folder)}: no config.json, so not a transformers {what}")
    try:
        json.loads(config.read_bytes().decode("utf-8-sig"))
    except OSError as error:
        raise FinetuneError(describe_os_error(error, config, "read it")) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FinetuneError(f"{display(config)}: not valid JSON ({error})") from None
    return folder


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the local folder `path`; a missing pad token becomes the EOS token (padding is masked
    by position)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FinetuneError(f"{display(folder)}: no such tokenizer folder" if not folder.exists()
                            else f"{display(folder)}: is a file, not a tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())
        raise FinetuneError(f"{display(folder)}: cannot load a tokenizer from it ({message[:300]})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FinetuneError(f"the tokenizer in {display(folder)} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _nonfinite_weights(tensors) -> list[str]:
    return [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in tensors
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_model(path: str | Path, muddify_plain: bool = False, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a MUDD causal LM in float32 (mixed precision keeps float32 master weights); with `muddify_plain`, load
    a plain model and return its MUDD equivalent. Refuses (`FinetuneError`) a folder whose weights miss tensors the
    model needs (they would train from random values) or hold non-finite values."""
    folder = check_model_folder(path)
    kwargs = {"dtype": torch.float32, "local_files_only": True, "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        message = " ".join(str(error).split())
        raise FinetuneError(f"{display(folder)}: cannot load the model ({type(error).__name__}: {message[:400]})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(item[0]) if isinstance(item, tuple) else str(item) for item in info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = missing + mismatched
        raise FinetuneError(
            f"{display(folder)}: the saved weights lack {len(names)} tensors the model needs (e.g. {names[:3]}); "
            "training would start them from random values"
        )
    nonfinite = _nonfinite_weights(model.state_dict().items())
    if nonfinite:
        raise FinetuneError(f"{display(folder)}: non-finite weights (NaN or inf) in {nonfinite[:3]}; the model is damaged")
    if muddify_plain:
        if isinstance(model, MUDDDecoderForCausalLM):
            raise FinetuneError(f"{display(folder)} already holds a MUDD model ({type(model).__name__}); drop --muddify")
        if type(model).__name__ not in ("GPTNeoXForCausalLM", "LlamaForCausalLM"):
            raise FinetuneError(f"{display(folder)} holds a {type(model).__name__}; --muddify converts {list(MUDDIFIABLE)}")
        return muddify(model)
    if not isinstance(model, MUDDDecoderForCausalLM):
        raise FinetuneError(
            f"{display(folder)} holds a {type(model).__name__}, not a MUDD model; --muddify converts {list(MUDDIFIABLE)}"
        )
    return model


def dense_module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the `MUDDDenseConnections` modules in `model` (`["model.dense"]` for our causal LMs)."""
    return [name for name, module in model.named_modules() if isinstance(module, MUDDDenseConnections)]


def lora_config(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    train_dense: bool = True,
):
    """A peft `LoraConfig` for a MUDD causal LM.

    With `train_dense` the dense connections (`proj_in`, `proj_out`, `static_weights` of every layer, about 0.2% of
    the parameters) are trained in full as peft `modules_to_save`: they are saved with the adapter, and LoRA on
    matrices this small would save nothing.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError(TRAIN_EXTRA_HINT) from error
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=dense_module_names(model) if train_dense else None,
    )


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bfloat16 mixed precision runs natively: an accelerator with bf16 support, or a CPU with oneDNN's
    bf16 kernels (elsewhere bf16 on CPU is emulated and slower than float32)."""
    if not use_cpu:
        return is_torch_bf16_gpu_available()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _check_args(args: argparse.Namespace) -> None:
    if (args.merge_lora or args.lora_freeze_dense) and not args.lora:
        raise ValueError("--merge-lora and --lora-freeze-dense need --lora")
    if args.fsdp and args.lora:
        # untested: peft keeps two copies of the dense connections (`modules_to_save`), which FSDP would shard
        raise ValueError("--fsdp with --lora is not supported; train LoRA data parallel (without --fsdp)")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {args.max_length}")


def check_paths(args: argparse.Namespace) -> None:
    """Model, tokenizer and data exist; `--output` is not, does not contain and does not lie inside the model or
    tokenizer folder, and can be created and written (a read-only or file parent fails here, before training)."""
    check_model_folder(args.model)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        load_tokenizer(args.tokenizer)  # raises the right message
    check_data_files(args.data)
    output = Path(args.output)
    for what, path in (("the model folder", args.model), ("the tokenizer folder", args.tokenizer)):
        if path is not None and same_or_nested(output, Path(path)):
            raise FinetuneError(
                f"--output {display(output)} is, contains or lies inside {what} {display(path)}; saving there would "
                "overwrite or mix with it: choose another folder"
            )
    for ancestor in [output, *output.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise FinetuneError(f"--output {display(output)}: {display(ancestor)} is a file, not a folder")
            break
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".mudd-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise FinetuneError(describe_os_error(error, output, "write to it")) from None


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    """`TrainingArguments` from the command line; bf16 only where supported."""
    use_cpu = args.cpu or not _has_accelerator()
    use_bf16 = args.bf16 and bf16_supported(use_cpu)
    if args.bf16 and not use_bf16:
        print(f"--bf16: this {'CPU' if use_cpu else 'device'} has no native bfloat16 support; training in float32.",
              file=sys.stderr)
    fsdp_kwargs = {}
    if args.fsdp:
        if use_cpu:
            # accelerate turns multi-process CPU runs into DDP and would silently drop the FSDP plugin.
            raise ValueError("--fsdp needs GPUs (or another accelerator): on CPU, Trainer/accelerate run "
                             "multi-process training as plain data parallel; drop --fsdp there")
        # TRANSFORMER_BASED_WRAP without class names: accelerate wraps each class in the model's `_no_split_modules`.
        fsdp_kwargs = {"fsdp": True, "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    return TrainingArguments(
        output_dir=args.output,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        activation_checkpointing=args.gradient_checkpointing,
        bf16=use_bf16,
        use_cpu=use_cpu,
        report_to="none",
        # a NaN/inf loss must stop training (`GuardedTrainer`), not be replaced by the window's mean in the log
        logging_nan_inf_filter=False,
        # every parameter of a MUDD model gets a gradient each step; DDP's extra graph walk would find none unused
        ddp_find_unused_parameters=False,
        **fsdp_kwargs,
    )


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Tokenizer, data, model (optionally LoRA-wrapped) and `Trainer`, ready for `trainer.train()`."""
    _check_args(args)
    check_paths(args)
    training_args = training_arguments(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, muddify_plain=args.muddify, attn_implementation=args.attn_implementation)
    max_length = args.max_length or model.config.max_position_embeddings
    if max_length > model.config.max_position_embeddings:
        raise FinetuneError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    dataset = tokenize_texts(read_texts(args.data, args.text_field), tokenizer, max_length)
    if args.lora:
        from peft import get_peft_model

        base_dir = Path(args.model)
        if args.muddify:
            # The adapter's base, the muddified model, exists nowhere else on disk.
            base_dir = Path(args.output) / "base"
            if training_args.process_index == 0:
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
        config = lora_config(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                             train_dense=not args.lora_freeze_dense)
        model = get_peft_model(model, config)
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
        if training_args.process_index == 0:
            model.print_trainable_parameters()
    return GuardedTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=CausalLMPaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[FiniteWeightsCallback(), ChecksumCallback()],
    )


class GuardedTrainer(Trainer):
    """`Trainer` that stops with `NonFiniteError` as soon as a micro-batch's loss is NaN or infinite (Trainer would
    otherwise log the window's mean and keep stepping, ending with NaN weights)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"the training loss became {float(loss.detach().float().mean())} at step {self.state.global_step + 1}; "
                "stopped before the optimizer step, nothing of this step was saved (lower --learning-rate, use "
                "--warmup-steps, or check the data and the model)"
            )
        return loss


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class FiniteWeightsCallback(TrainerCallback):
    """After every optimizer step (before any checkpoint of it is saved): all trainable weights finite, or
    `NonFiniteError` naming the first bad one."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        params = [(n, _local(p.detach())) for n, p in model.named_parameters() if p.requires_grad]
        flags = torch.stack([torch.isfinite(p).all() for _, p in params]) if params else None
        if flags is not None and not bool(flags.all()):
            name = params[int((~flags).nonzero()[0])][0]
            raise NonFiniteError(
                f"weights became non-finite (NaN or inf) in step {state.global_step}, first in {name}; stopped before "
                "saving them (lower --learning-rate or use --warmup-steps)"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST
                  and not p.name.startswith("."))


def write_checkpoint_manifest(folder: Path) -> None:
    """`folder/mudd_checkpoint.json`: size and SHA-256 of every file of a finished checkpoint (written last, through
    a temporary file and a rename, so its presence means the checkpoint was complete)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _checkpoint_files(folder)}
    temporary = folder / f".{CHECKPOINT_MANIFEST}.tmp"
    temporary.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    fsync_tree(folder)
    os.replace(temporary, folder / CHECKPOINT_MANIFEST)
    fsync_path(folder, directory=True)


class ChecksumCallback(TrainerCallback):
    """Writes the checksum manifest into each checkpoint once Trainer has saved all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_checkpoint_manifest(folder)


def _weights_problem(folder: Path) -> str | None:
    files = sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("adapter_model.safetensors"))
    if not files:
        return "no model weights (model.safetensors)"
    for file in files:
        try:
            with open_safetensors(file) as handle:
                for name in handle.keys():
                    bad = _nonfinite_weights([(name, handle.get_tensor(name))])
                    if bad:
                        return f"{file.name}: non-finite values in {bad[0]} (damaged)"
        except (SafetensorError, OSError) as error:
            return f"{file.name}: not a valid safetensors file ({error})"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete and intact.

    A checkpoint with our manifest is checked file by file against it (sizes and SHA-256): a file that changed or is
    missing makes it damaged. Without one (saved by another tool, or interrupted before the manifest was written),
    its trainer_state.json must parse, its weights must open with safetensors and be finite, and the optimizer state
    must be there."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder" if folder.exists() else "no such folder"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (a partial checkpoint: its save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"trainer_state.json cannot be read ({error})"
    manifest = folder / CHECKPOINT_MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            return f"{CHECKPOINT_MANIFEST} cannot be read ({error})"
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, {expected['size']} were saved (damaged)"
        for name, expected in files.items():
            if _sha256(folder / name) != expected["sha256"]:
                return f"{name} differs from what was saved (SHA-256 mismatch: damaged)"
        return None
    problem = _weights_problem(folder)
    if problem:
        return problem
    if not any(p.name.startswith("optimizer") for p in folder.iterdir()):
        return "no optimizer state (a partial checkpoint)"
    return None


def _say(trainer: Trainer | None, message: str) -> None:
    if trainer is None or trainer.is_world_process_zero():
        print(f"mudd-finetune: {message}", file=sys.stderr, flush=True)


def resolve_checkpoint(resume: str | bool | None, output: str | Path, trainer: Trainer | None = None) -> str | None:
    """The checkpoint folder to resume from: `resume` itself (verified), or with `True` the newest complete one in
    `output`; partial or damaged ones are skipped with a message. Says which one is used."""
    if resume is None or resume is False:
        return None
    if resume is not True:
        problem = checkpoint_problem(resume)
        if problem:
            raise FinetuneError(f"--resume-from-checkpoint {display(resume)}: cannot resume from it: {problem}")
        chosen = Path(resume)
    else:
        output = Path(output)
        candidates = sorted(
            (p for p in output.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()) if output.is_dir() else [],
            key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)), reverse=True,
        )
        if not candidates:
            raise FinetuneError(f"--resume-from-checkpoint: no checkpoint-N folder in {display(output)}")
        chosen = None
        for candidate in candidates:
            problem = checkpoint_problem(candidate)
            if problem is None:
                chosen = candidate
                break
            _say(trainer, f"skipping {display(candidate)}: {problem}")
        if chosen is None:
            raise FinetuneError(f"--resume-from-checkpoint: no complete checkpoint in {display(output)} (see above)")
    _say(trainer, f"resuming from {display(chosen)}")
    return str(chosen)


_WEIGHT_FILE = re.compile(r"^(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _publish_into(staging: Path, output: Path) -> None:
    """Move everything from `staging` into `output` by rename (each file appears whole): folders and other files
    first, weight shards next, weight indexes and single weight files last; weight files of an earlier save that
    the new one does not have are removed afterwards."""
    fsync_tree(staging)
    entries = list(staging.iterdir())

    def rank(path: Path) -> int:
        if not _WEIGHT_FILE.match(path.name):
            return 0
        return 1 if "-of-" in path.name else 2

    for entry in sorted(entries, key=rank):
        target = output / entry.name
        if entry.is_dir():
            if target.is_dir():
                old = output / f".{entry.name}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(entry, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, target)
        else:
            os.replace(entry, target)
    new = {entry.name for entry in entries}
    for stale in output.iterdir():
        if stale.is_file() and _WEIGHT_FILE.match(stale.name) and stale.name not in new:
            stale.unlink()
    fsync_path(output, directory=True)
    shutil.rmtree(staging, ignore_errors=True)


def save_result(trainer: Trainer, args: argparse.Namespace) -> None:
    """Save the trained model (or LoRA adapter), the tokenizer and trainer_state.json to `args.output`, loadable
    with `from_pretrained`.

    Everything is written into `output/.final.partial` first and then moved into `output` by rename, weights last,
    so an interrupted save never leaves a torn file in `output`. A LoRA adapter records its base folder as an
    absolute path (with `--muddify`: `output/base`, written before training). With `--merge-lora` the merged model
    goes to `output` and the adapter to `output/adapter`.
    """
    output = Path(args.output)
    staging = output / FINAL_STAGING
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    if not args.lora:
        trainer.save_model(str(staging))  # every rank takes part (FSDP gathers); process zero writes
    if trainer.is_world_process_zero():
        if args.lora:
            peft_model = trainer.model
            adapter_dir = staging / "adapter" if args.merge_lora else staging
            peft_model.save_pretrained(adapter_dir)
            trainer.processing_class.save_pretrained(adapter_dir)
            if args.merge_lora:
                peft_model.merge_and_unload().save_pretrained(staging)
                trainer.processing_class.save_pretrained(staging)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        _publish_into(staging, output)


def run(args: argparse.Namespace) -> int:
    """Run the parsed `mudd-finetune` command line; returns the exit code (errors: one line on stderr, 1)."""
    try:
        trainer = build_trainer(args)
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output, trainer)
        trainer.train(resume_from_checkpoint=checkpoint)
        save_result(trainer, args)
    except (FinetuneError, ValueError) as error:
        print(f"mudd-finetune: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"mudd-finetune: error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except (SafetensorError, RuntimeError) as error:
        message = write_failure_message(error, args.output)
        if message is None:
            raise
        print(f"mudd-finetune: error: {message}", file=sys.stderr)
        return 1
    except ImportError as error:
        print(f"mudd-finetune: error: {error}", file=sys.stderr)
        return 1
    if trainer.is_world_process_zero():
        print(f"Saved to {display(args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
