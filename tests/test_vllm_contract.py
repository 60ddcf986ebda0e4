"""vLLM's Transformers backend (`model_impl="transformers"`): the rules it applies to a model's source, and its
calling convention, checked on CPU without vLLM.

vLLM finds a module's attention by parsing `type(module).forward`: it takes the local names bound to an
`ALL_ATTENTION_FUNCTIONS` lookup and needs exactly one call of them, whose `scaling=` is a literal or `self.<attr>`;
it keys its KV caches by the module's integer `layer_idx`, builds the bare model through `auto_map["AutoModel"]`,
and hands its attention layers over as `attention_instances` in the forward kwargs (benchmarks/gpu_vllm.py holds the
checker and the emulated call; the GPU run there uses vLLM itself).
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_muddpythia import (
    MUDDFormerConfig, MUDDFormerForCausalLM, MUDDPythiaConfig, MUDDPythiaForCausalLM, MUDDViTConfig,
    MUDDViTForImageClassification,
)

from benchmarks.families import randomize_dense_connections_
from benchmarks.gpu_vllm import attention_modules, contract_problems, interface_calls, run_like_vllm
from benchmarks.gpu_vllm import main as gpu_vllm_main


VOCAB = 80


def _decoders() -> dict[str, nn.Module]:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, intermediate_size=256, pad_token_id=0)
    torch.manual_seed(0)
    models = {
        "muddpythia": MUDDPythiaForCausalLM(MUDDPythiaConfig(num_attention_heads=4, **common)),
        "muddformer": MUDDFormerForCausalLM(MUDDFormerConfig(num_attention_heads=4, num_key_value_heads=2, **common)),
    }
    for model in models.values():
        randomize_dense_connections_(model)
    return models


def _vit() -> nn.Module:
    torch.manual_seed(0)
    config = MUDDViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=3)
    return MUDDViTForImageClassification(config)


@pytest.fixture(scope="module")
def remote_base_models(tmp_path_factory) -> dict[str, nn.Module]:
    """Each family saved, and its bare model loaded back with the folder's code (`auto_map["AutoModel"]`, the class
    vLLM builds)."""
    root = tmp_path_factory.mktemp("vllm")
    loaded = {}
    for name, model in {**_decoders(), "muddvit": _vit()}.items():
        model.save_pretrained(root / name)
        # The folder's own code, also where the installed package has registered the model type.
        remote_class = get_class_from_dynamic_module(model.config.auto_map["AutoModel"], root / name)
        base = remote_class.from_pretrained(root / name, dtype=torch.float32).eval()
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        loaded[name] = base
    return loaded


@pytest.mark.parametrize("name", ["muddpythia", "muddformer", "muddvit"])
def test_remote_code_meets_the_source_contract(name, remote_base_models):
    model = remote_base_models[name]
    assert contract_problems(model) == []
    modules = attention_modules(model)
    # exactly the blocks' attention, each with its own layer index and the scale the model really uses
    assert sorted(module.layer_idx for module in modules.values()) == list(range(model.config.num_hidden_layers))
    for module in modules.values():
        (call,) = interface_calls(type(module))
        scaling = next(keyword.value for keyword in call.keywords if keyword.arg == "scaling")
        assert ast.unparse(scaling) == "self.scaling" and module.scaling == module.head_dim**-0.5
        assert any(keyword.arg is None for keyword in call.keywords), "**kwargs (attention_instances) not passed on"


@pytest.mark.parametrize("name", ["muddpythia", "muddformer", "muddvit"])
def test_package_classes_meet_the_source_contract(name, tmp_path):
    model = {**_decoders(), "muddvit": _vit()}[name]
    model.save_pretrained(tmp_path)  # writes the auto_map that vLLM needs
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(base).__module__.startswith("modeling_muddpythia")
    assert contract_problems(base) == []


def test_shipped_folder_passes_the_dry_run(tmp_path):
    """`benchmarks/gpu_vllm.py --dry-run`: everything its GPU run does except vLLM itself."""
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "depth8-muddpythia"
    status = gpu_vllm_main([str(folder), "--dry-run", "--prompts", "2", "--max-tokens", "3", "--out",
                            str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert status == 0 and result["contract"] == "ok" and result["attention_layers"] == 8
    assert result["vllm_style_max_abs_diff"] < 1e-4 and result["transformers_tokens"] == 2 * 3


@pytest.mark.parametrize("name", ["muddpythia", "muddformer"])
def test_vllm_style_call_equals_eager(name, remote_base_models):
    """One packed sequence, `use_cache=False`, `attention_instances` in the kwargs, an attention function that looks
    up its layer there and returns `[tokens, heads * head_dim]`: the hidden states of eager attention."""
    model = remote_base_models[name]
    ids = torch.randint(1, VOCAB, (11,), generator=torch.Generator().manual_seed(3))
    hidden, instances = run_like_vllm(model, ids)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    assert (hidden - expected).abs().max().item() < 1e-5
    assert [instances[i].calls for i in sorted(instances)] == [1] * model.config.num_hidden_layers
    assert {instance.scale for instance in instances.values()} == {model.config.head_dim**-0.5}


def test_muddvit_keeps_set_attn_implementation(remote_base_models):
    model = remote_base_models["muddvit"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(pixels).last_hidden_state
    assert (outputs["eager"] - outputs["sdpa"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["muddpythia", "muddformer", "muddvit"])
def test_qkv_projections_read_separate_streams(name, remote_base_models):
    """vLLM fuses `q_proj(x), k_proj(x), v_proj(x)` of one input into one QKV projection; in a MUDD block they read
    three different streams, which its fuser must not (and, seeing three inputs, does not) merge."""
    (module, *_) = attention_modules(remote_base_models[name]).values()
    source = textwrap.dedent(inspect.getsource(type(module).project_heads))
    inputs = {
        node.func.attr: ast.unparse(node.args[0])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("q_proj", "k_proj", "v_proj")
    }
    assert inputs == {"q_proj": "query_input", "k_proj": "key_input", "v_proj": "value_input"}


# --------------------------------------------------------------------------- the checker fails where vLLM would


class _Config:
    num_hidden_layers = 1
    auto_map = {"AutoModel": "modeling.Model"}
    _attn_implementation = "eager"


def _through_a_helper(module, query):
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, None)
    return interface(module, query, query, query, None, scaling=module.scaling)


class _HelperAttention(nn.Module):
    """The interface called in a helper with `scaling=module.scaling`: vLLM finds no call in `forward`."""

    def __init__(self):
        super().__init__()
        self.config, self.layer_idx, self.scaling = _Config(), 0, 0.25

    def forward(self, query):
        return _through_a_helper(self, query)


class _ComputedScaleAttention(_HelperAttention):
    def forward(self, query):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        return attention_interface(self, query, query, query, None, scaling=self.config.head_dim**-0.5)


class _TwoCallsAttention(_HelperAttention):
    def forward(self, query):
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attention_interface(self, query, query, query, None, scaling=self.scaling)
        return attention_interface(self, query, query, query, None, scaling=self.scaling)


class _NoLayerIndexAttention(_HelperAttention):
    def __init__(self):
        super().__init__()
        self.layer_idx = None

    def forward(self, query):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        return attention_interface(self, query, query, query, None, scaling=self.scaling)


class _Model(nn.Module):
    def __init__(self, attention: nn.Module, auto_map: dict | None = None):
        super().__init__()
        self.config = _Config()
        self.config.auto_map = _Config.auto_map if auto_map is None else auto_map
        self.attention = attention


@pytest.mark.parametrize(
    "model, problem",
    [
        (_Model(_HelperAttention()), "0 modules call the attention interface"),
        (_Model(_ComputedScaleAttention()), "`scaling=` is not a literal"),
        (_Model(_TwoCallsAttention()), "calls the attention interface 2 times"),
        (_Model(_NoLayerIndexAttention()), "no integer `layer_idx`"),
        (_Model(_NoLayerIndexAttention(), auto_map={"AutoModelForCausalLM": "m.M"}), "no AutoModel entry"),
    ],
)
def test_contract_checker_rejects_what_vllm_rejects(model, problem):
    problems = contract_problems(model)
    assert any(problem in line for line in problems), problems
