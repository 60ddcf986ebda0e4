"""Peak memory of `mudd-convert` on a synthetic checkpoint shaped like the authors' MUDDPythia-2.8B release.

Writes an authors-pytorch folder (config.json + one bf16 model.safetensors of ~5.6 GB, random weights), converts
it in a child process and reports the child's peak resident set size against the checkpoint size. The folders
are deleted afterwards unless --keep is given. A benchmark, not a test:

    python benchmarks/convert_memory.py [--workdir DIR] [--max-shard-size 5GB] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_muddpythia.configuration_muddpythia import MUDDPythiaConfig
from modeling_muddpythia.convert_io import ShardedSafetensorsWriter
from modeling_muddpythia.convert_plans import FAMILIES, authors_plan


# The released MUDDPythia-2.8B, in the authors' config.json keys (CHECKPOINT_FORMATS.md A).
AUTHORS_CONFIG = {
    "model_type": "muddpythia", "dim": 2560, "n_head": 32, "n_layer": 32, "intermediate_size": 10240, "head_dim": 80,
    "norm_eps": 1e-5, "rope_base": 10000, "rotary_pct": 0.25, "use_qk_norm": True, "use_parallel_residual": True,
    "use_linear_bias": True, "dense_type": "qkvr", "expand_last": True, "round64": True, "sepln": True,
    "block_size": 2048, "vocab_size": 50432, "bos_token_id": 0, "eos_token_id": 0,
}


def write_checkpoint(folder: Path) -> int:
    """The authors' names and shapes for the 2.8B config, streamed to disk one tensor at a time; returns bytes."""
    config = MUDDPythiaConfig(
        vocab_size=50432, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240,
    )
    rules = authors_plan(config, FAMILIES["muddpythia"]).rules
    layout = [(rule.sources[0], rule.source_shapes[0], torch.bfloat16) for rule in rules]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(AUTHORS_CONFIG, indent=2))
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_bytes=10**12)
    generator = torch.Generator().manual_seed(0)
    for name, shape, dtype in layout:
        writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
    writer.finish()
    return writer.total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to write the folders (default: a temporary directory)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mudd-convert-bench-"))
    source, output = workdir / "MUDDPythia-2.8B-synthetic", workdir / "converted"
    try:
        start = time.perf_counter()
        size = write_checkpoint(source)
        print(f"wrote a {size / 1e9:.2f} GB synthetic checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
        command = [sys.executable, "-m", "modeling_muddpythia.convert", "--format", "authors-pytorch",
                   "--input", str(source), "--output", str(output), "--max-shard-size", args.max_shard_size]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
        print(f"converted in {seconds:.0f} s; peak RSS of the converter {peak / 1e9:.2f} GB "
              f"= {peak / size:.2f} x the checkpoint size ({size / 1e9:.2f} GB)")
    finally:
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
