"""The performance-minded code paths of the MUDD decoder, against plain references.

The shared gradient accumulator of the dense aggregation (retained, repeated and partial backward passes), the
aggregation under autocast, the rotary formulation, the input-length check with static caches, and a
`torch.compile(fullgraph=True)` decoding step with a `StaticCache`.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import StaticCache

from modeling_muddpythia.modeling_mudd_decoder import MUDDRotaryEmbedding, apply_partial_rotary, signed_rotary_tables
from modeling_muddpythia.mudd import DenseStateStack, aggregate_states

from test_muddpythia import VOCAB, random_model, tiny_config


def _states_and_weights(num_layers=3, streams=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    states = [torch.randn(2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(num_layers + 1)]
    weights = [
        torch.randn(2, 5, streams, i + 2, dtype=torch.float64, generator=generator, requires_grad=True)
        for i in range(num_layers)
    ]
    return states, weights


def _mudd_outputs(states, weights):
    stack = DenseStateStack(states[0], len(states))
    outputs = []
    for i, w in enumerate(weights):
        stack.append(states[i + 1])
        outputs.append(torch.stack(aggregate_states(w, stack), 2))
    return outputs


def _reference_outputs(states, weights):
    return [torch.einsum("btcj,jbtd->btcd", w, torch.stack(states[: w.shape[-1]])) for w in weights]


def _loss(outputs, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return sum((out * torch.randn(out.shape, dtype=out.dtype, generator=generator)).sum() for out in outputs)


def test_aggregation_gradients_over_retained_and_partial_passes():
    states, weights = _states_and_weights()
    leaves = states + weights
    outputs = _mudd_outputs(states, weights)
    reference = _reference_outputs(states, weights)
    for got, expected in zip(outputs, reference):
        assert torch.allclose(got, expected)
    expected_all = torch.autograd.grad(_loss(reference), leaves, retain_graph=True)
    # a pass that stops early (only the newest state) must not leave its sums behind for the next pass
    (partial,) = torch.autograd.grad(_loss(outputs), [states[2]], retain_graph=True)
    assert torch.allclose(partial, expected_all[2])
    for _ in range(2):  # repeated full passes over the retained graph agree with the reference every time
        got_all = torch.autograd.grad(_loss(outputs), leaves, retain_graph=True)
        for got, expected in zip(got_all, expected_all):
            assert torch.allclose(got, expected)
    # only the first aggregation in the graph: gradients reach exactly the states it mixed
    first_only = torch.autograd.grad(outputs[0].sum(), states[:2] + [weights[0]])
    expected_first = torch.autograd.grad(reference[0].sum(), states[:2] + [weights[0]])
    for got, expected in zip(first_only, expected_first):
        assert torch.allclose(got, expected)


def test_aggregation_gradients_when_a_state_is_frozen():
    states, weights = _states_and_weights()
    states[0] = states[0].detach()  # e.g. frozen embeddings
    loss = _loss(_mudd_outputs(states, weights))
    expected = torch.autograd.grad(_loss(_reference_outputs(states, weights)), states[1:] + weights)
    for got, want in zip(torch.autograd.grad(loss, states[1:] + weights), expected):
        assert torch.allclose(got, want)


def test_aggregation_keeps_the_states_dtype_under_autocast():
    states, weights = _states_and_weights()
    states = [s.detach().float().requires_grad_() for s in states]
    weights = [w.detach().float().requires_grad_() for w in weights]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = _mudd_outputs(states, weights)
    assert all(out.dtype == torch.float32 for out in outputs)
    _loss(outputs).backward()
    assert all(s.grad.dtype == torch.float32 for s in states)
    expected = _reference_outputs([s.detach() for s in states], [w.detach() for w in weights])
    assert all(torch.allclose(got, want, atol=1e-5) for got, want in zip(outputs, expected))


@pytest.mark.parametrize("partial_rotary_factor", [0.25, 1.0])
def test_rotary_equals_rotate_half_formula(partial_rotary_factor):
    config = tiny_config(hidden_size=64, num_attention_heads=2, partial_rotary_factor=partial_rotary_factor)
    rotary = MUDDRotaryEmbedding(config)
    positions = torch.tensor([[0, 3, 7], [1, 2, 40]])
    x = torch.randn(2, 2, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, signed_sin = signed_rotary_tables(*rotary(x, positions))
    got = apply_partial_rotary(x, cos, signed_sin)
    # the textbook GPT-NeoX form: x_rot * cos + rotate_half(x_rot) * sin on the first rotary dims
    rotary_dim = config.rotary_ndims
    half = rotary_dim // 2
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions[:, None, :, None].double() * inv_freq
    cos_ref, sin_ref = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x_rot = x[..., :rotary_dim]
    rotated = x_rot * cos_ref + torch.cat((-x_rot[..., half:], x_rot[..., :half]), -1) * sin_ref
    expected = torch.cat((rotated, x[..., rotary_dim:]), -1)
    # the module's angle tables are float32 (as in transformers): ~1e-6 off at position 40; a wrong sign or
    # permutation is off by O(1)
    assert got.shape == x.shape and (got - expected).abs().max().item() < 1e-4


def test_static_cache_larger_than_the_model_decodes_past_the_limit():
    """A StaticCache longer than `max_position_embeddings` decodes past it as GPT-NeoX/Llama do: same logits as one
    pass without a cache."""
    model = random_model(seed=2, attn="sdpa")  # max_position_embeddings 64
    ids = torch.randint(1, VOCAB, (1, 67), generator=torch.Generator().manual_seed(2))
    cache = StaticCache(config=model.config, max_cache_len=80)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :62], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(62, 67)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_static_cache_decode_step_compiles_in_one_graph():
    # backend="eager" runs dynamo's graph capture only, which is where graph breaks happen, in a few seconds
    model = random_model(seed=3, attn="sdpa")
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        torch._dynamo.reset()
        step = torch.compile(model.forward, fullgraph=True, backend="eager")
        steps = []
        for position in range(6, 9):
            positions = torch.full((2, 1), position)
            out = step(input_ids=ids[:, position : position + 1], position_ids=positions, past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full[:, 6:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("prenorm", [False, True])
def test_weight_generator_training_and_inference_paths_agree(prenorm):
    from modeling_muddpythia.mudd import DepthAggregator

    torch.manual_seed(0)
    aggregator = DepthAggregator(16, layer_idx=2, num_layers=5, eps=1e-5, prenorm=prenorm).double()
    with torch.no_grad():
        for param in aggregator.parameters():
            param.normal_()
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    folded = aggregator.compute_weights(x)  # autograd records: the norm is folded into the hidden layer
    with torch.no_grad():
        normalised = aggregator.compute_weights(x)  # inference: the normalised input
    scale = aggregator.weight_norm.weight if prenorm else 1.0
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale
    hidden = torch.nn.functional.gelu(normed @ aggregator.proj_in.weight.T)
    expected = (hidden @ aggregator.proj_out.weight.T).view(2, 3, 4, 4) + aggregator.static_weights
    assert torch.allclose(folded, expected) and torch.allclose(normalised, expected)
