"""`mudd-finetune`: the argument parser (light: no torch) and the entry point that imports the trainer after."""

from __future__ import annotations

import argparse
import sys

# The linear layers of the MUDD decoder blocks (attention; FFN: MUDDFormer has `gate_proj`, MUDDPythia not);
# LoRA's default targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The plain causal LMs --muddify turns into MUDD models (muddify also handles ViT, which this command cannot train).
MUDDIFIABLE = ("GPTNeoXForCausalLM (Pythia)", "LlamaForCausalLM")

DESCRIPTION = """\
Fine-tune a MUDD causal LM (MUDDPythia or MUDDFormer) with transformers' Trainer.

The model folder holds one of our models (saved with save_pretrained) or, with --muddify, a plain GPT-NeoX/Pythia
or Llama model that is turned into the equivalent MUDD model (identity dense connections) before training. The
data are local files: .txt (one example per non-empty line) or .jsonl/.json (JSON lines; the text is in
--text-field), UTF-8 (a byte-order mark is allowed). Each example is tokenized, closed with the EOS token,
truncated to --max-length and padded per batch; padded positions are left out of the loss.

Safety: the model folder must load with every weight present and finite; training stops with an error when the
loss or a weight becomes non-finite; checkpoints carry a checksum manifest and are verified before resuming
(a partial or damaged one is skipped, and the run says which checkpoint it resumes from); the final model is
staged and moved into --output file by file with rename; --output must not be, contain or lie inside the model
or tokenizer folder.

--lora trains LoRA adapters (peft) on the attention and FFN projections; the dense connections stay fully
trainable (--lora-freeze-dense freezes them). Multi-process data parallel: start the same command with
torchrun --nproc_per_node N -m modeling_muddpythia.finetune ... (or accelerate launch); on GPUs --fsdp shards the
model (FSDP2).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mudd-finetune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 error (one line naming the path and the cause), 2 bad command line.",
    )
    parser.add_argument("model", help="local model folder: a MUDD model, or with --muddify a plain GPT-NeoX/Pythia or "
                        "Llama one (no Hub ids: everything is local)")
    parser.add_argument("--data", nargs="+", required=True, help="training files: .txt, .jsonl or .json (required)")
    parser.add_argument("--output", required=True,
                        help="output folder for checkpoints and the final model (required)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--muddify", action="store_true",
                        help=f"the model folder holds a plain {' or '.join(MUDDIFIABLE)}: turn it into the equivalent "
                        "MUDD model first (default: off)")
    parser.add_argument("--text-field", default="text", help="JSON field with the text (default: text)")
    parser.add_argument("--max-length", type=int, help="truncate examples to this many tokens "
                        "(default: the model's max_position_embeddings)")
    parser.add_argument("--attn-implementation",
                        help="sdpa, eager, flash_attention_2, ... (default: the model's, sdpa)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0, help="number of epochs (default: 1)")
    train.add_argument("--max-steps", type=int, default=-1,
                       help="optimizer steps; overrides --epochs when > 0 (default: -1, use --epochs)")
    train.add_argument("--batch-size", type=_positive_int, default=8,
                       help="examples per device and step (default: 8)")
    train.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1,
                       help="micro-batches per optimizer step (default: 1)")
    train.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate (default: 5e-05)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0.0)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    train.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: linear)")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N steps (default: 10)")
    train.add_argument("--save-steps", type=_positive_int, default=500, help="checkpoint every N steps (default: 500)")
    train.add_argument("--save-total-limit", type=_positive_int,
                       help="keep at most this many checkpoints (default: keep all)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (default: off)")
    train.add_argument("--cpu", action="store_true",
                       help="train on the CPU even where an accelerator is present (default: off)")
    train.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision where the device supports it, "
                       "otherwise float32 with a message (default: off, float32)")
    train.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="resume from this checkpoint folder, or without a value from the last complete one in "
                       "--output (default: start fresh)")
    train.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (one unit per decoder layer "
                       "and the dense connections); start with torchrun or accelerate launch; GPUs only (default: off)")

    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights (default: off)")
    lora.add_argument("--lora-r", type=_positive_int, default=8, help="LoRA rank (default: 8)")
    lora.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator (default: 16)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default: 0.05)")
    lora.add_argument("--lora-target-modules", nargs="+", default=list(LORA_TARGET_MODULES),
                      help=f"module names that get adapters (default: {' '.join(LORA_TARGET_MODULES)})")
    lora.add_argument("--lora-freeze-dense", action="store_true",
                      help="keep the dense connections frozen (default: off, they are trained in full and saved with "
                      "the adapter)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="save the merged model in --output and the adapter in --output/adapter (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import load_package

    load_package()  # the model classes, registered with transformers' Auto classes
    from .finetune import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
