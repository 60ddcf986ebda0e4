"""The training engine `mudd-finetune` and `mudd-pretrain` share: output ownership, bounded data reading, Trainer
setup, non-finite guards, checksummed checkpoints, checkpoint verification and resume, and the final save.

Output ownership (`OwnedOutput`, built on `safe_output`):

* the output is claimed (`safe_output.Claim`) for the whole run: a second run on it fails at once, naming the
  holder's pid;
* a folder that holds something a run of the same command did not write (no `safe_output.OWNER_MARKER` naming it)
  is refused unless `--force`; a previous run's own output is accepted, so that it resumes;
* the final model is written into the staging folder `.NAME.partial-final` beside the output (leftovers of a
  killed run, recognised by `safe_output`'s claim marker, are removed first), this run's folders
  (checkpoints, ...) are moved into it by rename, and it replaces the output in one rename (`safe_output.publish`):
  the output is never a mix of two models nor a partial one;
* a failed run removes what it created: a new output folder without a finished checkpoint, the staging folder; in a
  folder taken with `--force` everything this run added. Checkpoints of finished steps in its own output stay, for
  `--resume-from-checkpoint`.

Checkpoints get a checksum manifest (`mudd_checkpoint.json`, written last) and are verified before resuming; a
checkpoint of another model (other shapes or config) is refused before Trainer loads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from .convert_io import open_safetensors, write_failure_message
from .safe_output import (
    OWNER_MARKER, Claim, OutputError, describe_os_error, display, fsync_path, fsync_tree, make_staging, mark_owner,
    owner, publish, remove_stale, same_or_nested, staging_path,
)


# Written into every checkpoint after Trainer has saved it: file sizes and SHA-256 sums (see `checkpoint_problem`).
CHECKPOINT_MANIFEST = "mudd_checkpoint.json"
# mudd-pretrain's data position, saved in each of its checkpoints.
DATA_STATE = "mudd_data_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# The staging folder's suffix is fixed, so that every process of a multi-process run knows its path.
_STAGING_SUFFIX = "final"
# Config fields that make two models' weights incompatible (compared before resuming from a checkpoint).
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "dense_streams", "dynamic_dense")


class TrainingError(ValueError):
    """A problem with the command line, a path, the data or a checkpoint; the message is one line for the user."""


class NonFiniteError(TrainingError):
    """The loss or a weight became NaN or infinite during training."""


def is_main_process() -> bool:
    """Whether this is global rank 0 (torchrun and accelerate launch set RANK); decided before Trainer exists."""
    return int(os.environ.get("RANK", "0")) == 0


def say(tool: str, message: str) -> None:
    if is_main_process():
        print(f"{tool}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- data files


def check_data_files(paths: Sequence[str | Path], suffixes: Sequence[str]) -> None:
    """Each `--data` path exists, is a file (or a stream such as a FIFO) and has one of `suffixes`."""
    for path in map(Path, paths):
        if not path.exists():
            raise TrainingError(f"--data {display(path)}: no such file")
        if path.is_dir():
            raise TrainingError(f"--data {display(path)}: is a folder; give the data files themselves")
        if path.suffix not in suffixes:
            raise TrainingError(f"--data {display(path)}: unsupported data file type {path.suffix!r} (use "
                                f"{', '.join(suffixes)})")


def bounded_lines(path: Path, max_line_bytes: int, budget: list[int] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, never holding more than `max_line_bytes` of one line nor, with `budget`
    (a one-item list of bytes left, shared across files), reading more than that in all: an endless file or a
    gigantic line is an error naming the option, not an exhausted memory. A byte-order mark at the start is dropped;
    a line that is not UTF-8 is an error naming the file, the line and the byte."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise TrainingError(describe_os_error(error, path, "read it")) from None
    with handle:
        line_no = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 1)
            except OSError as error:
                raise TrainingError(describe_os_error(error, path, "read it")) from None
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes:
                raise TrainingError(f"--data {display(path)} line {line_no}: longer than --max-document-bytes "
                                    f"({max_line_bytes} bytes); raise it if the line is meant to be one example")
            if budget is not None:
                budget[0] -= len(raw)
                if budget[0] < 0:
                    raise TrainingError(f"--data: more than --max-data-bytes bytes to read (stopped in "
                                        f"{display(path)} at line {line_no}); raise it or give less data")
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TrainingError(
                    f"{display(path)} line {line_no}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte "
                    f"{error.start + 1} of the line); save the file as UTF-8"
                ) from None


def line_documents(paths: Sequence[str | Path], text_field: str = "text", max_document_bytes: int = 16 << 20,
                   budget: list[int] | None = None) -> Iterator[str]:
    """The documents of `.txt` files (one per non-empty line, without its line ending) and `.jsonl`/`.json` files
    (JSON lines: one object per line with the text in `text_field`), read with `bounded_lines`' bounds. A bad record
    is an error naming the file and the line."""
    for path in map(Path, paths):
        for line_no, line in bounded_lines(path, max_document_bytes, budget):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainingError(f"--data {display(path)} line {line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise TrainingError(f"--data {display(path)} line {line_no}: expected an object with a string field "
                                    f"{text_field!r}")
            yield record[text_field]


def check_tokenizer_fits(tokenizer, vocab_size: int, option: str = "--tokenizer") -> None:
    """The tokenizer's ids (all of `len(tokenizer)`, added tokens included) index the model's embedding."""
    if len(tokenizer) > vocab_size:
        raise TrainingError(
            f"{option}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary has {vocab_size} "
            "(ids beyond it would fail at the embedding); use the model's tokenizer or a model with a larger vocab_size"
        )


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the local folder `path`; a missing pad token becomes the EOS token (padding is masked
    by position)."""
    folder = Path(path)
    if not folder.is_dir():
        raise TrainingError(f"{display(folder)}: no such tokenizer folder" if not folder.exists()
                            else f"{display(folder)}: is a file, not a tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())
        raise TrainingError(f"{display(folder)}: cannot load a tokenizer from it ({message[:300]})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TrainingError(f"the tokenizer in {display(folder)} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------- the output


def _has_complete_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(_CHECKPOINT_NAME.match(p.name) and checkpoint_problem(p) is None
                                   for p in folder.iterdir())


def check_output_clear(output: str | Path, inputs: Sequence[tuple[str, str | None]]) -> None:
    """`output` is not, does not contain and does not lie inside any of the `(what, folder)` inputs."""
    for what, path in inputs:
        if path is not None and same_or_nested(Path(output), Path(path)):
            raise TrainingError(
                f"--output {display(output)} is, contains or lies inside {what} {display(path)}; saving there "
                "would overwrite or mix with it: choose another folder"
            )


def _unmarked_finetune_output(folder: Path) -> bool:
    """An output of mudd-finetune from before the marker: its checkpoints carry our checksum manifest (and no
    data position, which only mudd-pretrain writes)."""
    checkpoints = [p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return bool(checkpoints) and all((p / CHECKPOINT_MANIFEST).is_file() and not (p / DATA_STATE).exists()
                                     for p in checkpoints)


class OwnedOutput:
    """The output folder of one training run (see the module docstring). Use as a context manager around the whole
    run; `staging` is where the final model goes, `publish_final()` puts it in place. Only the main process
    (global rank 0) claims, checks and cleans; the other ranks only learn the paths."""

    def __init__(self, output: str | Path, tool: str, force: bool = False,
                 inputs: Sequence[tuple[str, str | None]] = (), resume: bool = False):
        self.output, self.tool, self.force, self.resume = Path(output), tool, force, resume
        self.staging = staging_path(self.output, _STAGING_SUFFIX)
        self.inputs = inputs
        self.main = is_main_process()
        self._claim: Claim | None = None
        self.created = False
        self.foreign: set[str] | None = None  # the entries of a folder taken with --force
        self.published = False

    def __enter__(self) -> OwnedOutput:
        output = self.output
        check_output_clear(output, self.inputs)
        if not self.main:
            return self
        try:
            self._claim = Claim(output, self.tool).__enter__()
        except OutputError as error:
            raise TrainingError(f"--output {error}") from None
        try:
            self._remove_leftovers()
            self._check_owner()
            self.created = not output.exists()
            output.mkdir(exist_ok=True)
            if self.foreign is None and owner(output) is None:
                mark_owner(output, self.tool)
        except OSError as error:
            self._release()
            raise TrainingError(describe_os_error(error, output, "write to it")) from None
        except BaseException:
            self._release()
            raise
        return self

    def _remove_leftovers(self) -> None:
        """Staging and replaced folders that a killed run left beside the output (they carry safe_output's claim
        marker) are removed; anything else at the staging path is the user's, and an error."""
        remove_stale(self.output, lambda message: say(self.tool, message))
        if os.path.lexists(self.staging):
            raise TrainingError(f"--output {display(self.output)}: {display(self.staging)} exists and was not written "
                                f"by {self.tool}; move it away (this run stages its final model there)")

    def prepare_staging(self) -> Path:
        """The (new, empty but for the claim marker) staging folder for the final model; main process only."""
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            return make_staging(self.output, self.tool, _STAGING_SUFFIX)
        except OutputError as error:
            raise TrainingError(str(error)) from None

    def _check_owner(self) -> None:
        output = self.output
        if output.is_symlink() or (output.exists() and not output.is_dir()):
            raise TrainingError(f"--output {display(output)}: is a file or a link, not a folder")
        if not output.exists():
            return
        entries = sorted(p.name for p in output.iterdir())
        written_by = owner(output)
        ours = written_by == self.tool
        if written_by is None and self.tool == "mudd-finetune" and _unmarked_finetune_output(output):
            mark_owner(output, self.tool)
            ours = True
        if not entries or (ours and (self.resume or not _has_complete_checkpoint(output))):
            return
        if ours:
            what = "the checkpoints of an earlier run (add --resume-from-checkpoint to continue it)"
        else:
            what = f"the output of {written_by}" if written_by else f"files {self.tool} did not write"
        if not self.force:
            examples = ", ".join(entry for entry in entries if entry != OWNER_MARKER)[:80]
            raise TrainingError(
                f"--output {display(output)}: holds {what} (e.g. {examples}); choose another folder, or pass --force "
                "to replace it with this run's result"
            )
        say(self.tool, f"--force: {display(output)} holds {what}; it is replaced when this run succeeds")
        self.foreign = set(entries)

    def publish_final(self) -> None:
        """Move this run's folders (checkpoints, ...) from the output into the staging folder, which holds the final
        model, and put the staging folder in the output's place with one rename."""
        if not self.main:
            return
        mark_owner(self.staging, self.tool)
        previous_marker = None
        if self.foreign is not None:  # taken with --force: the user allowed this run to replace it
            marker = self.output / OWNER_MARKER
            previous_marker = marker.read_bytes() if marker.is_file() and not marker.is_symlink() else None
            mark_owner(self.output, self.tool)
        staged = {p.name for p in self.staging.iterdir()}
        carried = [p for p in (self.output.iterdir() if self.output.is_dir() else [])
                   if p.is_dir() and not p.is_symlink() and p.name not in staged
                   and (self.foreign is None or p.name not in self.foreign)]
        moved: list[str] = []
        try:
            for entry in carried:
                os.replace(entry, self.staging / entry.name)
                moved.append(entry.name)
            publish(self.staging, self.output, self.tool)
        except BaseException:
            if previous_marker is not None:  # the folder taken with --force keeps its own marker
                (self.output / OWNER_MARKER).write_bytes(previous_marker)
            for name in moved:  # the checkpoints go back where they were
                if (self.staging / name).exists() and not (self.output / name).exists():
                    os.replace(self.staging / name, self.output / name)
            raise
        self.published = True

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self.main:
            return
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
            if exc_type is not None and not self.published:
                self._clean_after_failure()
        finally:
            self._release()

    def _clean_after_failure(self) -> None:
        output = self.output
        if not output.is_dir():
            return
        if self.foreign is not None:
            for entry in output.iterdir():
                if entry.name in self.foreign:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            say(self.tool, f"the run failed; {display(output)} is left as it was")
        elif _has_complete_checkpoint(output):
            say(self.tool, f"the run failed; the checkpoints in {display(output)} stay for --resume-from-checkpoint")
        elif self.created:
            shutil.rmtree(output, ignore_errors=True)
        else:
            (output / OWNER_MARKER).unlink(missing_ok=True)

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.__exit__(None, None, None)
            self._claim = None


# --------------------------------------------------------------------------------------------------- Trainer


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bfloat16 mixed precision runs natively: an accelerator with bf16 support, or a CPU with oneDNN's
    bf16 kernels (elsewhere bf16 on CPU is emulated and slower than float32)."""
    if not use_cpu:
        return is_torch_bf16_gpu_available()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    """`TrainingArguments` from the options both commands share (`train_options.add_training_options`); bf16 only
    where supported; `overrides` are the command's own fields (epochs, steps, ...)."""
    use_cpu = args.cpu or not has_accelerator()
    use_bf16 = args.bf16 and bf16_supported(use_cpu)
    if args.bf16 and not use_bf16:
        print(f"--bf16: this {'CPU' if use_cpu else 'device'} has no native bfloat16 support; training in float32.",
              file=sys.stderr)
    fsdp_kwargs = {}
    if args.fsdp:
        if use_cpu:
            # accelerate turns multi-process CPU runs into DDP and would silently drop the FSDP plugin.
            raise TrainingError("--fsdp needs GPUs (or another accelerator): on CPU, Trainer/accelerate run "
                                "multi-process training as plain data parallel; drop --fsdp there")
        # TRANSFORMER_BASED_WRAP without class names: accelerate wraps each class in the model's `_no_split_modules`.
        fsdp_kwargs = {"fsdp": True, "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    values = dict(
        output_dir=str(args.output),
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
    return TrainingArguments(**(values | overrides))


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


def nonfinite_weights(tensors) -> list[str]:
    return [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in tensors
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


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


# --------------------------------------------------------------------------------------------------- checkpoints


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
    """Once Trainer has saved a checkpoint: the `writers` add their files (e.g. the data position), then the
    checksum manifest covers all of it."""

    def __init__(self, writers: Sequence[Callable[[Path, object], None]] = ()):
        self.writers = list(writers)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                for write in self.writers:
                    write(folder, state)
                write_checkpoint_manifest(folder)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: a full model's (maybe sharded) and a LoRA adapter's."""
    return sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("adapter_model.safetensors"))


def _weights_problem(folder: Path) -> str | None:
    files = _weight_files(folder)
    if not files:
        return "no model weights (model.safetensors)"
    for file in files:
        try:
            with open_safetensors(file) as handle:
                for name in handle.keys():
                    bad = nonfinite_weights([(name, handle.get_tensor(name))])
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


def checkpoint_mismatch(folder: str | Path, model: torch.nn.Module) -> str | None:
    """Why the checkpoint in `folder` does not belong to `model` (another config, other tensor names or shapes), or
    None. Checked before Trainer loads it, which would fail with a size-mismatch traceback."""
    folder = Path(folder)
    config = getattr(model, "config", None)
    saved = folder / "config.json"
    if config is not None and saved.is_file():
        try:
            values = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"config.json cannot be read ({error})"
        for field in _SHAPE_FIELDS:
            if field in values and values[field] != getattr(config, field, values[field]):
                return (f"it was saved from another model ({field} {values[field]!r}, this model has "
                        f"{getattr(config, field)!r})")
    own = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    adapter = not sorted(folder.glob("model*.safetensors"))
    if adapter:  # peft saves adapter keys without the adapter name
        own = {re.sub(r"\.default(?=\.)", "", name): shape for name, shape in own.items()}
    for file in _weight_files(folder):
        try:
            with open_safetensors(file) as handle:
                for name in handle.keys():
                    shape = tuple(handle.get_slice(name).get_shape())
                    if name not in own:
                        if adapter:
                            continue
                        return f"{file.name} holds {name}, which this model does not have (another model's checkpoint)"
                    if own[name] != shape:
                        return (f"{file.name}: {name} has shape {shape}, this model's is {own[name]} (another model's "
                                "checkpoint)")
        except (SafetensorError, OSError) as error:
            return f"{file.name}: not a valid safetensors file ({error})"
    return None


def resolve_checkpoint(resume: str | bool | None, output: str | Path, tool: str,
                       model: torch.nn.Module | None = None) -> str | None:
    """The checkpoint folder to resume from: `resume` itself (verified), or with `True` the newest complete one in
    `output`; partial or damaged ones are skipped with a message; one of another model is an error. Says which one
    is used."""
    if resume is None or resume is False:
        return None
    if resume is not True:
        problem = checkpoint_problem(resume)
        if problem:
            raise TrainingError(f"--resume-from-checkpoint {display(resume)}: cannot resume from it: {problem}")
        chosen = Path(resume)
    else:
        output = Path(output)
        candidates = sorted(
            (p for p in output.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()) if output.is_dir() else [],
            key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)), reverse=True,
        )
        if not candidates:
            raise TrainingError(f"--resume-from-checkpoint: no checkpoint-N folder in {display(output)}")
        chosen = None
        for candidate in candidates:
            problem = checkpoint_problem(candidate)
            if problem is None:
                chosen = candidate
                break
            say(tool, f"skipping {display(candidate)}: {problem}")
        if chosen is None:
            raise TrainingError(f"--resume-from-checkpoint: no complete checkpoint in {display(output)} (see above)")
    if model is not None:
        mismatch = checkpoint_mismatch(chosen, model)
        if mismatch:
            raise TrainingError(f"--resume-from-checkpoint {display(chosen)}: cannot resume from it: {mismatch}")
    say(tool, f"resuming from {display(chosen)}")
    return str(chosen)


def _load_checkpoint_weights(model: torch.nn.Module, folder: Path) -> None:
    """The weights of a complete checkpoint into `model` (a full model, or a peft model's adapter)."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file() and not any(folder.glob("model*.safetensors")):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise TrainingError(f"{display(adapter)}: tensors this model does not have: {unexpected[:3]}")
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise TrainingError(f"{display(folder)}: its weights do not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")


def train(trainer: Trainer, checkpoint: str | None, tool: str) -> None:
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except from a checkpoint that already reached
    `max_steps`: its state and weights are restored and nothing is trained (Trainer would run one more step)."""
    if checkpoint is not None and trainer.args.max_steps > 0:
        folder = Path(checkpoint)
        state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            say(tool, f"{display(folder)} already reached {state.global_step} steps (--max-steps "
                f"{trainer.args.max_steps}); nothing left to train")
            _load_checkpoint_weights(trainer.model, folder)
            trainer.state = state
            return
    trainer.train(resume_from_checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------------- the command


def run_command(tool: str, output: str | Path, body: Callable[[], None]) -> int:
    """Run `body`; errors become one line on stderr and exit code 1."""
    try:
        body()
    except (TrainingError, ValueError, ImportError) as error:
        message = str(error)
    except OSError as error:
        message = describe_os_error(error)
    except (SafetensorError, RuntimeError) as error:
        message = write_failure_message(error, output)
        if message is None:
            raise
    else:
        return 0
    print(f"{tool}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
