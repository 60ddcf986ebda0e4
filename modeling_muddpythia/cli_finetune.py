"""`mudd-finetune`: parses and checks the command line (`train_options`, no torch), then starts `finetune.run`.

The imports run one way: this module -> `train_options` and `finetune`; `finetune` -> `train_options`.
"""

from __future__ import annotations

import sys

from .train_options import LORA_TARGET_MODULES, MUDDIFIABLE, build_finetune_parser as build_parser  # noqa: F401
from .train_options import parse_finetune_args


def main(argv: list[str] | None = None) -> int:
    args = parse_finetune_args(argv)
    from . import load_package

    load_package()  # the model classes, registered with transformers' Auto classes
    from .finetune import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
