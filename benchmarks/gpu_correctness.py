"""GPU correctness checks for MUDDPythia (run on a CUDA machine; not part of the CPU test suite).

    python benchmarks/gpu_correctness.py [--out results.json]

Checks: CUDA float32 = CPU float32; bfloat16 close to float32; sdpa = eager; left-padded batched greedy
generation = one-by-one; StaticCache decode under `torch.compile(fullgraph=True)` (no graph breaks) = eager;
a bf16 training step gives finite loss and gradients. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import StaticCache

from modeling_muddpythia import MUDDPythiaConfig, MUDDPythiaForCausalLM


def _model(attn: str, dtype: torch.dtype, device: str, seed: int = 0) -> MUDDPythiaForCausalLM:
    torch.manual_seed(seed)
    config = MUDDPythiaConfig(
        vocab_size=1024, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=256, pad_token_id=0,
    )
    config._attn_implementation = attn
    model = MUDDPythiaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-identity dense connections so that the DA matters
        for layer in model.model.dense.layers:
            layer.proj_out.weight.normal_(0, 0.05, generator=generator)
            layer.static_weights.add_(0.1 * torch.randn(layer.static_weights.shape, generator=generator))
    return model.to(device=device, dtype=dtype)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    results, failures = {}, []

    def check(name, value, ok):
        results[name] = value
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}")
        if not ok:
            failures.append(name)

    # Triton aggregation (forward and backward) against the plain einsum, float32
    from modeling_muddpythia.mudd import DenseStateStack, aggregate_states

    generator = torch.Generator(device="cuda").manual_seed(0)
    for num_streams, num_states, hidden in ((4, 3, 96), (4, 13, 2048), (1, 33, 2560)):
        states = [torch.randn(2, 160, hidden, device="cuda", generator=generator, requires_grad=True)
                  for _ in range(num_states)]
        weights = torch.randn(2, 160, num_streams, num_states, device="cuda", generator=generator, requires_grad=True)
        stack = DenseStateStack(states[0], num_states + 2)
        for state in states[1:]:
            stack.append(state)
        streams = torch.stack(aggregate_states(weights, stack), 2)
        reference = torch.einsum("btcj,jbtd->btcd", weights, torch.stack(states))
        upstream = torch.randn_like(reference)
        grads = torch.autograd.grad((streams * upstream).sum(), [weights, *states])
        ref_grads = torch.autograd.grad((reference * upstream).sum(), [weights, *states])
        err = max([(streams - reference).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
        check(f"triton_aggregate_fwd_bwd_max_abs_C{num_streams}_J{num_states}_D{hidden}", err, err < 1e-3)

    ids = torch.randint(1, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
    cpu = _model("eager", torch.float32, "cpu")
    with torch.no_grad():
        ref = cpu(ids).logits
    gpu32 = _model("eager", torch.float32, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        got = gpu32(ids.cuda()).logits.cpu()
    check("cuda_fp32_vs_cpu_max_abs", (got - ref).abs().max().item(), (got - ref).abs().max().item() < 1e-4)

    for attn in ("eager", "sdpa"):
        bf16 = _model(attn, torch.bfloat16, "cuda")
        with torch.no_grad():
            out = bf16(ids.cuda()).logits.float().cpu()
        rel = ((out - ref).norm() / ref.norm()).item()
        check(f"bf16_{attn}_relative_error", rel, rel < 3e-2)
    sdpa32 = _model("sdpa", torch.float32, "cuda")
    with torch.no_grad():
        diff = (sdpa32(ids.cuda()).logits.cpu() - got).abs().max().item()
    check("fp32_sdpa_vs_eager_max_abs", diff, diff < 1e-4)

    # left-padded batched greedy generation == one by one
    prompts = [torch.randint(1, 1024, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    longest = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts]).cuda()
    mask = (batch != 0).long()
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = sdpa32.generate(batch, attention_mask=mask, **kwargs)[:, longest:]
    same = all(
        torch.equal(batched[i], sdpa32.generate(p[None].cuda(), **kwargs)[0, len(p):]) for i, p in enumerate(prompts)
    )
    check("left_padded_batched_greedy_equals_single", same, same)

    # StaticCache + torch.compile(fullgraph=True) decode
    model = _model("sdpa", torch.bfloat16, "cuda")
    prompt = ids[:1, :16].cuda()
    cache = StaticCache(config=model.config, max_cache_len=64)
    compiled = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    eager_cache = StaticCache(config=model.config, max_cache_len=64)
    try:
        with torch.no_grad():
            out = model(prompt, past_key_values=cache, use_cache=True)
            ref_out = model(prompt, past_key_values=eager_cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            diffs, start = [], None
            for step in range(24):
                position = torch.tensor([[16 + step]], device="cuda")
                if step == 3:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                logits = compiled(token, past_key_values=cache, position_ids=position, use_cache=True).logits
                eager_logits = model(token, past_key_values=eager_cache, position_ids=position, use_cache=True).logits
                diffs.append((logits.float() - eager_logits.float()).abs().max().item())
                token = eager_logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        check("compiled_static_cache_decode_max_abs_vs_eager", max(diffs), max(diffs) < 0.1)
        results["compiled_decode_ms_per_token_incl_eager_step"] = 1000 * (time.perf_counter() - start) / 21
    except Exception as error:  # a graph break under fullgraph=True raises here
        check("compiled_static_cache_decode", f"{type(error).__name__}: {str(error)[:500]}", False)

    # bf16 training step
    train = _model("sdpa", torch.bfloat16, "cuda").train()
    loss = train(ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    finite = torch.isfinite(loss).item() and all(torch.isfinite(p.grad).all().item() for p in train.parameters())
    check("bf16_train_step_finite", finite, finite)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
