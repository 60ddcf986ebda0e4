"""Serve a MUDD folder with vLLM's Transformers backend and compare its greedy tokens with transformers' `generate`.

    python benchmarks/gpu_vllm.py FOLDER [--prompts 8] [--max-tokens 32] [--dtype float32]
                                         [--tensor-parallel-size 1] [--out result.json]
    python benchmarks/gpu_vllm.py FOLDER --dry-run     # CPU, no vLLM needed

vLLM runs an architecture it has no port of through `model_impl="transformers"`: it builds the folder's `AutoModel`
(remote code), swaps in its own attention through the `ALL_ATTENTION_FUNCTIONS` interface and its own linear layers
per the model's tensor-parallel plan. That backend inspects each attention module's source; `contract_problems` checks
the same rules here (empty list = the folder meets them):

* the attention module's `forward` makes exactly one call of a name bound to an `ALL_ATTENTION_FUNCTIONS` lookup;
* that call passes `scaling=` as a literal or `self.<attr>` holding a number;
* the module has an integer `layer_idx` (vLLM keys its KV caches by it);
* `config.auto_map` names an `AutoModel` class.

`--dry-run` checks the contract and then runs the model the way vLLM calls it: one packed `[1, tokens]` sequence,
`use_cache=False`, `position_ids`, `attention_instances` in the keyword arguments, and an attention function with
vLLM's signature and output layout (`[tokens, heads * head_dim]`) registered as the implementation; the hidden states
must equal eager attention's; and it computes transformers' greedy tokens for the prompts, the reference of the
GPU run. The GPU run needs a CUDA machine with `pip install vllm`; it exits non-zero when any
prompt's greedy tokens differ.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


EMULATED_IMPLEMENTATION = "vllm_emulation"


# --------------------------------------------------------------------------- the source contract


def _is_interface_lookup(node: ast.expr | None) -> bool:
    """`ALL_ATTENTION_FUNCTIONS.get_interface(...)` or `ALL_ATTENTION_FUNCTIONS[...]`."""
    if isinstance(node, ast.Call):
        node = node.func
    return (
        isinstance(node, (ast.Attribute, ast.Subscript))
        and isinstance(node.value, ast.Name)
        and node.value.id == "ALL_ATTENTION_FUNCTIONS"
    )


def interface_calls(cls: type[nn.Module]) -> list[ast.Call]:
    """Every call in `cls.forward` (as `inspect` finds it, inherited or not) of a local name bound to an
    `ALL_ATTENTION_FUNCTIONS` lookup; [] when the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (AttributeError, OSError, SyntaxError, TypeError):
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_interface_lookup(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
    ]


def _scaling_value(call: ast.Call, module: nn.Module):
    """The number `scaling=` resolves to on `module` (a literal or `self.<attr>`), else None."""
    expressions = [keyword.value for keyword in call.keywords if keyword.arg == "scaling"]
    if len(expressions) != 1:
        return None
    expression = expressions[0]
    if isinstance(expression, ast.Constant):
        value = expression.value
    elif (
        isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name)
        and expression.value.id == "self"
    ):
        value = getattr(module, expression.attr, None)
    else:
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose `forward` calls the attention interface at least once, by name."""
    return {name: module for name, module in model.named_modules() if interface_calls(type(module))}


def contract_problems(model: nn.Module) -> list[str]:
    """What keeps vLLM's Transformers backend from running `model` (a bare `AutoModel`); [] when nothing does."""
    problems = []
    auto_map = getattr(model.config, "auto_map", None) or {}
    if "AutoModel" not in auto_map:
        problems.append(f"config.auto_map has no AutoModel entry: {auto_map}")
    modules = attention_modules(model)
    if len(modules) != model.config.num_hidden_layers:
        problems.append(f"{len(modules)} modules call the attention interface, expected one per layer")
    for name, module in modules.items():
        calls = interface_calls(type(module))
        if len(calls) != 1:
            problems.append(f"{name}: {type(module).__name__}.forward calls the attention interface {len(calls)} times")
            continue
        scaling = _scaling_value(calls[0], module)
        if scaling is None:
            problems.append(f"{name}: `scaling=` is not a literal or a numeric `self.<attr>`")
        if not isinstance(getattr(module, "layer_idx", None), int):
            problems.append(f"{name}: no integer `layer_idx`")
    return problems


# --------------------------------------------------------------------------- vLLM's calling convention, emulated


class EmulatedAttentionLayer:
    """Stands in for one of vLLM's per-layer `Attention` instances: flattened `[tokens, heads * head_dim]` inputs,
    causal attention over one packed sequence, grouped-query heads, the scale the model hands over."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale: float | None = None
        self.calls = 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        tokens = query.shape[0]
        query = query.view(tokens, self.num_heads, self.head_dim).transpose(0, 1)
        key, value = (x.view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1) for x in (key, value))
        groups = self.num_heads // self.num_kv_heads
        key, value = key.repeat_interleave(groups, 0), value.repeat_interleave(groups, 0)
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=self.scale)
        return output.transpose(0, 1).reshape(tokens, -1)


def emulated_vllm_attention(module, query, key, value, attention_mask, scaling=None, attention_instances=None,
                            **kwargs):
    """The signature and data flow of vLLM's attention function for the Transformers backend: the layer's instance
    is looked up by `module.layer_idx` in `attention_instances`, which must have come through the forward kwargs."""
    layer = attention_instances[module.layer_idx]
    if scaling is not None:
        layer.scale = float(scaling)
    tokens = query.shape[-2]
    query, key, value = (x.transpose(1, 2).reshape(tokens, -1) for x in (query, key, value))
    return layer.forward(query, key, value), None


def run_like_vllm(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, EmulatedAttentionLayer]]:
    """Hidden states `[tokens, hidden]` of the bare model called as vLLM's Transformers backend calls it, for one
    sequence `ids` `[tokens]`, with `EMULATED_IMPLEMENTATION` as its attention; and the per-layer instances."""
    from transformers import AttentionInterface

    AttentionInterface.register(EMULATED_IMPLEMENTATION, emulated_vllm_attention)
    config = model.config
    instances = {
        index: EmulatedAttentionLayer(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        for index in range(config.num_hidden_layers)
    }
    previous = config._attn_implementation
    config._attn_implementation = EMULATED_IMPLEMENTATION  # what vLLM's `_patch_config` does with "vllm"
    try:
        with torch.no_grad():
            outputs = model(
                input_ids=ids[None], use_cache=False, position_ids=torch.arange(len(ids))[None],
                attention_instances=instances, return_dict=False,
            )
    finally:
        config._attn_implementation = previous
    return outputs[0][0], instances


# --------------------------------------------------------------------------- the run


def _prompts(vocab_size: int, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (int(length),), generator=generator).tolist()
            for length in torch.randint(4, 24, (count,), generator=generator)]


def _transformers_greedy(folder: str, prompts, max_tokens: int, dtype: torch.dtype, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id or 0)
        tokens.append(out[0, len(prompt):].tolist())
    return tokens


def dry_run(folder: str, num_prompts: int, max_tokens: int) -> dict:
    """Everything but vLLM, on CPU: the contract, vLLM's calling convention, and the transformers side of the
    comparison (greedy tokens for the same prompts); raises `SystemExit` naming what fails."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the bare model leaves the checkpoint's lm_head unused, as intended
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()  # as vLLM builds it
    if problems := contract_problems(model):
        raise SystemExit("vLLM Transformers-backend contract not met:\n  " + "\n  ".join(problems))
    ids = torch.tensor(_prompts(config.vocab_size, 1)[0])
    hidden, instances = run_like_vllm(model, ids)
    with torch.no_grad():
        expected = model(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    difference = (hidden - expected).abs().max().item()
    calls = [layer.calls for layer in instances.values()]
    scales = {layer.scale for layer in instances.values()}
    if difference > 1e-4 or calls != [1] * len(calls) or scales != {config.head_dim**-0.5}:
        raise SystemExit(f"vLLM-style call differs from eager by {difference:.3g} (calls per layer: {calls}, "
                         f"scales: {sorted(scales)})")
    expected = _transformers_greedy(folder, _prompts(config.vocab_size, num_prompts), max_tokens, torch.float32, "cpu")
    return {"folder": folder, "dry_run": True, "contract": "ok", "vllm_style_max_abs_diff": difference,
            "attention_layers": len(instances), "prompts": num_prompts,
            "transformers_tokens": sum(len(tokens) for tokens in expected)}


def gpu_run(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.folder, trust_remote_code=True)
    dtype = getattr(torch, args.dtype)
    prompts = _prompts(config.vocab_size, args.prompts)
    expected = _transformers_greedy(args.folder, prompts, args.max_tokens, dtype, "cuda")
    torch.cuda.empty_cache()
    started = time.perf_counter()
    llm = LLM(model=args.folder, model_impl="transformers", trust_remote_code=True, dtype=args.dtype,
              tensor_parallel_size=args.tensor_parallel_size, seed=0)
    load_seconds = time.perf_counter() - started
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens,
                              ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt) for prompt in prompts], sampling)
    got = [list(output.outputs[0].token_ids) for output in outputs]
    matches = [a == b for a, b in zip(got, expected)]
    return {"folder": args.folder, "dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size,
            "prompts": len(prompts), "identical": sum(matches), "load_seconds": load_seconds,
            "mismatches": [{"prompt": p, "vllm": g, "transformers": e}
                           for p, g, e, ok in zip(prompts, got, expected, matches) if not ok]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a saved MUDD causal-LM folder (with its remote code)")
    parser.add_argument("--dry-run", action="store_true", help="CPU only: the source contract and vLLM's call")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = dry_run(args.folder, args.prompts, args.max_tokens) if args.dry_run else gpu_run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if args.dry_run or result["identical"] == result["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
