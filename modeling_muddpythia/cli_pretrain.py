"""`mudd-pretrain`: parses and checks the command line (`train_options`, no torch), then starts `pretrain.run`."""

from __future__ import annotations

import sys

from .train_options import build_pretrain_parser as build_parser  # noqa: F401
from .train_options import parse_pretrain_args


def main(argv: list[str] | None = None) -> int:
    args = parse_pretrain_args(argv)
    from . import load_package

    load_package()  # the model classes, registered with transformers' Auto classes
    from .pretrain import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
