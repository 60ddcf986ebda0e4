"""`mudd-convert`: the argument parser (light: no torch) and the entry point that imports the converter after."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .safe_input import read_bounded

FORMATS = ("authors-pytorch", "pax", "maxtext", "gpt-neox", "llama", "vit-npz")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
MODEL_TYPES = ("muddformer", "muddpythia")
DEFAULT_SHARD_SIZE = "5GB"


def parse_size(text: str) -> int:
    """"5GB" -> 5_000_000_000 (decimal units as in transformers; also KiB/MiB/GiB and plain byte counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _config_argument(text: str) -> dict:
    """`--config`: inline JSON or a path to a JSON file (e.g. a preset from `configuration/`)."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        try:
            text = read_bounded(path).decode("utf-8-sig")
        except (OSError, ValueError) as error:  # ValueError: not UTF-8, or too large
            raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a JSON object or a JSON file: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mudd-convert",
        formatter_class=_HelpFormatter,
        description="Convert the MUDD authors' checkpoints (or a plain GPT-NeoX / Llama model, or Google's JAX ViT "
        ".npz) into a folder that from_pretrained(..., trust_remote_code=True) loads. The source layouts of every "
        "--format (names, shapes, transforms) are in docs/CHECKPOINT_FORMATS.md of the repository.",
        epilog="The output is written to a hidden sibling folder and renamed into place at the end; a second run on "
        "the same --output fails while one is running. Exit codes: 0 done, 1 conversion or file error, 2 bad "
        "command line, 130 interrupted.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="layout of --input (required; see docs/CHECKPOINT_FORMATS.md)")
    parser.add_argument("--input", required=True, type=Path, help="checkpoint folder or file (required)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder to create (required); must not be, contain or lie inside the input")
    parser.add_argument("--model-type", choices=MODEL_TYPES,
                        help="model family, when the source does not say (default: read from the source)")
    parser.add_argument("--config", type=_config_argument, default={},
                        help="JSON object or JSON file of config fields for what the checkpoint cannot tell, e.g. "
                        "'{\"vocab_size\": 50432}' (default: none)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        help="output dtype (default: the source's; when sources mix float dtypes, the widest, so "
                        "nothing is rounded unless asked for)")
    parser.add_argument("--max-shard-size", type=_size_argument, default=parse_size(DEFAULT_SHARD_SIZE),
                        metavar="SIZE", help=f"largest weights shard, e.g. 500MB or 2GiB (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--tokenizer", type=Path,
                        help="folder (or file) with tokenizer files to copy (default: the input folder's, if any)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the result and check it; compare logits with the source model where it can run "
                        "(default: off)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let --verify import and run the Python modeling code inside the input folder "
                        "(default: off, the code is never imported)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output folder that mudd-convert wrote (it carries .mudd-output.json; "
                        "any other folder is never replaced) (default: off, an existing one is refused)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on non-finite weights instead of warning (default: off)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pytorch_model.bin with torch.load(weights_only=True) (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import load_package

    load_package()  # the model classes, registered with transformers' Auto classes
    from .convert import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
