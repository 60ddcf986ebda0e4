"""MUDDPythia: arithmetic against independent references, and every transformers interface a user touches."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.cache_utils import StaticCache

from modeling_muddpythia import MUDDPythiaConfig, MUDDPythiaForCausalLM, MUDDPythiaModel, muddify
from modeling_muddpythia.mudd import DenseStateStack, aggregate_states

from helpers import assert_gradient_checkpointing_keeps_gradients
from mudd_reference import randomize_, reference_logits, spec_params_from_model


VOCAB = 61


def tiny_config(**overrides) -> MUDDPythiaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    values.update(overrides)
    return MUDDPythiaConfig(**values)


def random_model(seed: int = 0, dtype=torch.float32, attn: str = "eager", **overrides) -> MUDDPythiaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn
    model = MUDDPythiaForCausalLM(config).to(dtype).eval()
    randomize_(model, seed=seed)
    return model


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("parallel", [True, False])
def test_muddified_gpt_neox_matches_transformers(parallel):
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, use_parallel_residual=parallel, rotary_pct=0.5,
    )
    plain = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mis-mapped tensor shows
        for name, param in plain.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    mudd = muddify(plain)
    assert isinstance(mudd, MUDDPythiaForCausalLM) and not mudd.training
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        expected, got = plain(ids).logits, mudd(ids).logits
    assert (expected - got).abs().max().item() < 1e-5
    # identity connections: every stream is the newest state
    dense = mudd.model.dense.layers
    assert all(torch.equal(layer.proj_out.weight, torch.zeros_like(layer.proj_out.weight)) for layer in dense)


def test_muddify_keeps_dtype_and_rejects_other_models():
    plain = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).to(torch.bfloat16)
    mudd = muddify(plain)
    assert {p.dtype for p in mudd.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="muddify supports"):
        muddify(torch.nn.Linear(2, 2))


REFERENCE_CASES = {
    "release": {},
    "sequential": dict(use_parallel_residual=False),
    "single_stream": dict(dense_streams="r"),
    "static_only": dict(dynamic_dense=False),
    "no_qk_norm_block0_norms": dict(use_qk_norm=False, separate_stream_norms_first_layer=True),
    "shared_norms_no_round": dict(separate_stream_norms=False, dense_round64=False, dense_expand_last=False),
    "gqa_no_realloc": dict(num_key_value_heads=2, ffn_width_reallocation=False),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_float64_reference(case):
    model = random_model(seed=3, dtype=torch.float64, num_hidden_layers=4, **REFERENCE_CASES[case])
    config = model.config
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
    expected = reference_logits(
        spec_params_from_model(model), ids,
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
        head_dim=config.attention_head_dim, rotary_ndims=config.rotary_ndims,
        rope_theta=config.rope_parameters["rope_theta"], eps=config.layer_norm_eps,
        parallel_residual=config.use_parallel_residual,
    )
    assert expected.abs().max() > 1.0  # a meaningful, non-degenerate comparison
    # The rotary tables are float32 (as in transformers), which bounds the agreement at ~1e-6; every other
    # operation runs in float64, and a wrong formula anywhere shows up orders of magnitude above this.
    assert (got - expected).abs().max().item() < 1e-5


def test_layer_widths_follow_the_spec():
    # intermediate 256 over 5 layers: 256 * (i/4 + .5) / 128 = 1, 1.5, 2, 2.5, 3 -> banker's rounding 1, 2, 2, 2, 3
    config = tiny_config(num_hidden_layers=5, intermediate_size=256)
    model = MUDDPythiaModel(config)
    assert [layer.mlp.up_proj.out_features for layer in model.layers] == [128, 256, 256, 256, 384]
    # W1 widths: C*(i+2) -> (x // 64 + 1) * 64; last layer C=1, x4: 1*6*4 = 24 -> 64
    assert [d.proj_in.out_features for d in model.dense.layers] == [64, 64, 64, 64, 64]
    assert [d.proj_out.out_features for d in model.dense.layers] == [8, 12, 16, 20, 6]
    wide = MUDDPythiaModel(tiny_config(num_hidden_layers=16, intermediate_size=512))
    # layer 13: 4 * 15 = 60 -> 64; layer 14: 4 * 16 = 64 -> 128 (round64 always adds); last: 1 * 17 * 4 = 68 -> 128
    widths = [d.proj_in.out_features for d in wide.dense.layers]
    assert widths[0] == 64 and widths[14] == 128 and widths[15] == 128 and widths[13] == 64
    assert [d.static_weights.shape for d in wide.dense.layers][-1] == (1, 17)
    # the released sizes: MUDDPythia-2.8B's last FFN is 1.5 * 10240
    assert MUDDPythiaConfig.from_json_file("configuration/muddpythia-2.8b.json").ffn_width(31) == 15360


def test_depth_aggregate_gradients():
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(4)]
    weights = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator, requires_grad=True)

    def aggregate(w, *xs):
        stack = DenseStateStack(xs[0], 6)
        for x in xs[1:]:
            stack.append(x)
        return torch.stack(aggregate_states(w, stack), 2)

    assert torch.autograd.gradcheck(aggregate, (weights, *states))
    plain = torch.einsum("btcj,jbtd->btcd", weights, torch.stack(states))
    assert torch.allclose(aggregate(weights, *states), plain)


# --------------------------------------------------------------------------- cache, masks, attention backends


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward(attn):
    model = random_model(seed=1, attn=attn)
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :5], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    # float32: the cached path sums attention over the same keys in another order
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_static_cache_decoding_equals_full_forward():
    model = random_model(seed=2, attn="sdpa")
    ids = torch.randint(1, VOCAB, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        logits = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]
        for t in range(4, 10):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(logits, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_real_tokens(attn):
    model = random_model(seed=4, attn=attn)
    a = torch.randint(1, VOCAB, (1, 9))
    b = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits, model(b).logits
        # left padding, positions from the mask as generate() does
        ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = (torch.arange(9)[None] >= torch.tensor([[0], [4]])).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(ids, attention_mask=mask, position_ids=positions).logits
        # right padding
        ids_r = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
        right = model(ids_r, attention_mask=mask.flip(-1)).logits
    assert (left[0] - ref_a[0]).abs().max() < 1e-5 and (left[1, 4:] - ref_b[0]).abs().max() < 1e-5
    assert (right[0] - ref_a[0]).abs().max() < 1e-5 and (right[1, :5] - ref_b[0]).abs().max() < 1e-5
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


def test_sdpa_equals_eager():
    eager = random_model(seed=5, attn="eager")
    sdpa = random_model(seed=5, attn="sdpa")
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        assert (eager(ids).logits - sdpa(ids).logits).abs().max().item() < 1e-4


def test_loaded_attention_implementations():
    model = random_model()
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn


# --------------------------------------------------------------------------- generation


def test_left_padded_batched_greedy_equals_one_by_one():
    model = random_model(seed=6, attn="sdpa")
    model.generation_config.pad_token_id = 0
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 3, 5)]
    longest = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, longest:]
    for row, prompt in enumerate(prompts):
        single = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(batched[row], single[0, len(prompt):])


def test_greedy_generate_matches_manual_argmax_loop():
    model = random_model(seed=7)
    ids = torch.randint(1, VOCAB, (1, 4))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    manual = ids
    with torch.no_grad():
        for _ in range(6):
            manual = torch.cat([manual, model(manual).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, manual)


def test_sampling_and_beam_search():
    model = random_model(seed=8)
    ids = torch.randint(1, VOCAB, (2, 4))
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    again = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, eos_token_id=None, pad_token_id=0)
    assert sampled.shape == (2, 9) and torch.equal(sampled, again)
    beams = model.generate(
        ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, eos_token_id=None,
        pad_token_id=0, output_scores=True, return_dict_in_generate=True,
    )
    assert beams.sequences.shape == (6, 9)
    # the best beam's score is its continuation's log-probability over the generated length (length_penalty 1)
    with torch.no_grad():
        logprobs = model(beams.sequences[:1]).logits.log_softmax(-1)
    tokens = beams.sequences[0, 4:]
    total = sum(logprobs[0, 3 + i, tok].item() for i, tok in enumerate(tokens))
    assert math.isclose(beams.sequences_scores[0].item(), total / 5, rel_tol=1e-4, abs_tol=1e-5)


# --------------------------------------------------------------------------- training interfaces


def test_loss_is_shifted_cross_entropy_and_logits_to_keep():
    model = random_model(seed=9)
    ids = torch.randint(0, VOCAB, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, expected, atol=1e-6)
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB) and torch.allclose(last[:, 0], out.logits[:, -1], atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    model = random_model(seed=10)
    model.config.hidden_dropout = 0.0
    assert_gradient_checkpointing_keeps_gradients(model, VOCAB)


def test_outputs_hidden_states_attentions_and_dense_weights():
    model = random_model(seed=11)
    ids = torch.randint(0, VOCAB, (2, 6))
    out = model(ids, output_hidden_states=True, output_attentions=True, output_dense_weights=True)
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 6, 32) for h in out.hidden_states)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 6, 6)
    assert [tuple(w.shape) for w in out.dense_weights] == [(2, 6, 4, 2), (2, 6, 4, 3), (2, 6, 1, 4)]
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(2, 4, 6))
    # the weights returned are the ones used: rebuild the last stream from them
    states = [out.hidden_states[0], out.hidden_states[1], out.hidden_states[2]]
    base = model.model(ids, output_hidden_states=True)
    assert torch.allclose(base.last_hidden_state, out.hidden_states[-1])
    assert model(ids, return_dict=False)[0].shape == (2, 6, VOCAB)
    assert model(ids).dense_weights is None
    del states


def test_resize_token_embeddings():
    model = random_model(seed=12)
    model.resize_token_embeddings(VOCAB + 7)
    assert model.config.vocab_size == VOCAB + 7
    assert model(torch.tensor([[VOCAB + 3, 1]])).logits.shape == (1, 2, VOCAB + 7)


def test_training_lowers_loss_on_synthetic_corpus():
    # A copy task: the second half of every sequence repeats the first half, so attention must learn to look back.
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4)
    model = MUDDPythiaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        half = torch.randint(1, 17, (16, 8))
        ids = torch.cat([half, half], 1)
        labels = ids.clone()
        labels[:, :9] = -100  # only the predictable half counts
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert start > 2.5 and end < 0.5 * start, (start, end)


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0), ("hidden_size", 30), ("num_hidden_layers", -1), ("num_attention_heads", 2.5),
        ("num_key_value_heads", 3), ("intermediate_size", 64), ("vocab_size", "many"), ("max_position_embeddings", 0),
        ("layer_norm_eps", 0.0), ("hidden_act", "swish-ish"), ("attention_dropout", 1.0), ("hidden_dropout", -0.1),
        ("dense_streams", "qkv"), ("dynamic_dense", "yes"), ("dense_round64", None), ("use_qk_norm", 1),
        ("partial_rotary_factor", 0.0), ("partial_rotary_factor", 1.5), ("rope_theta", -1.0), ("head_dim", 0),
        ("initializer_range", -0.02), ("separate_stream_norms", "true"),
    ],
)
def test_invalid_config_raises(field, value):
    name = {"partial_rotary_factor": "partial_rotary_factor", "rope_theta": "rope_theta"}.get(field, field)
    if field == "intermediate_size":
        name = "intermediate_size"  # 64 * 0.5 / 128 rounds to 0 for layer 0
    with pytest.raises(ValueError, match=name):
        tiny_config(**{field: value})


def test_odd_rotary_dims_rejected():
    with pytest.raises(ValueError, match="rotary dims"):
        tiny_config(hidden_size=40, num_attention_heads=4, partial_rotary_factor=0.3)


def test_input_past_max_position_embeddings_runs_like_gpt_neox():
    """GPT-NeoX runs inputs longer than `max_position_embeddings` (rotary extrapolates); so does the muddified
    model, with the same logits (issue 11: an exception there lost every token `generate` had made)."""
    torch.manual_seed(0)
    plain = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, rotary_pct=0.5,
    )).eval()
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (muddify(plain)(ids).logits - plain(ids).logits).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="exactly one"):
        random_model()()


def test_presets_load():
    presets = sorted(p for p in os.listdir("configuration") if p.startswith("muddpythia"))
    assert {"muddpythia-1.4b.json", "muddpythia-2.8b.json", "muddpythia-405m.json", "muddpythia-834m.json"} <= set(presets)
    with torch.device("meta"):
        sizes = {}
        for name in presets:
            config = MUDDPythiaConfig.from_json_file(os.path.join("configuration", name))
            sizes[name] = sum(p.numel() for p in MUDDPythiaForCausalLM(config).parameters())
    assert 1.3e9 < sizes["muddpythia-1.4b.json"] < 1.5e9
    assert 2.6e9 < sizes["muddpythia-2.8b.json"] < 3.0e9


# --------------------------------------------------------------------------- save / load / remote code


def test_save_load_roundtrip(tmp_path):
    model = random_model(seed=13)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "muddpythia"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_muddpythia.MUDDPythiaConfig",
        "AutoModel": "modeling_muddpythia.MUDDPythiaModel",
        "AutoModelForCausalLM": "modeling_muddpythia.MUDDPythiaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_muddpythia.MUDDPythiaForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_muddpythia.MUDDPythiaForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_muddpythia.MUDDPythiaForQuestionAnswering",
    }
    for module in ("modeling_muddpythia.py", "configuration_muddpythia.py", "mudd.py", "modeling_mudd_decoder.py"):
        assert (tmp_path / module).exists(), module
    ids = torch.randint(0, VOCAB, (2, 7))
    reloaded = MUDDPythiaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(auto) is MUDDPythiaForCausalLM and isinstance(AutoConfig.from_pretrained(tmp_path), MUDDPythiaConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is MUDDPythiaModel
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        assert torch.equal(auto(ids).logits, expected)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_muddpythia"] = None  # the installed package must not be importable
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == "MUDDPythiaModel"
    assert AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == "muddpythia"
    ids = torch.load(path + "/ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated}, path + "/remote_out.pt")
    """
)


def test_remote_code_load_without_package(tmp_path):
    model = random_model(seed=14, attn="sdpa")
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, VOCAB, (2, 6))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote_out.pt")
    with torch.no_grad():
        assert (remote["logits"] - model(ids).logits).abs().max() < 1e-6
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)


def test_device_map_with_offloaded_layers_and_dense_connections(tmp_path):
    # accelerate's hooks must bring offloaded blocks and the dense connections in at call time
    model = random_model(seed=15)
    model.save_pretrained(tmp_path)
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "disk", "model.dense": "disk", "model.norm": "cpu", "lm_head": "cpu",
    }
    offloaded = MUDDPythiaForCausalLM.from_pretrained(
        tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"), attn_implementation="eager"
    )
    assert offloaded.hf_device_map == device_map
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, model(ids).logits)
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(offloaded.generate(ids, **kwargs), model.generate(ids, **kwargs))
