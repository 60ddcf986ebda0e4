"""Progress without noise: our own progress bars, and third-party output reduced to what a person should read.

`quiet_third_party()` is a context manager for long library calls (lm-eval above all). Inside it:

* progress bars that libraries draw on stderr (tqdm's carriage-return lines: lm-eval's per-request bars, the
  bootstrap bars, transformers' "Loading weights") are dropped, and so are empty lines (tqdm writes a bare newline
  to step over a nested bar); every other stderr line (warnings, errors) is passed through unchanged;
* stdout lines starting with one of `DROPPED_STDOUT_PREFIXES` (lm-eval's "bootstrapping for stddev: ...") are
  dropped, every other line is passed through.

It yields the real stderr, for the caller's own progress bar (`stage_bar`).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator

DROPPED_STDOUT_PREFIXES = ("bootstrapping for stddev",)


def is_progress_bar_line(line: str) -> bool:
    """tqdm redraws its bar with a carriage return (and cursor-movement escapes for nested bars)."""
    return "\r" in line or "\x1b[" in line


class LineFilter(io.TextIOBase):
    """A text stream that forwards whole lines to `target` unless `drop(line)` is true."""

    def __init__(self, target, drop: Callable[[str], bool]):
        self.target, self.drop, self.pending = target, drop, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.drop(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_filter(self) -> None:
        if self.pending and not self.drop(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")


@contextlib.contextmanager
def quiet_third_party() -> Iterator:
    out, err = sys.stdout, sys.stderr
    stdout = LineFilter(out, lambda line: line.startswith(DROPPED_STDOUT_PREFIXES))
    stderr = LineFilter(err, lambda line: not line.strip() or is_progress_bar_line(line))
    restore = []
    try:
        import transformers

        if transformers.utils.logging.is_progress_bar_enabled():
            transformers.utils.logging.disable_progress_bar()
            restore.append(transformers.utils.logging.enable_progress_bar)
    except ImportError:
        pass
    sys.stdout, sys.stderr = stdout, stderr
    try:
        yield err
    finally:
        sys.stdout, sys.stderr = out, err
        stdout.close_filter()
        stderr.close_filter()
        for undo in restore:
            undo()


def stage_bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", file=None):
    """One progress bar for one stage of a job, on `file` (default: the current stderr)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=file or sys.stderr, dynamic_ncols=True)
