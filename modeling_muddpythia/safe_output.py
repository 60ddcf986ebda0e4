"""Writing an output folder safely: an exclusive claim on it, a hidden staging folder, fsync, one rename, and an
ownership marker so that nothing the tool did not write is ever removed.

Used by `mudd-convert` (the whole output folder is published at once) and by the training engine of
`mudd-finetune` / `mudd-pretrain` (`training.OwnedOutput`); each passes its `tool` name. Nothing here imports torch
or transformers.

* `Claim(output, tool)`: an exclusive lock (`fcntl.flock` on the hidden file `.NAME.lock` beside the output) held
  for the whole run. A second run on the same output fails at once, naming the holder's pid. The kernel drops the
  lock when its holder dies, so a killed run never blocks later ones.
* Ownership: every published folder carries the marker file `OWNER_MARKER` (JSON naming the tool). `owner(folder)`
  reads it; `check_replaceable(output, tools)` refuses to replace (`--force`) a folder without a marker of one of
  `tools`, and is checked again at the moment of replacement.
* Staging (`.NAME.partial-PID-RANDOM`, or a fixed suffix) and replaced-folder (`.NAME.replaced-PID-RANDOM`) siblings carry the marker
  file `CLAIM_MARKER` from the moment they are created. While the claim is held such siblings can only be left over
  by dead runs: `remove_stale` deletes those that carry the marker, and leaves every other sibling alone (and says
  so), whatever its name.
* `make_staging` creates the staging folder with `os.mkdir`, so its mode follows the umask (as `save_pretrained`'s
  folders do; `tempfile.mkdtemp` would give 0700).
* `publish` fsyncs every file and folder of the staging folder, renames it into place (an existing output, with
  `--force`, is replaced only at that moment) and fsyncs the parent. `staged(output, tool)` is the two together: a
  block writes into the staging folder, which gets the owner marker and is published when the block succeeds, and
  is removed in any case.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputError(Exception):
    """A problem with an output or input path; the message names the path and the cause (one line)."""


def display(path: str | os.PathLike) -> str:
    """`path` as text that can always be printed or written: bytes that are not UTF-8 appear as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of this path is a file, not a folder",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "it is a folder, not a file",
}


def describe_os_error(error: OSError, path: str | os.PathLike | None = None, action: str | None = None) -> str:
    """One line: `PATH: cannot ACTION: CAUSE` from an `OSError` (its own filename wins over `path`)."""
    where = error.filename if error.filename is not None else path
    cause = _HINTS.get(error.errno) or error.strerror or str(error)
    if error.strerror and error.errno in _HINTS and error.strerror.lower() not in cause.lower():
        cause = f"{cause} ({error.strerror})"
    prefix = f"{display(where)}: " if where is not None else ""
    return f"{prefix}{'cannot ' + action + ': ' if action else ''}{cause}"


def reraise_with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """The same error with `path` as its filename (errors of `file.write` carry none)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), os.fspath(path))


def same_or_nested(a: Path, b: Path) -> bool:
    """Whether `a` and `b` (resolved) are the same path or one contains the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def ensure_parent(output: Path) -> None:
    """Create the parent folders of `output` (umask modes); a parent that is a file is named clearly."""
    parent = output.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise OutputError(f"{display(output)}: cannot create it: {display(ancestor)} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, parent, "create the folder")) from None


class Claim:
    """An exclusive claim on `output` for one run (see the module docstring); use as a context manager."""

    def __init__(self, output: Path, tool: str):
        self.output, self.tool = output, tool
        self.lock_path = output.parent / f".{output.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> Claim:
        ensure_parent(self.output)
        for _ in range(100):
            try:  # never through a link: the lock file is truncated and rewritten
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise OutputError(f"{display(self.lock_path)} is a link; remove it (this lock file is never "
                                      "written through a link)") from None
                raise OutputError(describe_os_error(error, self.lock_path, f"create the lock file for {display(self.output)}")) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"{display(self.lock_path)} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"{display(self.output)}: another {self.tool} run (pid {holder}) is writing this output right now; "
                    "wait for it to finish (--force replaces a finished folder, never one being written)"
                ) from None
            # The previous holder unlinks the file before unlocking: if ours is no longer the file at that path,
            # we locked a deleted inode and must try again.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)
        raise OutputError(f"{display(self.lock_path)}: could not take the lock (it keeps being replaced)")

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# The marker files; both are small JSON objects naming the tool ({"written_by": TOOL} / {"claimed_by": TOOL, "pid": N}).
OWNER_MARKER = ".mudd-output.json"
CLAIM_MARKER = ".mudd-claim.json"
_MARKER_LIMIT = 4096  # bytes read from a marker: a marker is tiny, a huge "marker" is not ours


def _read_marker(folder: Path, name: str) -> dict | None:
    """The JSON object in `folder/name` when `folder` is a real folder (not a link) and the marker a regular file."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, _MARKER_LIMIT))  # a longer file is cut, fails to parse: not ours
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def _write_marker(folder: Path, name: str, content: dict) -> None:
    path = folder / name
    try:
        path.write_text(json.dumps(content) + "\n", encoding="utf-8")
    except OSError as error:
        raise OutputError(describe_os_error(error, path, "write the marker file")) from None


def owner(folder: Path) -> str | None:
    """The tool whose marker `folder` carries (`OWNER_MARKER`), or None when it carries none."""
    marker = _read_marker(folder, OWNER_MARKER)
    written_by = marker.get("written_by") if marker else None
    return written_by if isinstance(written_by, str) else None


def mark_owner(folder: Path, tool: str) -> None:
    """Write the ownership marker of `tool` into `folder` (done by `staged` just before publishing)."""
    _write_marker(folder, OWNER_MARKER, {"written_by": tool})


def check_replaceable(output: Path, tools: tuple[str, ...]) -> None:
    """`OutputError` unless `output` is absent or a folder that one of `tools` wrote (its `OWNER_MARKER`)."""
    if not output.exists() and not output.is_symlink():
        return
    if output.is_symlink():  # replacing would swap the link, never what the marker check looked at
        raise OutputError(f"{display(output)} is a link; refusing to replace it")
    if not output.is_dir():
        raise OutputError(f"{display(output)} exists and is not a folder; refusing to replace it")
    found = owner(output)
    if found not in tools:
        written = f"was written by {found}" if found else f"has no {OWNER_MARKER} marker"
        raise OutputError(
            f"{display(output)} {written}, so {' or '.join(tools)} will not replace it even with --force; "
            "move it away or choose another output folder"
        )


def stale_siblings(output: Path) -> list[Path]:
    """Staging and replaced-folder siblings of `output` that a run of this package made (they carry
    `CLAIM_MARKER`); while the claim is held, only dead runs can have left them."""
    prefixes = tuple(f".{output.name}.{kind}-" for kind in ("partial", "replaced"))
    try:
        candidates = sorted(p for p in output.parent.iterdir() if p.name.startswith(prefixes))
    except OSError as error:
        raise OutputError(describe_os_error(error, output.parent, "list the folder")) from None
    return [path for path in candidates if _read_marker(path, CLAIM_MARKER) is not None]


def remove_stale(output: Path, log: Callable[[str], None]) -> None:
    """Remove the leftovers `stale_siblings` finds (call it only while holding the claim); other siblings stay."""
    for path in stale_siblings(output):
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {display(path)}, left behind by an interrupted run")


def _claimed_folder(path: Path, tool: str) -> Path:
    """Create the folder `path` with `CLAIM_MARKER` in it (mode from the umask)."""
    try:
        os.mkdir(path)
    except OSError as error:
        raise OutputError(describe_os_error(error, path, "create the staging folder")) from None
    _write_marker(path, CLAIM_MARKER, {"claimed_by": tool, "pid": os.getpid()})
    return path


def staging_path(output: Path, suffix: str) -> Path:
    """The hidden sibling `.NAME.partial-SUFFIX` of `output` (`stale_siblings` recognises the pattern)."""
    return output.parent / f".{output.name}.partial-{suffix}"


def make_staging(output: Path, tool: str, suffix: str | None = None) -> Path:
    """A new staging folder `staging_path(output, suffix)`, carrying `CLAIM_MARKER`. The default suffix, PID-RANDOM,
    is unique; a fixed one lets every process of a multi-process run know the path."""
    return _claimed_folder(staging_path(output, suffix or f"{os.getpid()}-{secrets.token_hex(4)}"), tool)


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (deepest first), so a rename publishes data that is on disk."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath), directory=True)


def publish(staging: Path, output: Path, tool: str) -> None:
    """fsync `staging`, then rename it to `output`; an existing `output` is replaced only at this point, only when
    `check_replaceable(output, (tool,))` allows it, and restored if the second rename fails. `CLAIM_MARKER` is
    removed from `staging` first, so the published folder does not carry it."""
    (staging / CLAIM_MARKER).unlink(missing_ok=True)
    fsync_tree(staging)
    if not output.exists() and not output.is_symlink():
        os.replace(staging, output)
    else:
        check_replaceable(output, (tool,))
        holder = _claimed_folder(output.parent / f".{output.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}", tool)
        os.replace(output, holder / output.name)
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(holder / output.name, output)
            raise
        finally:
            if output.exists():
                shutil.rmtree(holder, ignore_errors=True)
    fsync_path(output.parent, directory=True)


@contextlib.contextmanager
def staged(output: Path, tool: str) -> Iterator[Path]:
    """A staging folder for `output` (`make_staging`): marked as written by `tool` and published over `output`
    (`publish`) when the block ends without an error, removed whatever happens."""
    staging = make_staging(output, tool)
    try:
        yield staging
        mark_owner(staging, tool)
        publish(staging, output, tool)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
