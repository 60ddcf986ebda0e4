"""Install the pinned torch into the running interpreter's environment (`make setup` calls this).

    python tools/install_torch.py --version 2.13.0 --build cpu --index https://download.pytorch.org/whl/cpu
    python tools/install_torch.py --version 2.13.0 --build pypi

`--build cpu` installs from PyTorch's CPU wheel index (about 190 MB instead of the CUDA build's 2.7 GB). When that
index cannot be reached, or has no wheel for this platform, it falls back to the plain pin from pip's usual index
and says so. `--build pypi` installs the plain pin directly (on Linux x86_64 PyPI's torch is the CUDA build).
Either way it ends by printing which build is now installed, and writes that line to `<venv>/torch-build.txt`.
Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path


def index_reachable(index: str, timeout: float) -> str | None:
    """None if `index`/torch/ answers, else the reason it does not."""
    url = index.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read(1)
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"{url}: {getattr(error, 'reason', error)}"


def pip_install(*args: str) -> int:
    command = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+ " + " ".join(command), flush=True)
    return subprocess.call(command)


def installed_build() -> str:
    """One line: the installed torch version and whether it is a CPU or a CUDA/ROCm build."""
    version = metadata.version("torch")
    gpu_packages = sorted(
        {d.metadata["Name"] for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")}
    )
    local = version.partition("+")[2]
    if local.startswith(("cu", "rocm")) or gpu_packages:
        kind = f"GPU build ({local or 'CUDA'}, {len(gpu_packages)} nvidia-* packages)"
    else:
        kind = "CPU build"
    return f"torch {version}: {kind}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="torch version to pin, e.g. 2.13.0")
    parser.add_argument("--build", choices=["cpu", "pypi"], default="cpu",
                        help="cpu: from --index, falling back to the plain pin; pypi: the plain pin (default: cpu)")
    parser.add_argument("--index", default="https://download.pytorch.org/whl/cpu",
                        help="the wheel index used by --build cpu (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the index (default: 15)")
    args = parser.parse_args(argv)
    pin = f"torch=={args.version}"

    source = "pip's usual index, plain pin"
    if args.build == "cpu":
        problem = index_reachable(args.index, args.timeout)
        if problem is None:
            if pip_install("--index-url", args.index, pin) == 0:
                source = args.index
            else:
                problem = f"pip could not install {pin} from {args.index} (no wheel for this platform?)"
        if problem is not None:
            print(f"\n*** torch: the wheel index is not usable ({problem}).\n"
                  f"*** Falling back to the plain pin {pin} from pip's usual index: on Linux x86_64 that is the CUDA\n"
                  f"*** build (about 2.7 GB) unless a CPU wheel is already at hand (pip cache, --find-links).\n",
                  file=sys.stderr, flush=True)
    if source != args.index and pip_install(pin) != 0:
        print(f"torch: pip could not install {pin}", file=sys.stderr)
        return 1

    line = f"{installed_build()} (from {source})"
    print(f"\n>>> {line}\n", flush=True)
    Path(sys.prefix, "torch-build.txt").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
