"""Command-line entry point: `mudd <command>` (or `python -m modeling_muddpythia.cli <command>`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO_ROOT / "configuration" / "muddpythia-tiny.json"

_REMOTE_GENERATE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_muddpythia"] = None  # prove the folder works without our package
    import torch
    from transformers import AutoModelForCausalLM
    folder, prompt = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=int(sys.argv[3]), do_sample=False)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "tokens": out[0].tolist()}))
    """
)


def _demo(args: argparse.Namespace) -> int:
    from . import MUDDPythiaConfig, MUDDPythiaForCausalLM

    config = MUDDPythiaConfig.from_json_file(args.preset)
    torch.manual_seed(args.seed)
    model = MUDDPythiaForCausalLM(config).eval()
    dense = sum(p.numel() for n, p in model.named_parameters() if ".dense." in n)
    total = sum(p.numel() for p in model.parameters())
    print(f"Built MUDDPythia from {args.preset}: {total:,} parameters, of which {dense:,} "
          f"({100 * dense / (total - dense):.2f}% extra) in the dense connections.")

    output = Path(args.output)
    model.save_pretrained(output)
    print(f"Saved with remote code to {output}: {sorted(p.name for p in output.iterdir())}")

    prompt = [int(t) % config.vocab_size for t in range(1, 9)]
    local = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)[0].tolist()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_GENERATE, str(output), json.dumps(prompt), str(args.max_new_tokens)],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        print("Remote-code load in a fresh process FAILED", file=sys.stderr)
        return 1
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"Reloaded in a fresh process (package hidden) as {remote['class']}")
    print(f"prompt:             {prompt}")
    print(f"greedy, in-process: {local[len(prompt):]}")
    print(f"greedy, remote:     {remote['tokens'][len(prompt):]}")
    if remote["tokens"] != local:
        print("MISMATCH between in-process and remote-code generation", file=sys.stderr)
        return 1
    print("OK: identical generations.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mudd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="build a small MUDDPythia from a preset, save it with remote code, reload it in a fresh "
        "process with trust_remote_code and generate"
    )
    demo.add_argument("--preset", default=str(DEFAULT_PRESET), help="JSON config preset (see configuration/)")
    demo.add_argument("--output", default="outputs/demo", help="folder to save the model to")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
