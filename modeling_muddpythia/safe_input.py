"""Reading only inside what the user named: file names from an input's own metadata, and links.

A checkpoint folder lists files by name (a shard index's `weight_map`, tokenizer files found in it, chunk files of
a TensorStore array). Those names must be plain file names (no folders, no `..`, not absolute), and a link inside
the folder must point inside it. The one exception is the Hugging Face Hub cache, the most common input of all: a
snapshot folder `models--ORG--NAME/snapshots/REVISION/` is made of links into `models--ORG--NAME/blobs/`, which
count as inside. The input the user names may itself be a link: it is what they chose. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .safe_output import display

_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


class UnsafeInputError(ValueError):
    """An input names or links to something outside the folder or file the user gave; the message names it."""


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where files of `folder` may really live: inside `folder`, and for a Hub cache snapshot folder the
    repository's `blobs/` folder too."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(_HUB_REPO_PREFIXES):
        roots.append(real.parent.parent / "blobs")
    return tuple(roots)


def plain_name(name: object, where: str) -> str:
    """`name` when it is a plain file name (no folder part, not `.`/`..`, not absolute), else `UnsafeInputError`."""
    if (
        not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
        or os.path.isabs(name)
    ):
        raise UnsafeInputError(
            f"{where}: lists {name!r}, which is not a plain file name inside the folder; refusing to read it"
        )
    return name


def inside(folder: Path, name: str, where: str | None = None) -> Path:
    """`folder / name`, after checking that `name` is a plain file name and that the file (following links) lies
    inside `allowed_roots(folder)`; a missing file is returned as is (the caller says it is missing)."""
    plain_name(name, where or display(folder))
    path = folder / name
    check_link(path, allowed_roots(folder))
    return path


def check_link(path: Path, roots: tuple[Path, ...]) -> None:
    """`UnsafeInputError` when `path` is (or passes through) a link that leads outside every one of `roots`."""
    if not os.path.lexists(path):
        return
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise UnsafeInputError(
            f"{display(path)} is a link to {display(real)}, outside the input folder {display(roots[0])}; refusing "
            "to read it (copy the file into the folder if you trust it)"
        )


def check_tree(folder: Path) -> None:
    """`check_link` for every entry under `folder` (links to folders are checked, not followed)."""
    roots = allowed_roots(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                check_link(path, roots)


# The largest metadata file (config, shard index, TensorStore `_METADATA`) read into memory: real ones are a few
# kB to a few MB; a larger one is refused before it is read.
METADATA_LIMIT = 64 * 2**20


def read_bounded(path: Path, limit: int = METADATA_LIMIT) -> bytes:
    """The bytes of `path`, or `UnsafeInputError` when it holds more than `limit` bytes (a device or FIFO, which
    has no size, is read up to the limit). OS errors propagate for the caller to name."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeInputError(f"{display(path)}: larger than {limit} bytes, too large for a metadata file; refused")
    return data
