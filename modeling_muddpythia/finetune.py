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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from .modeling_mudd_decoder import MUDDDecoderForCausalLM
from .mudd import MUDDDenseConnections
from .muddify import MUDDIFIERS, muddify


# The linear layers of the MUDD decoder blocks (attention; FFN: MUDDFormer has `gate_proj`, MUDDPythia not);
# LoRA's default targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
TRAIN_EXTRA_HINT = "mudd-finetune needs the `train` extra: pip install 'modeling-muddpythia[train]'"


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


def read_texts(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """The examples of local `.txt` files (one per non-empty line) and `.jsonl`/`.json` files (JSON lines, one object
    per line with the text in `text_field`). Raises `ValueError` naming the file and line of a bad record."""
    texts = []
    for path in map(Path, paths):
        if path.suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (use .txt, .jsonl or .json)")
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if path.suffix in TEXT_SUFFIXES:
                    texts.append(line.rstrip("\n"))
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {line_no}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path} line {line_no}: expected an object with a string field {text_field!r}")
                texts.append(record[text_field])
    if not texts:
        raise ValueError(f"no examples in {[str(p) for p in paths]}")
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
        raise ValueError("every example tokenized to fewer than two tokens")
    return Dataset.from_dict({"input_ids": examples})


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path`; a missing pad token becomes the EOS token (padding is masked by position)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, muddify_plain: bool = False, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a MUDD causal LM in float32 (mixed precision keeps float32 master weights); with `muddify_plain`, load
    a plain model and return its MUDD equivalent."""
    kwargs = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if muddify_plain:
        if isinstance(model, MUDDDecoderForCausalLM):
            raise ValueError(f"{path} already holds a MUDD model ({type(model).__name__}); drop --muddify")
        return muddify(model)
    if not isinstance(model, MUDDDecoderForCausalLM):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not a MUDD model; --muddify converts {sorted(MUDDIFIERS)}"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mudd-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="model folder: a MUDD model, or a plain GPT-NeoX/Pythia or Llama one with --muddify")
    parser.add_argument("--data", nargs="+", required=True, help="training files: .txt, .jsonl or .json")
    parser.add_argument("--output", required=True, help="output folder (checkpoints and the final model)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--muddify", action="store_true", help="the model folder holds a plain model: muddify it")
    parser.add_argument("--text-field", default="text", help="JSON field with the text (default: text)")
    parser.add_argument("--max-length", type=int, help="truncate examples to this many tokens "
                        "(default: the model's max_position_embeddings)")
    parser.add_argument("--attn-implementation", help="sdpa (default), eager, flash_attention_2, ...")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0, help="number of epochs (default: 1)")
    train.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    train.add_argument("--batch-size", type=int, default=8, help="examples per device and step (default: 8)")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=5e-5)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: linear)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default: 500)")
    train.add_argument("--save-total-limit", type=int, help="keep at most this many checkpoints")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even where an accelerator is present")
    train.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision where the device supports it "
                       "(otherwise float32, with a message)")
    train.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="resume from this checkpoint folder, or without a value from the last one in --output")
    train.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (one unit per decoder layer "
                       "and the dense connections); start with torchrun or accelerate launch")

    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=int, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument("--lora-target-modules", nargs="+", default=list(LORA_TARGET_MODULES))
    lora.add_argument("--lora-freeze-dense", action="store_true",
                      help="keep the dense connections frozen (default: trained in full, saved with the adapter)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="save the merged model in --output (the adapter goes to --output/adapter)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if (args.merge_lora or args.lora_freeze_dense) and not args.lora:
        raise ValueError("--merge-lora and --lora-freeze-dense need --lora")
    if args.fsdp and args.lora:
        # untested: peft keeps two copies of the dense connections (`modules_to_save`), which FSDP would shard
        raise ValueError("--fsdp with --lora is not supported; train LoRA data parallel (without --fsdp)")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {args.max_length}")


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
        # every parameter of a MUDD model gets a gradient each step; DDP's extra graph walk would find none unused
        ddp_find_unused_parameters=False,
        **fsdp_kwargs,
    )


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Tokenizer, data, model (optionally LoRA-wrapped) and `Trainer`, ready for `trainer.train()`."""
    _check_args(args)
    training_args = training_arguments(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, muddify_plain=args.muddify, attn_implementation=args.attn_implementation)
    max_length = args.max_length or model.config.max_position_embeddings
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
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
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=CausalLMPaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )


def save_result(trainer: Trainer, args: argparse.Namespace) -> None:
    """Save the trained model (or LoRA adapter) and tokenizer to `args.output`, loadable with `from_pretrained`.

    A LoRA adapter records its base folder as an absolute path (with `--muddify`: `output/base`, written before
    training). With `--merge-lora` the merged model goes to `output` and the adapter to `output/adapter`.
    """
    output = Path(args.output)
    trainer.save_state()
    if not args.lora:
        trainer.save_model(str(output))
        return
    if not trainer.is_world_process_zero():
        return
    peft_model = trainer.model
    adapter_dir = output / "adapter" if args.merge_lora else output
    peft_model.save_pretrained(adapter_dir)
    trainer.processing_class.save_pretrained(adapter_dir)
    if args.merge_lora:
        peft_model.merge_and_unload().save_pretrained(output)
        trainer.processing_class.save_pretrained(output)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    save_result(trainer, args)
    if trainer.is_world_process_zero():
        print(f"Saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
