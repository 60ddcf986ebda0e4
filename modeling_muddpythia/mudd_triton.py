"""Triton kernels for the depth aggregation on CUDA, as `torch.library` custom ops.

`Y[c, p] = sum_j W[p, c, j] * X[p, j]` per position `p` is a batch of tiny matrix products (C <= 4 rows, J <= L+1
columns). cuBLAS runs it 4-15x slower than the memory-bandwidth limit (measured on an H100, 1.4B shape), so on CUDA
we use these kernels: one program per position (and hidden block), a loop over the states, float32 accumulation.
The output is stream-major `[C, batch, seq, hidden]`, so each stream is contiguous for the norms that follow.

The kernels enter PyTorch as the custom ops `mudd::aggregate` and `mudd::aggregate_backward_` (with fake
implementations, so that tracing sees their shapes). Eager training and prefill on CUDA use them; compiled models
use the plain formulation of `mudd.functional_aggregate`, which the compiler fuses with the surrounding norms. Off
CUDA (or without Triton) the ops run the same arithmetic as batched matmuls, which is what their tests check.
"""

from __future__ import annotations

import os

import torch


try:  # Triton ships with CUDA builds of PyTorch; without it the matmul path in mudd.py is used.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# Triton's interpreter (TRITON_INTERPRET=1, read when Triton is imported) runs the kernels on CPU tensors: that is how
# the tests check them on machines without a GPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_aggregation_available(tensor: torch.Tensor) -> bool:
    return triton is not None and (tensor.is_cuda or (_INTERPRETED and tensor.device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _aggregate_forward_kernel(
        weights, states, out, num_states, hidden,
        stride_wp, stride_wc, stride_sp, stride_sj, stride_oc, stride_op,
        NUM_STREAMS: tl.constexpr, STREAMS_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        position = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < hidden
        offs_c = tl.arange(0, STREAMS_POW2)
        mask_c = offs_c < NUM_STREAMS
        acc = tl.zeros([STREAMS_POW2, BLOCK_D], dtype=tl.float32)
        for j in range(num_states):
            x = tl.load(states + position * stride_sp + j * stride_sj + offs_d, mask=mask_d, other=0.0)
            w = tl.load(weights + position * stride_wp + offs_c * stride_wc + j, mask=mask_c, other=0.0)
            acc += w.to(tl.float32)[:, None] * x.to(tl.float32)[None, :]
        out_ptrs = out + offs_c[:, None] * stride_oc + position * stride_op + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=mask_c[:, None] & mask_d[None, :])

    @triton.jit
    def _aggregate_backward_kernel(
        weights, states, grad_out, grad_states, grad_weights, num_states, hidden,
        stride_wp, stride_wc, stride_sp, stride_sj, stride_gc, stride_gp,
        NUM_STREAMS: tl.constexpr, STREAMS_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # grad_states[p, j] += sum_c W[p, c, j] * G[c, p];  grad_weights[p, c, j] += <G[c, p], X[p, j]> over this
        # block of the hidden dim (float32 atomics: the blocks of one position run in parallel).
        position = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < hidden
        offs_c = tl.arange(0, STREAMS_POW2)
        mask_c = offs_c < NUM_STREAMS
        g = tl.load(
            grad_out + offs_c[:, None] * stride_gc + position * stride_gp + offs_d[None, :],
            mask=mask_c[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        for j in range(num_states):
            w = tl.load(weights + position * stride_wp + offs_c * stride_wc + j, mask=mask_c, other=0.0)
            x = tl.load(states + position * stride_sp + j * stride_sj + offs_d, mask=mask_d, other=0.0)
            grad_ptrs = grad_states + position * stride_sp + j * stride_sj + offs_d
            previous = tl.load(grad_ptrs, mask=mask_d, other=0.0).to(tl.float32)
            update = tl.sum(w.to(tl.float32)[:, None] * g, axis=0)
            tl.store(grad_ptrs, (previous + update).to(grad_states.dtype.element_ty), mask=mask_d)
            partial = tl.sum(g * x.to(tl.float32)[None, :], axis=1)
            tl.atomic_add(grad_weights + position * stride_wp + offs_c * stride_wc + j, partial, mask=mask_c)


def aggregate_matmul(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> torch.Tensor:
    """The aggregation as one batched matmul (off CUDA, and for few positions): `weights` `[batch, seq, C, J]`,
    `buffer` `[batch, seq, capacity, hidden]` -> streams `[C, batch, seq, hidden]` (a stream-major view)."""
    return torch.matmul(weights, buffer[:, :, :num_states]).movedim(2, 0)


def weights_gradient_matmul(buffer: torch.Tensor, grad_streams: torch.Tensor, num_states: int) -> torch.Tensor:
    """`grad_weights[b, t, c, j] = <grad_streams[c, b, t], buffer[b, t, j]>` -> `[batch, seq, C, J]`."""
    return torch.matmul(grad_streams.movedim(0, 2), buffer[:, :, :num_states].transpose(-1, -2))


def aggregate_backward_matmul(weights, buffer, grad_buffer, grad_streams, num_states) -> torch.Tensor:
    """Adds each state's gradient into `grad_buffer[:, :, :J]`; returns the weights' gradient `[batch, seq, C, J]`."""
    grad_buffer[:, :, :num_states] += torch.matmul(weights.transpose(-1, -2), grad_streams.movedim(0, 2))
    return weights_gradient_matmul(buffer, grad_streams, num_states)


def _triton_aggregate(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> torch.Tensor:
    """`weights` `[batch, seq, C, J]` (contiguous), `buffer` `[batch, seq, capacity, hidden]` ->
    streams `[C, batch, seq, hidden]`."""
    batch, seq, num_streams, _ = weights.shape
    hidden = buffer.shape[-1]
    positions = batch * seq
    flat_weights = weights.view(positions, num_streams, num_states)
    flat_states = buffer.view(positions, buffer.shape[2], hidden)
    out = torch.empty(num_streams, batch, seq, hidden, device=buffer.device, dtype=buffer.dtype)
    block_d = min(512, triton.next_power_of_2(hidden))
    grid = (positions, triton.cdiv(hidden, block_d))
    _aggregate_forward_kernel[grid](
        flat_weights, flat_states, out, num_states, hidden,
        flat_weights.stride(0), flat_weights.stride(1), flat_states.stride(0), flat_states.stride(1),
        out.stride(0), hidden,
        NUM_STREAMS=num_streams, STREAMS_POW2=max(2, triton.next_power_of_2(num_streams)), BLOCK_D=block_d,
    )
    return out


def _triton_aggregate_backward(weights, buffer, grad_buffer, grad_streams, num_states) -> torch.Tensor:
    grad_streams = grad_streams.contiguous()
    batch, seq, num_streams, _ = weights.shape
    hidden = buffer.shape[-1]
    positions = batch * seq
    grad_weights = torch.zeros(weights.shape, device=weights.device, dtype=torch.float32)
    block_d = min(512, triton.next_power_of_2(hidden))
    _aggregate_backward_kernel[(positions, triton.cdiv(hidden, block_d))](
        weights, buffer, grad_streams, grad_buffer, grad_weights, num_states, hidden,
        weights.stride(1), weights.stride(2), buffer.stride(1), buffer.stride(2), grad_streams.stride(0), hidden,
        NUM_STREAMS=num_streams, STREAMS_POW2=max(2, triton.next_power_of_2(num_streams)), BLOCK_D=block_d,
    )
    return grad_weights.to(weights.dtype)


def _check_layout(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> None:
    if weights.dim() != 4 or buffer.dim() != 4 or weights.shape[:2] != buffer.shape[:2]:
        raise ValueError(
            f"mudd aggregation: weights {tuple(weights.shape)} must be [batch, seq, C, J] and buffer "
            f"{tuple(buffer.shape)} [batch, seq, capacity, hidden] with the same batch and seq"
        )
    if not 0 < num_states <= buffer.shape[2] or weights.shape[-1] != num_states:
        raise ValueError(f"mudd aggregation: {num_states} states for weights {tuple(weights.shape)} and buffer {tuple(buffer.shape)}")
    if not weights.is_contiguous() or not buffer.is_contiguous():
        raise ValueError("mudd aggregation: weights and buffer must be contiguous")


def _define_ops() -> None:
    # Importing this file twice (the installed package and a model folder's remote code) must not define the ops
    # twice: the first definition serves both.
    if hasattr(torch.ops, "mudd") and hasattr(torch.ops.mudd, "aggregate"):
        return

    @torch.library.custom_op("mudd::aggregate", mutates_args=())
    def aggregate(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> torch.Tensor:
        """`streams[c] = sum_j weights[..., c, j] * buffer[:, :, j]` for j < num_states -> `[C, batch, seq, hidden]`."""
        _check_layout(weights, buffer, num_states)
        if triton_aggregation_available(buffer):
            return _triton_aggregate(weights, buffer, num_states)
        return aggregate_matmul(weights, buffer, num_states).contiguous()

    @aggregate.register_fake
    def _(weights, buffer, num_states):
        return buffer.new_empty(weights.shape[2], weights.shape[0], weights.shape[1], buffer.shape[3])

    @torch.library.custom_op("mudd::aggregate_backward_", mutates_args=("grad_buffer",))
    def aggregate_backward_(
        weights: torch.Tensor, buffer: torch.Tensor, grad_buffer: torch.Tensor, grad_streams: torch.Tensor, num_states: int
    ) -> torch.Tensor:
        """Adds `sum_c weights[..., c, j] * grad_streams[c]` into `grad_buffer[:, :, j]` (j < num_states) and returns
        the weights' gradient `[batch, seq, C, J]`."""
        _check_layout(weights, buffer, num_states)
        if grad_buffer.shape != buffer.shape or grad_streams.shape != (weights.shape[2], *buffer.shape[:2], buffer.shape[3]):
            raise ValueError(
                f"mudd aggregation backward: grad_buffer {tuple(grad_buffer.shape)} / grad_streams "
                f"{tuple(grad_streams.shape)} do not match buffer {tuple(buffer.shape)} and weights {tuple(weights.shape)}"
            )
        if triton_aggregation_available(buffer):
            return _triton_aggregate_backward(weights, buffer, grad_buffer, grad_streams, num_states)
        return aggregate_backward_matmul(weights, buffer, grad_buffer, grad_streams, num_states)

    @aggregate_backward_.register_fake
    def _(weights, buffer, grad_buffer, grad_streams, num_states):
        return torch.empty_like(weights)

    def _setup_context(ctx, inputs, output):
        weights, buffer, num_states = inputs
        ctx.save_for_backward(weights, buffer)
        ctx.num_states = num_states

    def _backward(ctx, grad_streams):
        weights, buffer = ctx.saved_tensors
        grad_buffer = torch.zeros_like(buffer)
        grad_weights = torch.ops.mudd.aggregate_backward_(weights, buffer, grad_buffer, grad_streams, ctx.num_states)
        return grad_weights, grad_buffer, None

    # A standalone gradient (the models route the states' gradients through `mudd.DenseStateStack` instead).
    aggregate.register_autograd(_backward, setup_context=_setup_context)


_define_ops()
