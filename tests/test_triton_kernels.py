"""The Triton kernels of the dense aggregation (`mudd_triton.py`), run on the CPU by Triton's interpreter.

On CUDA machines these kernels do the eager aggregation of every prefill and training step; here they are checked
against the matmul formulation, as custom ops (`torch.library.opcheck`) and inside a model's training step.
Triton comes with the `test` extra on Linux x86-64; elsewhere these tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

ROOT = Path(__file__).resolve().parent.parent

# TRITON_INTERPRET is read when Triton is imported, so the checks run in a fresh interpreter.
CHECK = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, "tests")
    from modeling_muddpythia import mudd, mudd_triton
    assert mudd_triton._INTERPRETED and mudd_triton.triton is not None

    g = torch.Generator().manual_seed(0)
    # the ops use the kernels at any size (the models call them from 256 positions on)
    weights = torch.randn(2, 3, 4, 5, generator=g)
    buffer = torch.randn(2, 3, 7, 48, generator=g)
    torch.library.opcheck(torch.ops.mudd.aggregate.default, (weights, buffer, 5))
    grad_streams = torch.randn(4, 2, 3, 48, generator=g)
    torch.library.opcheck(
        torch.ops.mudd.aggregate_backward_.default, (weights, buffer, torch.zeros_like(buffer), grad_streams, 5)
    )
    streams = torch.ops.mudd.aggregate(weights, buffer, 5)
    expected = torch.einsum("btcj,btjd->cbtd", weights.double(), buffer[:, :, :5].double())
    print("forward", (streams.double() - expected).abs().max().item())
    accumulator = torch.ones_like(buffer)
    grad_weights = torch.ops.mudd.aggregate_backward_(weights, buffer, accumulator, grad_streams, 5)
    expected_w = torch.einsum("cbtd,btjd->btcj", grad_streams.double(), buffer[:, :, :5].double())
    expected_x = torch.einsum("btcj,cbtd->btjd", weights.double(), grad_streams.double())
    print("grad_weights", (grad_weights.double() - expected_w).abs().max().item())
    print("grad_states", (accumulator[:, :, :5].double() - 1 - expected_x).abs().max().item())
    print("untouched", (accumulator[:, :, 5:] - 1).abs().max().item())

    # a model's training step with the kernels (260 positions) against the same step with batched matmuls
    from test_compile import build, training_step
    model = build("pythia", max_position_embeddings=256).train()
    ids = torch.randint(1, 61, (2, 128), generator=g)
    assert mudd._use_triton(torch.empty(2, 128, 4, 2), torch.empty(2, 128, 4, 32))
    loss, grads = training_step(model, {"input_ids": ids, "labels": ids})
    mudd_triton._INTERPRETED = False
    loss_ref, grads_ref = training_step(model, {"input_ids": ids, "labels": ids})
    print("loss", abs(loss.item() - loss_ref.item()))
    print("model_grads", max((grads[n] - grads_ref[n]).abs().max().item() for n in grads_ref))
    """
)


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split() for line in result.stdout.splitlines() if line.split()[0] in {
        "forward", "grad_weights", "grad_states", "untouched", "loss", "model_grads",
    })
    # float32 kernels against float64 einsums of O(1) values over <= 48 terms
    assert float(values["forward"]) < 1e-5 and float(values["grad_weights"]) < 1e-4
    assert float(values["grad_states"]) < 1e-5 and float(values["untouched"]) == 0.0
    assert float(values["loss"]) < 1e-5 and float(values["model_grads"]) < 1e-5, values
