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
from torch.nn import functional as F

from .mudd_triton import (
    aggregate_backward_matmul, aggregate_matmul, triton_aggregation_available, weights_gradient_matmul,
)


TRITON_MIN_POSITIONS = 256
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
        # `rms_norm` normalises in float32 (float64 stays float64) and returns the input dtype; on GPUs it is one
        # fused kernel. The scale multiplies the rounded result, as in the released models.
        hidden_states = F.rms_norm(hidden_states, hidden_states.shape[-1:], eps=self.eps)
        if self.weight is None:
            return hidden_states
        return self.weight * hidden_states

    def inverse_rms(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`1 / sqrt(mean(x^2) + eps)` of each row, `[..., 1]`, in (at least) float32."""
        norm = torch.linalg.vector_norm(hidden_states, dim=-1, keepdim=True)  # accumulates in float32 or better
        norm = norm.to(torch.promote_types(norm.dtype, torch.float32))
        return torch.rsqrt(norm.square() / hidden_states.shape[-1] + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, elementwise_affine={self.weight is not None}"


class DenseStateStack:
    """The states `X_0 .. X_j` seen so far in one forward pass, and how the aggregations read them.

    Three regimes, chosen when the stack is opened:

    * compiled or exported (`torch.compiler.is_compiling()`): the states are kept as a list and each aggregation
      is a plain sum of products (`functional_aggregate`), which dynamo, AOTAutograd and `torch.export` trace like
      any other op and the compiler fuses with the norms around it;
    * eager without autograd: each state is written once into `buffer` (`[batch, seq, capacity, hidden]`), from
      which every aggregation reads all earlier states with one kernel instead of re-stacking them at each layer;
    * eager with autograd: the same buffer, plus a *carrier*, a tensor threaded through every write and
      aggregation (`_OpenStates`, `_AppendState`, `_AggregateStates`). Its gradient is one accumulator shaped like
      the buffer: in backward, each aggregation adds the gradients of all states it read into it, and each state's
      write node hands the state its completed slot. So the states' gradients are summed in place rather than as
      O(L^2) separate tensors, with no state outside autograd: repeated, retained and partial backward passes each
      get their own accumulator.
    """

    def __init__(self, first_state: torch.Tensor, capacity: int, device: torch.device | None = None):
        device = device or first_state.device
        first_state = first_state.to(device)
        self.capacity = capacity
        self.dtype, self.device = first_state.dtype, first_state.device
        self.functional = torch.compiler.is_compiling()
        self.num_states = 1
        # Compiled: the states themselves. Eager: the buffer holds them, so no reference is kept (in inference a
        # block's output can then be freed once the next block has read its streams).
        self.states: list[torch.Tensor] = [first_state] if self.functional else []
        self.buffer: torch.Tensor | None = None
        self.carrier: torch.Tensor | None = None
        if self.functional:
            return
        batch_size, seq_length, hidden_size = first_state.shape
        self.buffer = first_state.new_empty(batch_size, seq_length, capacity, hidden_size)
        if torch.is_grad_enabled() and first_state.requires_grad:
            self.carrier = _OpenStates.apply(first_state, self.buffer)
        else:
            self.buffer.select(2, 0).copy_(first_state)

    @property
    def requires_grad(self) -> bool:
        """Whether the aggregations must route gradients to the states (eager path)."""
        return self.carrier is not None

    def append(self, state: torch.Tensor) -> None:
        """Record the next state `[batch, seq, hidden]`."""
        index = self.num_states
        if index >= self.capacity:
            raise RuntimeError(f"DenseStateStack holds at most {self.capacity} states")
        self.num_states += 1
        if self.functional:
            self.states.append(state.to(self.device))
            return
        state = state.to(self.device)
        if torch.is_grad_enabled() and (self.carrier is not None or state.requires_grad):
            self.carrier = _AppendState.apply(self._carrier(), state, self.buffer, index)
        else:
            with torch.no_grad():
                self.buffer.select(2, index).copy_(state)

    def _carrier(self) -> torch.Tensor:
        # None: no state so far needs a gradient, so a chain starts here
        return _expanded_zero(self.buffer) if self.carrier is None else self.carrier

    def __len__(self) -> int:
        return self.num_states


def _expanded_zero(buffer: torch.Tensor) -> torch.Tensor:
    """A carrier value: shaped like the buffer (its gradient is the accumulator), one element of memory."""
    return buffer.new_zeros(()).expand(buffer.shape)


def _new_accumulator(buffer: torch.Tensor, grad_carrier: torch.Tensor | None) -> torch.Tensor:
    # The carrier has exactly one consumer (the next node of the chain), so its gradient is the accumulator that
    # node handed back, owned by this pass: adding into it in place is safe. None: nothing later ran in this pass.
    return torch.zeros_like(buffer) if grad_carrier is None else grad_carrier


class _OpenStates(torch.autograd.Function):
    """Writes `X_0` into slot 0 of the buffer and starts the carrier chain; backward hands `X_0` its slot."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        buffer.select(2, 0).copy_(state.detach())
        ctx.set_materialize_grads(False)
        return _expanded_zero(buffer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_carrier: torch.Tensor | None):
        return (None if grad_carrier is None else grad_carrier.select(2, 0)), None


class _AppendState(torch.autograd.Function):
    """Writes state `index` into the buffer. In backward every aggregation that read the state has already added
    into the accumulator (they all come later in the chain), so its slot is the state's complete dense gradient."""

    @staticmethod
    def forward(ctx, carrier: torch.Tensor, state: torch.Tensor, buffer: torch.Tensor, index: int) -> torch.Tensor:
        buffer.select(2, index).copy_(state.detach())
        ctx.index = index
        ctx.set_materialize_grads(False)
        return _expanded_zero(buffer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_carrier: torch.Tensor | None):
        if grad_carrier is None:
            return None, None, None, None
        # Later nodes only touch slots < index, so this view's values are final.
        return grad_carrier, grad_carrier.select(2, ctx.index), None, None


class _AggregateStates(torch.autograd.Function):
    """`streams[c] = sum_j weights[..., c, j] * X_j` over the first `J` slots of the buffer, in the carrier chain.

    Nothing of size `[.., J, hidden]` is saved per layer: the states are read back from the buffer (later writes
    only touch slots >= J) and their gradients are added into the accumulator the carrier brings back.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, carrier: torch.Tensor, buffer: torch.Tensor):
        num_states = weights.shape[-1]
        ctx.save_for_backward(weights)
        ctx.buffer = buffer.detach()  # a plain reference, not a saved tensor: later slots are written in place
        ctx.num_states = num_states
        ctx.set_materialize_grads(False)
        streams = aggregate_buffer(weights, buffer, num_states)
        return streams, _expanded_zero(buffer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_streams: torch.Tensor | None, grad_carrier: torch.Tensor | None):
        (weights,) = ctx.saved_tensors
        buffer, num_states = ctx.buffer, ctx.num_states
        if grad_streams is None:  # only a later node's gradient passes through
            return None, grad_carrier, None
        if ctx.needs_input_grad[1]:
            accumulator = _new_accumulator(buffer, grad_carrier)
            grad_weights = aggregate_buffer_backward(weights, buffer, accumulator, grad_streams, num_states)
        else:  # only the weights need a gradient
            accumulator = None
            grad_weights = weights_gradient_matmul(buffer, grad_streams, num_states)
        return (grad_weights if ctx.needs_input_grad[0] else None), accumulator, None


def functional_aggregate(weights: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The aggregation as plain elementwise ops, for the compiler: `weights` `[batch, seq, C, J]`, `J` states
    `[batch, seq, hidden]` -> `C` streams. The compiler turns the sums into one fused loop over the states (and
    their gradients into fused reductions), with nothing stacked; eagerly it would be `C * J` kernels."""
    weights = weights.unsqueeze(-1)
    streams = []
    for c in range(weights.shape[2]):
        stream = weights[:, :, c, 0] * states[0]
        for j in range(1, len(states)):
            stream = stream + weights[:, :, c, j] * states[j]
        streams.append(stream)
    return tuple(streams)


def _use_triton(weights: torch.Tensor, buffer: torch.Tensor) -> bool:
    # The Triton kernels pay off for prefill and training; for a few decode positions their launch costs more.
    return weights.shape[0] * weights.shape[1] >= TRITON_MIN_POSITIONS and triton_aggregation_available(buffer)


def aggregate_buffer(weights: torch.Tensor, buffer: torch.Tensor, num_states: int) -> torch.Tensor:
    """`weights` `[batch, seq, C, J]` (contiguous) mix the first `J` slots of `buffer` `[batch, seq, capacity,
    hidden]` -> streams, stream-major `[C, batch, seq, hidden]`."""
    if _use_triton(weights, buffer):
        return torch.ops.mudd.aggregate(weights, buffer, num_states)
    return aggregate_matmul(weights, buffer, num_states)


def aggregate_buffer_backward(weights, buffer, grad_buffer, grad_streams, num_states) -> torch.Tensor:
    """Add each state's gradient into `grad_buffer[:, :, :J]` and return the weights' gradient `[b, t, C, J]`."""
    if _use_triton(weights, buffer):
        return torch.ops.mudd.aggregate_backward_(weights, buffer, grad_buffer, grad_streams, num_states)
    return aggregate_backward_matmul(weights, buffer, grad_buffer, grad_streams, num_states)


def aggregate_states(weights: torch.Tensor, stack: DenseStateStack) -> tuple[torch.Tensor, ...]:
    """Mix the states of `stack` with `weights` `[batch, seq, C, J]` into C streams, each `[batch, seq, hidden]`."""
    num_states = len(stack)
    if weights.shape[-1] != num_states:
        raise ValueError(f"dense weights cover {weights.shape[-1]} states but {num_states} were produced")
    weights = weights.to(stack.dtype)
    # Under autocast the states are mixed in their own dtype, like a residual add (float32 under bf16 autocast):
    # autocast would also give the aggregation a low-precision output whose gradient no longer matches the
    # float32 states in its backward.
    with torch.autocast(stack.device.type, enabled=False):
        if stack.functional:
            return functional_aggregate(weights, stack.states)
        weights = weights.contiguous()
        if torch.is_grad_enabled() and (weights.requires_grad or stack.requires_grad):
            chained = stack.requires_grad
            streams, carrier = _AggregateStates.apply(weights, stack._carrier(), stack.buffer)
            if chained:  # else the states need no gradient, and the carrier stays out of later backward passes
                stack.carrier = carrier
            return streams.unbind(0)
        return aggregate_buffer(weights, stack.buffer, num_states).unbind(0)


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
        training = torch.is_grad_enabled() and layer_output.requires_grad
        if training and not torch.is_autocast_enabled(layer_output.device.type):
            # W1 . rmsnorm(x) = (W1 . x) / rms(x): the norm becomes one factor per position on the narrow hidden
            # layer, so autograd keeps x (alive anyway) for backward instead of a normalised copy of it. Not under
            # autocast: a low-precision W1 . x on the unnormalised input measurably worsens the gradients there.
            scale = self.weight_norm.weight
            hidden = self.proj_in(layer_output if scale is None else layer_output * scale)
            hidden = hidden * self.weight_norm.inverse_rms(layer_output).to(hidden.dtype)
        else:  # inference: one `rms_norm` call (a single fused kernel on GPUs), as decoding is op-bound
            hidden = self.proj_in(self.weight_norm(layer_output))
        dynamic = self.proj_out(self.act(hidden))
        return dynamic.unflatten(-1, (self.num_streams, self.num_states)) + self.static_weights

    def forward(self, layer_output: torch.Tensor, stack: DenseStateStack) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Args:
            layer_output: `X_{i+1}`, `[batch, seq, hidden]`, already appended to `stack` (possibly pre-normed).
            stack: all states `X_0 .. X_{i+1}`.

        Returns the `C` streams for the next block (each `[batch, seq, hidden]`) and the weights `[batch, seq, C, i+2]`.
        """
        weights = self.compute_weights(layer_output)
        streams = aggregate_states(weights, stack)
        if self.post_norm is not None:
            streams = (*streams[:-1], layer_output + self.post_norm(streams[-1]).to(layer_output.dtype))
        return streams, weights

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

    @classmethod
    def from_config(cls, config, eps: float) -> "MUDDDenseConnections":
        """Build from a MUDD family config's `dense_*` fields (`dense_prenorm`/`dense_postnorm` where it has them)."""
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            streams=config.dense_streams,
            dynamic=config.dynamic_dense,
            expand_last=config.dense_expand_last,
            round64=config.dense_round64,
            eps=eps,
            prenorm=getattr(config, "dense_prenorm", False),
            postnorm=getattr(config, "dense_postnorm", False),
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
