"""MUDDFormer (Llama family): arithmetic against transformers' Llama and the float64 spec reference, the MaxText
training options, presets, and the interface guarantees shared with MUDDPythia."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from modeling_muddpythia import MUDDFormerConfig, MUDDFormerForCausalLM, MUDDFormerModel, muddify

from helpers import (
    assert_cache_matches_full_forward,
    assert_gradient_checkpointing_keeps_gradients,
    assert_left_padded_generation_matches_unbatched,
    assert_padding_keeps_real_tokens,
    assert_remote_code_loads_without_package,
    assert_save_load_roundtrip,
    assert_static_cache_matches_full_forward,
)
from mudd_reference import randomize_, reference_logits, spec_params_from_model


VOCAB = 61
PRESETS = Path(__file__).resolve().parent.parent / "configuration"
CODE_FILES = (
    "modeling_muddformer.py", "configuration_muddformer.py", "modeling_mudd_decoder.py", "configuration_mudd.py",
    "mudd.py",
)


def tiny_config(**overrides) -> MUDDFormerConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    values.update(overrides)
    return MUDDFormerConfig(**values)


def random_model(seed: int = 0, dtype=torch.float64, attn: str = "eager", **overrides) -> MUDDFormerForCausalLM:
    """A tiny model with random, far-from-identity weights. float64 by default: with such weights the SwiGLU
    products make float32 logits drift ~1e-5 between equivalent code paths (eager vs sdpa), which would hide the
    differences the behaviour tests look for."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn
    model = MUDDFormerForCausalLM(config).to(dtype).eval()
    randomize_(model, seed=seed)
    return model


# --------------------------------------------------------------------------- muddify vs transformers' Llama


LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_sdpa": dict(num_key_value_heads=2, attn_implementation="sdpa"),
    "mqa_head_dim": dict(num_key_value_heads=1, head_dim=16),
    "biases_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3_rope": dict(
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        }
    ),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_muddified_llama_matches_transformers(case):
    torch.manual_seed(0)
    values = dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager",
    )
    values.update(LLAMA_CASES[case])
    plain = LlamaForCausalLM(LlamaConfig(**values)).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so that a mis-mapped tensor shows
        for name, param in plain.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    mudd = muddify(plain)
    assert isinstance(mudd, MUDDFormerForCausalLM) and not mudd.training
    config = mudd.config
    assert (config.num_key_value_heads, config.head_dim, config.rms_norm_eps) == (
        plain.config.num_key_value_heads, plain.config.head_dim, 1e-5
    )
    assert not config.use_qk_norm and not config.ffn_width_reallocation
    assert config._attn_implementation == plain.config._attn_implementation
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        expected, got = plain(ids).logits, mudd(ids).logits
    assert (expected - got).abs().max().item() < 1e-5
    assert all(not layer.proj_out.weight.any() for layer in mudd.model.dense.layers)  # identity connections
    if values.get("tie_word_embeddings"):
        assert mudd.lm_head.weight.data_ptr() == mudd.model.embed_tokens.weight.data_ptr()


def test_muddified_llama_generates_like_llama():
    torch.manual_seed(1)
    plain = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    ).eval()
    mudd = muddify(plain)
    ids = torch.randint(1, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **kwargs), mudd.generate(ids, **kwargs))


def test_muddify_llama_keeps_dtype():
    plain = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).to(torch.bfloat16)
    mudd = muddify(plain)
    assert {p.dtype for p in mudd.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- float64 spec reference (section 3)


REFERENCE_CASES = {
    "release": {},
    "prenorm": dict(dense_prenorm=True),
    "postnorm": dict(dense_postnorm=True),
    "prenorm_postnorm": dict(dense_prenorm=True, dense_postnorm=True),
    # MUDDLlama2Medium as MaxText trains it: block-0 q/k/v norms, no qk-norm, both norms
    "maxtext_layout": dict(
        separate_stream_norms_first_layer=True, use_qk_norm=False, dense_prenorm=True, dense_postnorm=True
    ),
    "mqa_head_dim_no_realloc": dict(num_key_value_heads=1, head_dim=12, ffn_width_reallocation=False),
    "single_stream_postnorm": dict(dense_streams="r", dense_postnorm=True),
    "static_prenorm": dict(dynamic_dense=False, dense_prenorm=True),
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
        rope_theta=config.rope_parameters["rope_theta"], eps=config.rms_norm_eps,
        norm="rmsnorm", ffn="swiglu", parallel_residual=False,
    )
    assert config.rotary_ndims == config.attention_head_dim  # full rotary
    assert expected.abs().max() > 1.0  # a meaningful, non-degenerate comparison
    # float32 rotary tables bound the agreement at ~1e-6; a wrong formula shows orders of magnitude above this
    assert (got - expected).abs().max().item() < 1e-5


def test_maxtext_options_add_the_documented_parameters():
    plain = MUDDFormerModel(tiny_config(num_hidden_layers=4))
    model = MUDDFormerModel(tiny_config(num_hidden_layers=4, dense_prenorm=True, dense_postnorm=True,
                                        separate_stream_norms_first_layer=True))
    added = sorted(set(model.state_dict()) - set(plain.state_dict()))
    assert added == sorted(
        [f"dense.state_norms.{j}.weight" for j in range(5)]  # X_0 .. X_4
        + [f"dense.layers.{i}.{norm}.weight" for i in range(4) for norm in ("weight_norm", "post_norm")]
        + ["layers.0.attention_norms.1.weight", "layers.0.attention_norms.2.weight"]
    )
    assert not set(plain.state_dict()) - set(model.state_dict())


@pytest.mark.parametrize("prenorm, postnorm", [(False, False), (True, False), (False, True), (True, True)])
def test_fresh_dense_connections_follow_the_maxtext_init(prenorm, postnorm):
    model = MUDDFormerForCausalLM(tiny_config(dense_prenorm=prenorm, dense_postnorm=postnorm))
    for layer in model.model.dense.layers:
        assert not layer.proj_out.weight.any()
        expected = torch.zeros_like(layer.static_weights)
        if not (prenorm and postnorm):  # one-hot on the newest state; both norms on: all zero
            expected[:, -1] = 1.0
        assert torch.equal(layer.static_weights, expected)
        if postnorm:
            assert torch.allclose(layer.post_norm.weight, torch.full_like(layer.post_norm.weight, 0.001))
        if prenorm:
            assert torch.equal(layer.weight_norm.weight, torch.ones_like(layer.weight_norm.weight))
    # without the MaxText norms a fresh model is the plain residual transformer: every stream is the newest state
    if not (prenorm or postnorm):
        out = model(torch.randint(0, VOCAB, (1, 5)), output_dense_weights=True)
        assert all(torch.equal(w[..., -1], torch.ones_like(w[..., -1])) for w in out.dense_weights)


# --------------------------------------------------------------------------- configuration and presets


def test_defaults_are_muddformer_2_8b():
    config = MUDDFormerConfig()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.attention_head_dim) == (
        32, 2560, 32, 80
    )
    assert (config.intermediate_size, config.vocab_size, config.bos_token_id, config.eos_token_id) == (6912, 50432, 1, 2)
    assert config.rms_norm_eps == 1e-6 and config.rotary_ndims == 80 and config.hidden_act == "silu"
    assert config.use_qk_norm and not (config.use_parallel_residual or config.attention_bias or config.mlp_bias)
    assert not (config.dense_prenorm or config.dense_postnorm or config.separate_stream_norms_first_layer)
    saved = config.to_dict()
    assert saved["model_type"] == "muddformer" and saved["rms_norm_eps"] == 1e-6 and "norm_eps" not in saved
    assert MUDDFormerConfig(rms_norm_eps=1e-5).norm_eps == 1e-5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rms_norm_eps", 0.0, "rms_norm_eps"), ("num_key_value_heads", 3, "num_key_value_heads"),
        ("hidden_act", "swiglu", "hidden_act"), ("dense_prenorm", "yes", "dense_prenorm"),
        ("dense_postnorm", 1, "dense_postnorm"), ("separate_stream_norms_first_layer", None, "first_layer"),
        ("rope_theta", 0.0, "rope_theta"), ("intermediate_size", 64, "intermediate_size"),
        ("vocab_size", "many", "vocab_size"),
    ],
)
def test_invalid_config_raises(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def _preset_files() -> list[Path]:
    return sorted(PRESETS.glob("*.json"))


@pytest.mark.parametrize("path", _preset_files(), ids=lambda p: p.name)
def test_preset_loads_and_keeps_every_key(path):
    values = json.loads(path.read_text())
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == values["model_type"]
    saved = config.to_dict()
    saved["num_labels"] = config.num_labels  # stored as `id2label` by transformers
    assert {key: saved.get(key) for key in values} == values  # no key of the preset is silently dropped
    # a size in the file name (e.g. "2.8b", "405m") is the model's parameter count to within 10%
    size = re.search(r"-(\d+(?:\.\d+)?)([mb])\.json$", path.name)
    if size:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) or AutoModel._model_mapping[type(config)]
        with torch.device("meta"):
            count = sum(p.numel() for p in model_class(config).parameters())
        claimed = float(size.group(1)) * {"m": 1e6, "b": 1e9}[size.group(2)]
        assert abs(count / claimed - 1) < 0.1, (count, claimed)


def test_muddformer_presets():
    names = {path.name for path in _preset_files()}
    assert {"muddformer-2.8b.json", "muddllama2-medium-405m.json"} <= names
    release = MUDDFormerConfig.from_json_file(PRESETS / "muddformer-2.8b.json")
    assert release.to_dict() == MUDDFormerConfig().to_dict()
    assert release.ffn_width(0) == 3456 and release.ffn_width(31) == 10368  # 0.5x and 1.5x of 6912
    medium = MUDDFormerConfig.from_json_file(PRESETS / "muddllama2-medium-405m.json")
    assert (medium.num_hidden_layers, medium.hidden_size, medium.num_attention_heads, medium.intermediate_size) == (
        24, 1024, 16, 2816
    )
    assert medium.separate_stream_norms_first_layer and medium.dense_prenorm and medium.dense_postnorm
    assert not medium.use_qk_norm
    with torch.device("meta"):
        count = sum(p.numel() for p in MUDDFormerForCausalLM(release).parameters())
    assert 2.6e9 < count < 3.0e9


# --------------------------------------------------------------------------- interfaces shared with MUDDPythia


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward(attn):
    model = random_model(seed=1, attn=attn, dense_prenorm=True, dense_postnorm=True)
    assert_cache_matches_full_forward(model, VOCAB)
    cache = model(torch.ones(1, 3, dtype=torch.long), use_cache=True).past_key_values
    assert cache.layers[0].keys.shape == (1, 2, 3, 8)  # [batch, kv heads, seq, head_dim]: GQA keeps 2 heads


def test_static_cache_decoding_equals_full_forward():
    assert_static_cache_matches_full_forward(random_model(seed=2, attn="sdpa", dense_postnorm=True), VOCAB)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_real_tokens(attn):
    assert_padding_keeps_real_tokens(random_model(seed=4, attn=attn), VOCAB)


def test_sdpa_equals_eager():
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        eager, sdpa = (random_model(seed=5, attn=attn, dense_postnorm=True)(ids).logits for attn in ("eager", "sdpa"))
    assert (eager - sdpa).abs().max().item() < 1e-5


def test_left_padded_batched_greedy_equals_one_by_one():
    assert_left_padded_generation_matches_unbatched(random_model(seed=6, attn="sdpa"), VOCAB)


def test_gradient_checkpointing_gives_same_gradients():
    assert_gradient_checkpointing_keeps_gradients(random_model(seed=10, dense_prenorm=True, dense_postnorm=True), VOCAB)


def test_dense_weights_output_is_opt_in():
    model = random_model(seed=11, num_hidden_layers=3)
    ids = torch.randint(0, VOCAB, (2, 6))
    assert model(ids).dense_weights is None
    weights = model(ids, output_dense_weights=True).dense_weights
    assert [tuple(w.shape) for w in weights] == [(2, 6, 4, 2), (2, 6, 4, 3), (2, 6, 1, 4)]


def test_save_load_roundtrip(tmp_path):
    # the MaxText norms are trained parameters: loading must not re-initialise them (post-norm scale 0.001)
    model = random_model(seed=13, dense_prenorm=True, dense_postnorm=True, separate_stream_norms_first_layer=True)
    assert_save_load_roundtrip(model, tmp_path, VOCAB, CODE_FILES)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is MUDDFormerForCausalLM


def test_remote_code_load_without_package(tmp_path):
    assert_remote_code_loads_without_package(random_model(seed=14, attn="sdpa"), tmp_path, VOCAB)


# --------------------------------------------------------------------------- past max_position_embeddings (issue 11)

SCALED_ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope_type", sorted(SCALED_ROPE))
def test_runs_past_max_position_embeddings_like_llama(rope_type):
    """Llama runs past `max_position_embeddings` (16 here) with every RoPE type, and `generate` only warns; the
    muddified Llama gives the same logits there, and `generate` returns every token it made (the default type too:
    Llama extrapolates, so do we)."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, rope_parameters=dict(SCALED_ROPE[rope_type]), attn_implementation="eager",
    )).eval()
    mudd = muddify(plain)
    assert mudd.config.head_dim == 8 and mudd.config.rope_parameters["rope_type"] == rope_type
    ids = torch.randint(1, VOCAB, (2, 28), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (mudd(ids).logits - plain(ids).logits).abs().max().item() < 1e-5
    kwargs = dict(max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    transformers_logging.warning_once.cache_clear()  # transformers warns once per process
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()  # its default, which other tests in the process may have changed
    try:
        with CaptureLogger(transformers_logging.get_logger("transformers.generation.stopping_criteria")) as captured:
            generated = mudd.generate(ids[:, :10], **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    assert generated.shape == (2, 24) and torch.equal(generated, plain.generate(ids[:, :10], **kwargs))
    assert "exceeded the model's predefined maximum length (16)" in captured.out
