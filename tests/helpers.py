"""Behaviour checks shared by the MUDD decoder families' tests.

Each takes a small random model in eval mode (and its vocabulary size) and asserts one interface guarantee, so a
family's test file only has to build its model and call these.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import StaticCache


# The task heads every MUDD decoder family has (`<Family>For<task>`, loaded by `AutoModelFor<task>`).
TASK_HEADS = ("SequenceClassification", "TokenClassification", "QuestionAnswering")


def assert_cache_matches_full_forward(model, vocab: int, prefix: int = 5, length: int = 12) -> None:
    """Prefill `prefix` tokens into a `DynamicCache`, decode the rest one at a time: same logits as one pass."""
    ids = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefix], past_key_values=DynamicCache(config=model.config), use_cache=True)
        steps = [out.logits]
        for t in range(prefix, length):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == length
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def assert_static_cache_matches_full_forward(model, vocab: int, prefix: int = 4, length: int = 10) -> None:
    """The same with a preallocated `StaticCache` (what `generate(cache_implementation="static")` uses)."""
    ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticCache(config=model.config, max_cache_len=length + 6)
        steps = [model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits]
        for t in range(prefix, length):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def assert_padding_keeps_real_tokens(model, vocab: int) -> None:
    """Left padding (positions from the mask, as `generate` does) and right padding leave real tokens' logits as
    they are without padding."""
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, vocab, (1, 9), generator=generator), torch.randint(1, vocab, (1, 5), generator=generator)
    pad = torch.zeros(1, 4, dtype=torch.long)
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [4]])).long()
    with torch.no_grad():
        ref_a, ref_b = model(a).logits, model(b).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(torch.cat([a, torch.cat([pad, b], 1)]), attention_mask=mask, position_ids=positions).logits
        right = model(torch.cat([a, torch.cat([b, pad], 1)]), attention_mask=mask.flip(-1)).logits
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    for padded in (left, right):
        assert (padded[0] - ref_a[0]).abs().max() < 1e-5
    assert (left[1, 4:] - ref_b[0]).abs().max() < 1e-5 and (right[1, :5] - ref_b[0]).abs().max() < 1e-5


def assert_left_padded_generation_matches_unbatched(model, vocab: int, pad_token_id: int = 0) -> None:
    """Greedy `generate` on a left-padded batch gives every row the continuation it gets alone."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, vocab, (n,), generator=generator) for n in (7, 3, 5)]
    longest = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((longest - len(p),), pad_token_id), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, longest:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(batched[row], alone[0, len(prompt) :]), row


def assert_gradient_checkpointing_keeps_gradients(model, vocab: int) -> None:
    """Training with gradient checkpointing, reentrant or not, gives every parameter the same gradient.

    (Reentrant checkpointing differentiates only the tensors a layer gets as positional arguments: a stream passed
    any other way would silently get no gradient, and neither would anything before it.)"""
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(3))

    def gradients(m):
        m.train()
        m.zero_grad()
        m(ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}

    plain = gradients(copy.deepcopy(model))
    assert len(plain) == len(list(model.parameters()))
    for use_reentrant in (False, True):
        checkpointed_model = copy.deepcopy(model)
        checkpointed_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        assert checkpointed_model.is_activation_checkpointing
        checkpointed = gradients(checkpointed_model)
        assert plain.keys() == checkpointed.keys(), (use_reentrant, sorted(set(plain) - set(checkpointed)))
        for name in plain:
            assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), (use_reentrant, name)


def assert_save_load_roundtrip(model, path: Path, vocab: int, code_files: tuple[str, ...]) -> None:
    """`save_pretrained` writes safetensors, the code files remote code needs and a complete `auto_map`; the model
    class, `AutoModelForCausalLM` and `AutoModel` load it back with identical logits."""
    model.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type
    module = type(model).__module__.split(".")[-1]
    family = type(model).__name__.removesuffix("ForCausalLM")
    assert saved["auto_map"] == {
        "AutoConfig": f"{type(model.config).__module__.split('.')[-1]}.{type(model.config).__name__}",
        "AutoModel": f"{module}.{model.base_model_class.__name__}",
        "AutoModelForCausalLM": f"{module}.{type(model).__name__}",
        **{f"AutoModelFor{task}": f"{module}.{family}For{task}" for task in TASK_HEADS},
    }
    for name in code_files:
        assert (path / name).exists(), name
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    load = dict(attn_implementation=model.config._attn_implementation, dtype=model.dtype)
    reloaded = type(model).from_pretrained(path, **load).eval()
    auto = AutoModelForCausalLM.from_pretrained(path, **load).eval()
    assert type(auto) is type(model) and type(AutoConfig.from_pretrained(path)) is type(model.config)
    assert type(AutoModel.from_pretrained(path, **load)) is model.base_model_class
    with torch.no_grad():
        expected = model(ids).logits
        # Not bitwise: loaded weights are memory-mapped at other alignments, which changes BLAS summation order
        # (~1e-15 in float64); a wrongly loaded tensor changes the logits by orders of magnitude more.
        for loaded in (reloaded, auto):
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_muddpythia"] = None  # the installed package must not be importable
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    path, model_type, base_name = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == base_name
    assert AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == model_type
    ids = torch.load(path + "/ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated}, path + "/remote_out.pt")
    """
)


def assert_remote_code_loads_without_package(model, path: Path, vocab: int) -> None:
    """In a subprocess where the installed package cannot be imported, `trust_remote_code=True` loads the saved
    folder with the copied code and gives the same logits and greedy generation."""
    model.save_pretrained(path)
    ids = torch.randint(1, vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    torch.save(ids, path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(path / "modules"))
    command = [sys.executable, "-c", _REMOTE_SCRIPT, str(path), model.config.model_type, model.base_model_class.__name__]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(path / "remote_out.pt")
    with torch.no_grad():
        assert (remote["logits"] - model(ids).logits).abs().max() < 1e-6
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)
