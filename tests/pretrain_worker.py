"""`mudd-pretrain` in a process of its own, for tests/test_pretrain.py.

    python pretrain_worker.py kill-at STEP -- <mudd-pretrain args>

runs the command and sends itself SIGKILL right after optimizer step STEP (before that step's checkpoint could be
saved): the hard stop of a preempted job, with no chance to clean up.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

from modeling_muddpythia import pretrain


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, step = sys.argv[1], int(sys.argv[2])
    if mode != "kill-at":
        raise SystemExit(f"unknown mode {mode!r}")
    build = pretrain.build_trainer

    def build_with_kill(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(KillAt(step))
        return trainer

    pretrain.build_trainer = build_with_kill
    sys.exit(pretrain.main(sys.argv[sys.argv.index("--") + 1:]))
