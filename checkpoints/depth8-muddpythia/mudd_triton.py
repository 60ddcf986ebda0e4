"""Triton kernels for the depth aggregation on CUDA.

`Y[c, p] = sum_j W[p, c, j] * X[p, j]` per position `p` is a batch of tiny matrix products (C <= 4 rows, J <= L+1
columns). cuBLAS runs it 4-15x slower than the memory-bandwidth limit (measured on an H100, 1.4B shape), so on CUDA
we use these kernels: one program per position (and hidden block), a loop over the states, float32 accumulation.
The output is stream-major `[C, batch, seq, hidden]`, so each stream is contiguous for the norms that follow.
"""

from __future__ import annotations

import torch


try:  # Triton ships with CUDA builds of PyTorch; without it the matmul path in mudd.py is used.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def triton_aggregation_available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


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


def triton_aggregate_forward(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> torch.Tensor:
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


def triton_aggregate_backward(
    weights: torch.Tensor, buffer: torch.Tensor, grad_buffer: torch.Tensor, grad_out: torch.Tensor, num_states: int
) -> torch.Tensor:
    """Add the states' gradients into `grad_buffer` (same layout as `buffer`); return the weights' gradient."""
    grad_out = grad_out.contiguous()
    batch, seq, num_streams, _ = weights.shape
    hidden = buffer.shape[-1]
    positions = batch * seq
    grad_weights = torch.zeros(weights.shape, device=weights.device, dtype=torch.float32)
    block_d = min(512, triton.next_power_of_2(hidden))
    _aggregate_backward_kernel[(positions, triton.cdiv(hidden, block_d))](
        weights, buffer, grad_out, grad_buffer, grad_weights, num_states, hidden,
        weights.stride(1), weights.stride(2), buffer.stride(1), buffer.stride(2), grad_out.stride(0), hidden,
        NUM_STREAMS=num_streams, STREAMS_POW2=max(2, triton.next_power_of_2(num_streams)), BLOCK_D=block_d,
    )
    return grad_weights.to(weights.dtype)
