"""quiet_third_party drops progress bars and lm-eval's bootstrap lines, and passes every other line through."""

from __future__ import annotations

import io
import sys

from tqdm import tqdm

from modeling_muddpythia.progress import LineFilter, quiet_third_party, stage_bar


def test_quiet_third_party_keeps_warnings_and_drops_bars(capsys):
    with quiet_third_party() as real_stderr:
        print("bootstrapping for stddev: perplexity")
        print("a result line")
        for _ in tqdm(range(3), desc="Running loglikelihood requests", mininterval=0):
            pass
        print("a warning from a library", file=sys.stderr)
        with stage_bar(total=2, desc="our stage", file=real_stderr) as bar:
            bar.update(2)
    out, err = capsys.readouterr()
    assert out == "a result line\n"
    assert "Running loglikelihood" not in err
    assert "a warning from a library\n" in err
    assert "our stage" in err


def test_line_filter_forwards_partial_lines_at_the_end():
    target = io.StringIO()
    stream = LineFilter(target, lambda line: line.startswith("drop"))
    stream.write("keep 1\ndro")
    stream.write("p this\nkeep")
    stream.close_filter()
    assert target.getvalue() == "keep 1\nkeep"
