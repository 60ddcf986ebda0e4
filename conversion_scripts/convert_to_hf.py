"""Convert the MUDD authors' checkpoints (and plain GPT-NeoX / Llama models) into Hub-loadable folders.

A thin entry point: the converter lives in `modeling_muddpythia.convert` (also installed as `mudd-convert`); the
arguments are parsed by `modeling_muddpythia.cli_convert` before torch is imported, so `--help` is immediate.

    python conversion_scripts/convert_to_hf.py --format authors-pytorch --input MUDDPythia-1.4B --output out
"""

import sys
from pathlib import Path

try:
    from modeling_muddpythia.cli_convert import main
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from modeling_muddpythia.cli_convert import main


if __name__ == "__main__":
    sys.exit(main())
