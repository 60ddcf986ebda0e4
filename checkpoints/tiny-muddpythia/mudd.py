"""Multiway dynamic dense (MUDD) connections, shared by every MUDD model family.

After block `i` (0-based) of an `L`-block network has produced `X_{i+1}`, the dense connection reads `X_{i+1}`
at each position and produces weights that mix *all* states `X_0 .. X_{i+1}` (`X_0` = embeddings) into the
`C` input streams (query, key, value, residual) of block `i + 1`:

    w      = W2_i . gelu(W1_i . rmsnorm(X_{i+1})) + b_i         # [batch, seq, C, i + 2]
    Y_c    = sum_j w[c, j] * X_j                                 # c in (q, k, v, r)

The last block gets a single stream (`C = 1`) which feeds the final norm. With `W2_i = 0` and `b_i` one-hot on
the newest state every stream equals `X_{i+1}`: a freshly initialised MUDD model *is* the plain residual
Transformer, which is also how plain checkpoints are "muddified".
"""

from __future__ import annotations

import torch
from torch import nn


STREAM_NAMES = {"qkvr": ("query", "key", "value", "residual"), "r": ("residual",)}


def dense_hidden_width(num_streams: int, num_states: int, is_last: bool, expand_last: bool, round64: bool) -> int:
    """Width of `W1_i`, following the released checkpoints.

    `round64` always adds a block of 64, even when the width is already a multiple of 64 (a quirk of the
    authors' code that the released weights depend on).
    """
    width = num_streams * num_states
    if is_last and expand_last:
        width *= 4
    if round64:
        width = (width // 64 + 1) * 64
    return width


def reallocated_ffn_width(intermediate_size: int, layer_idx: int, num_layers: int) -> int:
    """FFN width of layer `layer_idx` under the paper's depth-wise re-allocation (0.5x .. 1.5x, multiple of 128).

    Python's `round` (banker's rounding) is what the released checkpoints used.
    """
    if num_layers == 1:
        return intermediate_size
    return round(intermediate_size * (layer_idx / (num_layers - 1) + 0.5) / 128) * 128


class MUDDRMSNorm(nn.Module):
    """RMSNorm computed in (at least) float32; `elementwise_affine=False` gives the scale-free norm of the weight
    generator.

    Input `[..., hidden_size]`, output of the same shape and dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.eps)).to(input_dtype)
        if self.weight is None:
            return hidden_states
        return self.weight * hidden_states

    def extra_repr(self) -> str:
        return f"eps={self.eps}, elementwise_affine={self.weight is not None}"


class DenseStateStack:
    """The states `X_0 .. X_j` seen so far in one forward pass.

    They are kept twice without copying more than once: `buffer` (`[batch, seq, capacity, hidden]`, written once
    per state) lets every aggregation read all earlier states with one batched matmul instead of re-stacking
    them at each layer; `states` keeps the autograd-tracked tensors so that gradients reach each block.
    """

    def __init__(self, first_state: torch.Tensor, capacity: int, device: torch.device | None = None):
        batch_size, seq_length, hidden_size = first_state.shape
        self.buffer = first_state.new_empty(
            batch_size, seq_length, capacity, hidden_size, device=device or first_state.device
        )
        self.states: list[torch.Tensor] = []
        self.append(first_state)

    def append(self, state: torch.Tensor) -> None:
        if len(self.states) >= self.buffer.shape[2]:
            raise RuntimeError(f"DenseStateStack holds at most {self.buffer.shape[2]} states")
        self.buffer[:, :, len(self.states)] = state.detach()
        self.states.append(state)

    def __len__(self) -> int:
        return len(self.states)


class _DepthAggregate(torch.autograd.Function):
    """`out[b, t, c] = sum_j weights[b, t, c, j] * buffer[b, t, j]` with gradients routed to each state.

    The states are read from the shared buffer in forward and backward, so nothing of size `[.., J, hidden]`
    is saved per layer (a naive stack + einsum keeps O(L^2) activations alive for backward).
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, buffer: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
        num_states = len(states)
        ctx.save_for_backward(weights)
        # Later layers only write to slots >= num_states, so this prefix is unchanged at backward time.
        ctx.buffer = buffer
        ctx.num_states = num_states
        return torch.matmul(weights, buffer[:, :, :num_states])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weights,) = ctx.saved_tensors
        history = ctx.buffer[:, :, : ctx.num_states]
        grad_weights = torch.matmul(grad_output, history.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_history = torch.matmul(weights.transpose(-1, -2), grad_output)
        return (grad_weights, None, *grad_history.unbind(2))


def aggregate_states(weights: torch.Tensor, stack: DenseStateStack) -> torch.Tensor:
    """Mix the states of `stack`: `weights` `[batch, seq, C, J]` -> streams `[batch, seq, C, hidden]`."""
    num_states = len(stack)
    if weights.shape[-1] != num_states:
        raise ValueError(f"dense weights cover {weights.shape[-1]} states but {num_states} were produced")
    weights = weights.to(stack.buffer.dtype)
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or any(s.requires_grad for s in stack.states))
    if not needs_grad:
        return torch.matmul(weights, stack.buffer[:, :, :num_states])
    states = [s.to(stack.buffer.device) for s in stack.states]
    return _DepthAggregate.apply(weights, stack.buffer, *states)


class DepthAggregator(nn.Module):
    """The dense connection after block `layer_idx`: weight generator, static weights and aggregation.

    Args:
        hidden_size: model width `D`.
        layer_idx: index `i` of the block whose output this connection reads; it mixes `i + 2` states.
        num_layers: total number of blocks `L`; the last block's connection makes one stream.
        num_streams: streams made for the next block (4 for "qkvr", 1 for "r").
        dynamic: whether the position-dependent weights `W2 . gelu(W1 . norm(x))` are used (else only `b_i`).
        expand_last / round64: width rules of `W1` (see `dense_hidden_width`).
        eps: epsilon of the weight generator's RMSNorm.
        prenorm: MaxText `mudd_prenorm`: the generator's RMSNorm gets a learned scale.
        postnorm: MaxText `mudd_postnorm`: the residual stream becomes `X_{i+1} + rmsnorm(sum_j w[r, j] X_j)`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_layers: int,
        num_streams: int = 4,
        dynamic: bool = True,
        expand_last: bool = True,
        round64: bool = True,
        eps: float = 1e-6,
        prenorm: bool = False,
        postnorm: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_last = layer_idx == num_layers - 1
        self.num_states = layer_idx + 2
        self.num_streams = 1 if self.is_last else num_streams
        # b_i; its init (one-hot on the newest state, or zeros) happens in the models' `_init_weights`.
        self.static_weights = nn.Parameter(torch.zeros(self.num_streams, self.num_states))
        self.zero_static_init = prenorm and postnorm
        if dynamic:
            width = dense_hidden_width(self.num_streams, self.num_states, self.is_last, expand_last, round64)
            self.weight_norm = MUDDRMSNorm(hidden_size, eps, elementwise_affine=prenorm)
            self.proj_in = nn.Linear(hidden_size, width, bias=False)
            self.act = nn.GELU()
            self.proj_out = nn.Linear(width, self.num_streams * self.num_states, bias=False)
        else:
            self.proj_in = self.proj_out = None
        self.post_norm = MUDDRMSNorm(hidden_size, eps) if postnorm else None

    def compute_weights(self, layer_output: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, hidden]` -> mixing weights `[batch, seq, C, i + 2]` (stream-major, as in the checkpoints)."""
        if self.proj_in is None:
            return self.static_weights.expand(*layer_output.shape[:-1], -1, -1)
        dynamic = self.proj_out(self.act(self.proj_in(self.weight_norm(layer_output))))
        return dynamic.unflatten(-1, (self.num_streams, self.num_states)) + self.static_weights

    def forward(self, layer_output: torch.Tensor, stack: DenseStateStack) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Args:
            layer_output: `X_{i+1}`, `[batch, seq, hidden]`, already appended to `stack` (possibly pre-normed).
            stack: all states `X_0 .. X_{i+1}`.

        Returns the `C` streams for the next block (each `[batch, seq, hidden]`) and the weights `[batch, seq, C, i+2]`.
        """
        weights = self.compute_weights(layer_output)
        mixed = aggregate_states(weights, stack)
        streams = list(mixed.unbind(2))
        if self.post_norm is not None:
            streams[-1] = layer_output + self.post_norm(streams[-1]).to(layer_output.dtype)
        return tuple(streams), weights

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, num_streams={self.num_streams}, num_states={self.num_states}"


class MUDDDenseConnections(nn.Module):
    """All dense connections of an `L`-block model, plus the per-depth state norms of `mudd_prenorm`.

    Kept as one module so that `device_map` places the whole (tiny) aggregation machinery, including the state
    buffer, on one device; accelerate's hooks move each layer output here and each stream to its next block.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        streams: str = "qkvr",
        dynamic: bool = True,
        expand_last: bool = True,
        round64: bool = True,
        eps: float = 1e-6,
        prenorm: bool = False,
        postnorm: bool = False,
    ):
        super().__init__()
        if streams not in STREAM_NAMES:
            raise ValueError(f"dense streams must be one of {sorted(STREAM_NAMES)}, got {streams!r}")
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DepthAggregator(
                hidden_size, i, num_layers, len(STREAM_NAMES[streams]), dynamic, expand_last, round64, eps,
                prenorm, postnorm,
            )
            for i in range(num_layers)
        )
        # mudd_prenorm: X_j enters the aggregation as rmsnorm_j(X_j), one learned scale per depth j = 0..L.
        self.state_norms = (
            nn.ModuleList(MUDDRMSNorm(hidden_size, eps) for _ in range(num_layers + 1)) if prenorm else None
        )

    def _as_state(self, depth: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if self.state_norms is None else self.state_norms[depth](hidden_states)

    def start(self, embeddings: torch.Tensor) -> DenseStateStack:
        """Open the state stack of one forward pass with `X_0` (`[batch, seq, hidden]`)."""
        device = self.layers[0].static_weights.device
        if device.type == "meta":
            device = embeddings.device
        embeddings = embeddings.to(device)
        return DenseStateStack(self._as_state(0, embeddings), self.num_layers + 1, device=device)

    def forward(
        self, layer_idx: int, layer_output: torch.Tensor, stack: DenseStateStack
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Record `X_{i+1}` = output of block `layer_idx` and return the next block's streams and the weights."""
        if len(stack) != layer_idx + 1:
            raise ValueError(f"block {layer_idx} output arrives with {len(stack)} states on the stack, expected {layer_idx + 1}")
        stack.append(self._as_state(layer_idx + 1, layer_output))
        return self.layers[layer_idx](layer_output, stack)


def init_dense_connection_(module: nn.Module) -> None:
    """Identity initialisation of a `DepthAggregator` (spec section 5): `W2 = 0`, `b` one-hot on the newest state.

    With MaxText's prenorm and postnorm both on, `b` starts at 0 and the post-norm scale at 0.001. Parameters that
    were loaded from a checkpoint (flagged `_is_hf_initialized` by transformers) are left alone.
    """
    if not isinstance(module, DepthAggregator):
        return
    if module.proj_out is not None:
        nn.init.zeros_(module.proj_out.weight)
    if not getattr(module.static_weights, "_is_hf_initialized", False):
        with torch.no_grad():
            module.static_weights.zero_()
            if not module.zero_static_init:
                module.static_weights[:, -1] = 1.0
    if module.post_norm is not None:
        nn.init.constant_(module.post_norm.weight, 0.001)
