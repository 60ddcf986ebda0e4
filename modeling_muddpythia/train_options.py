"""The command lines of `mudd-finetune` and `mudd-pretrain`: parsers and value checks, in plain Python.

This module imports neither torch nor transformers nor the training code, so `--help` answers at once and every
option is checked before any work starts. The commands (`cli_finetune`, `cli_pretrain`) and the training modules
(`finetune`, `pretrain`) import it; it imports none of them.

Every error is one line naming the option: `PROG: error: --OPTION: what is wrong` (exit code 2).
"""

from __future__ import annotations

import argparse
import math

# The linear layers of the MUDD decoder blocks (attention; FFN: MUDDFormer has `gate_proj`, MUDDPythia not);
# LoRA's default targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The plain causal LMs --muddify turns into MUDD models (muddify also handles ViT, which this command cannot train).
MUDDIFIABLE = ("GPTNeoXForCausalLM (Pythia)", "LlamaForCausalLM")
# transformers' `SchedulerType` values (5.23), so that a wrong name fails before torch is imported.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
# Upper bounds on what the data readers hold in memory: the whole data of mudd-finetune, and one line/document.
DEFAULT_MAX_DATA_BYTES = 1 << 30
DEFAULT_MAX_DOCUMENT_BYTES = 16 << 20


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (`PROG: error: MESSAGE (--help for usage)`, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _number(text: str, kind: type, low: float | None, inclusive: bool, high: float | None = None):
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if low is not None and (value < low or (value == low and not inclusive)):
        raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'greater than'} {low}, got {text}")
    if high is not None and value >= high:
        raise argparse.ArgumentTypeError(f"must be less than {high}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, True)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, True)


def positive_float(text: str) -> float:
    return _number(text, float, 0, False)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0, True)


def probability(text: str) -> float:
    return _number(text, float, 0, True, high=1)


def add_data_options(parser: argparse.ArgumentParser, formats: str) -> None:
    parser.add_argument("--data", nargs="+", required=True, help=f"training files: {formats} (required)")
    parser.add_argument("--text-field", default="text", help="JSON/parquet/arrow column with the text (default: text)")
    parser.add_argument("--max-document-bytes", type=positive_int, default=DEFAULT_MAX_DOCUMENT_BYTES,
                        help="longest line or document read, in bytes; a longer one is an error, never cut "
                        f"(default: {DEFAULT_MAX_DOCUMENT_BYTES})")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True,
                        help="output folder for checkpoints and the final model; claimed for the whole run (required)")
    parser.add_argument("--force", action="store_true",
                        help="let --output be a folder that holds something else (another model); it is replaced by "
                        "this run's result when the run succeeds, and left as it was when it fails (default: off)")


def add_training_options(group, *, learning_rate: float, weight_decay: float, lr_scheduler: str,
                         save_steps: int) -> None:
    """The options both commands share (the engine in `training.py` reads them)."""
    group.add_argument("--batch-size", type=positive_int, default=8,
                       help="examples (pretraining: blocks) per device and micro-batch (default: 8)")
    group.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                       help="micro-batches per optimizer step (default: 1)")
    group.add_argument("--learning-rate", type=positive_float, default=learning_rate,
                       help=f"peak learning rate (default: {learning_rate})")
    group.add_argument("--weight-decay", type=non_negative_float, default=weight_decay,
                       help=f"AdamW weight decay (default: {weight_decay})")
    group.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps (default: 0)")
    group.add_argument("--lr-scheduler", default=lr_scheduler, choices=LR_SCHEDULERS, metavar="NAME",
                       help=f"learning-rate schedule after warm-up: {', '.join(LR_SCHEDULERS)} "
                       f"(default: {lr_scheduler})")
    group.add_argument("--seed", type=non_negative_int, default=42, help="random seed (default: 42)")
    group.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default: 10)")
    group.add_argument("--save-steps", type=positive_int, default=save_steps,
                       help=f"checkpoint every N steps (default: {save_steps})")
    group.add_argument("--save-total-limit", type=positive_int,
                       help="keep at most this many checkpoints (default: keep all)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (default: off)")
    group.add_argument("--cpu", action="store_true",
                       help="train on the CPU even where an accelerator is present (default: off)")
    group.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision where the device supports it, "
                       "otherwise float32 with a message (default: off, float32)")
    group.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="resume from this checkpoint folder, or without a value from the last complete one in "
                       "--output (default: start fresh)")
    group.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (one unit per decoder layer "
                       "and the dense connections); start with torchrun or accelerate launch; GPUs only (default: off)")
    group.add_argument("--attn-implementation",
                       help="sdpa, eager, flash_attention_2, ... (default: the model's, sdpa)")


FINETUNE_DESCRIPTION = """\
Fine-tune a MUDD causal LM (MUDDPythia or MUDDFormer) with transformers' Trainer.

The model folder holds one of our models (saved with save_pretrained) or, with --muddify, a plain GPT-NeoX/Pythia
or Llama model that is turned into the equivalent MUDD model (identity dense connections) before training. The
data are local files: .txt (one example per non-empty line) or .jsonl/.json (JSON lines; the text is in
--text-field), UTF-8 (a byte-order mark is allowed). Each example is tokenized, closed with the EOS token,
truncated to --max-length and padded per batch; padded positions are left out of the loss.

Safety: every option is checked before work starts; --output is claimed for the whole run (a second run on it
fails at once, naming the first); a folder that holds something else (another model) is refused unless --force;
the model folder must load with every weight present and finite, and the tokenizer's ids must fit its vocabulary;
training stops with an error when the loss or a weight becomes non-finite; checkpoints carry a checksum manifest
and are verified (and checked against the model) before resuming; the final model is staged beside --output and
replaces the folder in one rename, so --output never holds a mixed or partial model; a failed run removes what it
created (checkpoints of finished steps stay, for --resume-from-checkpoint); --output must not be, contain or lie
inside the model or tokenizer folder.

--lora trains LoRA adapters (peft) on the attention and FFN projections; the dense connections stay fully
trainable (--lora-freeze-dense freezes them). Multi-process data parallel: start the same command with
torchrun --nproc_per_node N -m modeling_muddpythia.finetune ... (or accelerate launch); on GPUs --fsdp shards the
model (FSDP2).
"""


def build_finetune_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mudd-finetune", description=FINETUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 error (one line naming the path and the cause), 2 bad command line.",
    )
    parser.add_argument("model", help="local model folder: a MUDD model, or with --muddify a plain GPT-NeoX/Pythia or "
                        "Llama one (no Hub ids: everything is local)")
    add_data_options(parser, ".txt, .jsonl or .json")
    parser.add_argument("--max-data-bytes", type=positive_int, default=DEFAULT_MAX_DATA_BYTES,
                        help="most bytes read from all --data files together (they are held in memory); more is an "
                        f"error (default: {DEFAULT_MAX_DATA_BYTES})")
    add_output_options(parser)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--muddify", action="store_true",
                        help=f"the model folder holds a plain {' or '.join(MUDDIFIABLE)}: turn it into the equivalent "
                        "MUDD model first (default: off)")
    parser.add_argument("--max-length", type=_min_two, help="truncate examples to this many tokens "
                        "(default: the model's max_position_embeddings)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=non_negative_float, default=1.0,
                       help="number of epochs; 0 only together with --max-steps (default: 1)")
    train.add_argument("--max-steps", type=positive_int,
                       help="optimizer steps; overrides --epochs (default: none, use --epochs)")
    add_training_options(train, learning_rate=5e-5, weight_decay=0.0, lr_scheduler="linear", save_steps=500)

    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights (default: off)")
    lora.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (default: 8)")
    lora.add_argument("--lora-alpha", type=positive_float, default=16, help="LoRA scaling numerator (default: 16)")
    lora.add_argument("--lora-dropout", type=probability, default=0.05,
                      help="dropout on the LoRA input, in [0, 1) (default: 0.05)")
    lora.add_argument("--lora-target-modules", nargs="+", default=list(LORA_TARGET_MODULES),
                      help=f"module names that get adapters (default: {' '.join(LORA_TARGET_MODULES)})")
    lora.add_argument("--lora-freeze-dense", action="store_true",
                      help="keep the dense connections frozen (default: off, they are trained in full and saved with "
                      "the adapter)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="save the merged model in --output and the adapter in --output/adapter (default: off)")
    return parser


def _min_two(text: str) -> int:
    return _number(text, int, 2, True)


def check_finetune_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks across options (each option alone is checked by its type); `parser.error` on the first problem."""
    if args.max_steps is None and args.epochs == 0:
        parser.error("--epochs 0 trains nothing; give a positive --epochs or --max-steps")
    if (args.merge_lora or args.lora_freeze_dense) and not args.lora:
        parser.error("--merge-lora and --lora-freeze-dense need --lora")
    if args.fsdp and args.lora:
        # peft keeps two copies of the dense connections (`modules_to_save`), which FSDP would shard
        parser.error("--fsdp with --lora is not supported; train LoRA data parallel (without --fsdp)")
    return args


def parse_finetune_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_finetune_parser()
    return check_finetune_args(parser, parser.parse_args(argv))


PRETRAIN_DESCRIPTION = """\
Pretrain a MUDD causal LM (MUDDPythia or MUDDFormer) from random initialisation with transformers' Trainer.

--config is a preset of the configuration/ folder (e.g. muddpythia-405m) or a config.json; the model starts as the
paper's: dense connections at the plain residual (each layer reads only the newest state), everything else from
initializer_range. The corpus (--data: .txt one document per non-empty line, .jsonl/.json, .parquet or .arrow; the
text in --text-field) is read with `datasets` (--streaming for corpora larger than memory), tokenized, each
document closed with the tokenizer's end-of-text token, and packed into blocks of --block-size tokens: no padding,
documents continue across blocks, and only the final partial block is left out (its size is reported). The first
--eval-blocks blocks are held out for the held-out loss. Blocks are served in an order fixed by --seed; the data
position is saved with every checkpoint, so a run resumed with --resume-from-checkpoint repeats exactly the losses
and weights of an uninterrupted one.

--plain-twin then trains the plain transformers model of the same shape (GPT-NeoX for MUDDPythia, Llama for
MUDDFormer) on the same token stream, for as many steps (--twin-budget steps) or as many training FLOPs (flops), into
--output/plain-twin/, and writes --output/report.md with a loss-vs-tokens / loss-vs-FLOPs plot (report.png) and the
held-out losses.

Logs: loss, learning rate, tokens/s and model FLOPs utilisation (FLOPs counted on the model, the device's peak where
known or --peak-tflops), with a progress bar. Multi-process: torchrun --nproc_per_node N -m modeling_muddpythia.pretrain
... (or accelerate launch); on GPUs --fsdp shards the model (FSDP2). Output ownership, checkpoint verification and
argument checks are those of mudd-finetune.
"""


def build_pretrain_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mudd-pretrain", description=PRETRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 error (one line naming the path and the cause), 2 bad command line.",
    )
    parser.add_argument("--config", required=True,
                        help="a preset name from configuration/ (e.g. muddpythia-405m) or a config.json file "
                        "(required)")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer folder (required)")
    add_data_options(parser, ".txt, .jsonl, .json, .parquet or .arrow, all of one kind")
    add_output_options(parser)
    parser.add_argument("--block-size", type=_min_two,
                        help="tokens per training block (default: the config's max_position_embeddings)")
    parser.add_argument("--streaming", action="store_true",
                        help="read the corpus as a stream instead of loading it into memory (default: off)")
    parser.add_argument("--shuffle-buffer", type=non_negative_int, default=1000,
                        help="blocks in the seeded shuffle buffer of --streaming; 0 keeps the corpus order "
                        "(default: 1000; without --streaming all blocks are shuffled)")
    parser.add_argument("--eval-blocks", type=non_negative_int, default=16,
                        help="blocks held out from training for the held-out loss (default: 16)")

    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=positive_int, required=True, help="optimizer steps (required)")
    add_training_options(train, learning_rate=3e-4, weight_decay=0.1, lr_scheduler="cosine", save_steps=1000)
    train.add_argument("--compile", action="store_true",
                       help="compile the model with torch.compile(fullgraph=True) (default: off, eager)")
    train.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend for --compile, e.g. aot_eager to debug (default: inductor)")
    train.add_argument("--report-to", default="none", choices=("none", "tensorboard"),
                       help="where Trainer also sends its logs: none or tensorboard (default: none)")
    train.add_argument("--peak-tflops", type=positive_float,
                       help="the device's peak TFLOP/s for the MFU log (default: known for common GPUs, else no MFU)")

    twin = parser.add_argument_group("plain twin")
    twin.add_argument("--plain-twin", action="store_true",
                      help="also train the plain transformers model of the same shape on the same tokens, into "
                      "--output/plain-twin, and write report.md (default: off)")
    twin.add_argument("--twin-budget", choices=("steps", "flops"), default="steps",
                      help="the twin trains as many steps, or as many training FLOPs as the MUDD run (default: steps)")
    return parser


def check_pretrain_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.warmup_steps >= args.max_steps:
        parser.error(f"--warmup-steps {args.warmup_steps} must be less than --max-steps {args.max_steps}")
    if args.compile_backend != "inductor" and not args.compile:
        parser.error("--compile-backend needs --compile")
    if args.twin_budget != "steps" and not args.plain_twin:
        parser.error("--twin-budget needs --plain-twin")
    return args


def parse_pretrain_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_pretrain_parser()
    return check_pretrain_args(parser, parser.parse_args(argv))
