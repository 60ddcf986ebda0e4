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

Reliability: the command line is checked before any work (`train_options`); the run owns `--output` through the
shared training engine (`training.OwnedOutput`: an exclusive claim, no foreign folder without `--force`, the final
model published in one rename, nothing left behind by a failed run); `--output` may not be, contain or lie inside
the model or tokenizer folder; the model must load with all weights present and finite and the tokenizer's ids must
fit its vocabulary; `--data` is read with a bound; a non-finite loss or weight stops training (`NonFiniteError`);
every checkpoint gets a checksum manifest and is verified, and checked against the model, before resuming.
Command-line errors are one line naming the option or the path and the cause (exit code 1, or 2 from the parser).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

from .modeling_mudd_decoder import MUDDDecoderForCausalLM
from .mudd import MUDDDenseConnections
from .muddify import muddify
from .safe_output import describe_os_error, display, mark_owner, owner
from .train_options import (  # noqa: F401  (public names)
    DEFAULT_MAX_DATA_BYTES, DEFAULT_MAX_DOCUMENT_BYTES, LORA_TARGET_MODULES, MUDDIFIABLE,
    build_finetune_parser as build_parser, parse_finetune_args,
)
from .training import (  # noqa: F401  (public names: the engine's checkpoint functions)
    CHECKPOINT_MANIFEST, ChecksumCallback, FiniteWeightsCallback, GuardedTrainer, NonFiniteError, OwnedOutput,
    TrainingError, check_data_files as _check_data_files, check_output_clear, check_tokenizer_fits,
    checkpoint_mismatch, checkpoint_problem, line_documents, load_tokenizer, nonfinite_weights, resolve_checkpoint,
    run_command, train, training_arguments as _training_arguments, write_checkpoint_manifest,
)


TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
TRAIN_EXTRA_HINT = (
    "mudd-finetune needs the `train` extra: pip install -e '.[train]' in this package's clone (peft, datasets, pillow)"
)
TOOL = "mudd-finetune"
# The error of this command is the engine's.
FinetuneError = TrainingError


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


def check_data_files(paths: Sequence[str | Path]) -> None:
    _check_data_files(paths, TEXT_SUFFIXES + JSON_SUFFIXES)


def read_texts(paths: Sequence[str | Path], text_field: str = "text", max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
               max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> list[str]:
    """The examples of local `.txt` files (one per non-empty line) and `.jsonl`/`.json` files (JSON lines, one object
    per line with the text in `text_field`), read as UTF-8 (a leading byte-order mark is dropped), at most
    `max_data_bytes` in all and `max_document_bytes` per line (`training.line_documents`). Raises `FinetuneError` (a
    `ValueError`) naming the file, and the line of a bad record or of bytes that are not UTF-8."""
    check_data_files(paths)
    texts = list(line_documents(paths, text_field, max_document_bytes, budget=[max_data_bytes]))
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
    nonfinite = nonfinite_weights(model.state_dict().items())
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


def check_paths(args: argparse.Namespace) -> None:
    """Model, tokenizer and data exist (the output is checked by `OwnedOutput`)."""
    check_model_folder(args.model)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        load_tokenizer(args.tokenizer)  # raises the right message
    check_data_files(args.data)


def output_inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The folders `--output` must stay clear of."""
    return [("the model folder", args.model), ("the tokenizer folder", args.tokenizer)]


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    """`TrainingArguments` from the command line (the engine's, plus epochs or steps)."""
    return _training_arguments(args, num_train_epochs=args.epochs,
                               max_steps=args.max_steps if args.max_steps is not None else -1)


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Tokenizer, data, model (optionally LoRA-wrapped) and `Trainer`, ready for `trainer.train()`."""
    check_paths(args)
    check_output_clear(args.output, output_inputs(args))  # (`OwnedOutput` checks it too; not every caller has one)
    training_args = training_arguments(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, muddify_plain=args.muddify, attn_implementation=args.attn_implementation)
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    max_length = args.max_length or model.config.max_position_embeddings
    if max_length > model.config.max_position_embeddings:
        raise FinetuneError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    texts = read_texts(args.data, args.text_field, args.max_data_bytes, args.max_document_bytes)
    dataset = tokenize_texts(texts, tokenizer, max_length)
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


def save_result(trainer: Trainer, args: argparse.Namespace, owned: OwnedOutput | None = None) -> None:
    """Save the trained model (or LoRA adapter), the tokenizer and trainer_state.json as `args.output`, loadable
    with `from_pretrained`.

    Everything is written into the staging folder beside the output, then `owned.publish_final()` moves this run's
    checkpoints into it and renames it into place, so the output is never a mix of two saves. A LoRA adapter records
    its base folder as an absolute path (with `--muddify`: `output/base`, written before training). With
    `--merge-lora` the merged model goes to `output` and the adapter to `output/adapter`. Without `owned` (a caller
    that manages no claim) the output is published as if this command owned it.
    """
    if owned is None:
        owned = OwnedOutput(args.output, TOOL)
        output = Path(args.output)
        if trainer.is_world_process_zero() and output.is_dir() and owner(output) is None:
            mark_owner(output, TOOL)  # the folder Trainer made for this run: published as this command's own
    staging = owned.staging
    if trainer.is_world_process_zero():
        owned.prepare_staging()
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
        owned.publish_final()


def run(args: argparse.Namespace) -> int:
    """Run the parsed and checked `mudd-finetune` command line (`train_options.parse_finetune_args`); returns the exit
    code (errors: one line on stderr, 1)."""

    def body() -> None:
        check_paths(args)
        with OwnedOutput(args.output, TOOL, force=args.force, inputs=output_inputs(args),
                         resume=args.resume_from_checkpoint is not None) as owned:
            trainer = build_trainer(args)
            checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output, TOOL, model=trainer.model)
            train(trainer, checkpoint, TOOL)
            save_result(trainer, args, owned)
        if trainer.is_world_process_zero():
            print(f"Saved to {display(args.output)}")

    return run_command(TOOL, args.output, body)


def main(argv: list[str] | None = None) -> int:
    return run(parse_finetune_args(argv))


if __name__ == "__main__":
    sys.exit(main())
