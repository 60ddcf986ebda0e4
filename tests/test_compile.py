"""The MUDD models through PyTorch's compiler stack: `torch.compile(fullgraph=True)` for training and decoding,
transformers' ExecuTorch export, `torch.export`, `Trainer(torch_compile=True)`, and the aggregation's custom ops.

Every comparison is against the same model run eagerly. The models are tiny and float32, initialised as a trained
model would be (transformers' init, dense connections moved well away from identity), so that float32 rounding
stays far below the tolerances while a wrong gradient or a dropped stream is off by orders of magnitude more.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, Trainer, TrainingArguments
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

from benchmarks.families import randomize_dense_connections_

from modeling_muddpythia import (
    MUDDFormerConfig,
    MUDDFormerForCausalLM,
    MUDDPythiaConfig,
    MUDDPythiaForCausalLM,
    MUDDViTConfig,
    MUDDViTForImageClassification,
)


VOCAB = 61
DECODER_SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
    max_position_embeddings=64, pad_token_id=0,
)


def build(family: str, seed: int = 0, **overrides):
    """A tiny float32 model of `family` ("pythia", "former", "vit") with non-identity dense connections."""
    torch.manual_seed(seed)
    if family == "pythia":
        model = MUDDPythiaForCausalLM(MUDDPythiaConfig(**{**DECODER_SIZES, **overrides}, attn_implementation="sdpa"))
    elif family == "former":
        config = MUDDFormerConfig(**{**DECODER_SIZES, "num_key_value_heads": 2, **overrides}, attn_implementation="sdpa")
        model = MUDDFormerForCausalLM(config)
    else:
        config = MUDDViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, num_labels=3, attn_implementation="sdpa", **overrides,
        )
        model = MUDDViTForImageClassification(config)
    randomize_dense_connections_(model, seed + 1, static_std=0.3, generator_std=0.1)
    return model


def inputs_for(family: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator), "labels": torch.tensor([0, 2])}
    ids = torch.randint(1, VOCAB, (2, 12), generator=generator)
    return {"input_ids": ids, "labels": ids}


def training_step(model, inputs: dict, run=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter's gradient of `model` after one forward + backward through `run` (default: the
    model itself; or its compiled form)."""
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(**inputs).loss
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


class GraphCounter:
    """A `torch.compile` backend that counts the graphs dynamo hands over and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["pythia", "former", "vit"])
def test_compiled_training_step_equals_eager(family):
    model = build(family).train()
    inputs = inputs_for(family)
    eager_loss, eager_grads = training_step(model, inputs)
    compiled_loss, compiled_grads = training_step(model, inputs, run=torch.compile(model, fullgraph=True))
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-5
    worst = max(eager_grads, key=lambda name: (compiled_grads[name] - eager_grads[name]).abs().max())
    # Seen: 2e-7 (the compiler sums in another order); the largest gradients are ~0.5
    assert (compiled_grads[worst] - eager_grads[worst]).abs().max().item() <= 1e-5, worst
    # the dense connections (static weights, generator) really are trained through the compiled graph
    assert all(eager_grads[name].abs().max() > 0 for name in eager_grads if "static_weights" in name)


@pytest.mark.parametrize("family", ["pythia", "former", "vit"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_whole_model_is_one_graph_that_serves_every_layer(family, grad):
    # Without fullgraph a graph break would show up as a second graph, and a per-layer specialisation as a
    # recompilation when the same shapes come again.
    model = build(family).train(grad)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter)
    inputs, other_inputs = ({k: v for k, v in inputs_for(family, seed).items() if k != "labels"} for seed in (0, 1))
    with torch.set_grad_enabled(grad):
        expected = model(**inputs).logits
        got = compiled(**inputs).logits
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(**other_inputs)
    assert counter.graphs == 1
    assert (got - expected).abs().max().item() <= 1e-5


def test_trainer_with_torch_compile_trains(tmp_path):
    model = build("pythia")
    generator = torch.Generator().manual_seed(0)
    # a learnable sequence task: each row counts up from a random start
    starts = torch.randint(1, VOCAB - 16, (64, 1), generator=generator)
    rows = [{"input_ids": (s + torch.arange(16)).tolist(), "labels": (s + torch.arange(16)).tolist()} for s in starts]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=24, learning_rate=1e-2, warmup_steps=0,
        logging_steps=4, save_strategy="no", report_to=[], torch_compile=True, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert hasattr(trainer.model_wrapped, "_orig_mod")  # it trained the compiled module
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.6 * losses[0], losses


# --------------------------------------------------------------------------- decoding and export


@pytest.mark.parametrize("family", ["pythia", "former"])
def test_executorch_export_decodes_like_eager(family):
    model = build(family).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 32}
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32)
    program = exportable.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    module = program.module()
    steps = [module(input_ids=ids[:, t : t + 1], cache_position=torch.tensor([t])) for t in range(ids.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_torch_export_of_muddvit_equals_eager():
    model = build("vit").eval()
    pixels = inputs_for("vit")["pixel_values"]
    program = torch.export.export(model, (), {"pixel_values": pixels})
    other = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for batch in (pixels, other):
            expected = model(pixel_values=batch).logits
            got = program.module()(pixel_values=batch).logits
            assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["pythia", "former"])
def test_compiled_static_cache_generate_gives_the_eager_tokens(family):
    model = build(family).eval()
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0)
    expected = model.generate(prompt, disable_compile=True, **settings)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles `generate` only on accelerators otherwise
    got = model.generate(prompt, compile_config=compile_config, **settings)
    assert torch.equal(got, expected)
    assert hasattr(model, "_compiled_call") and model._compiled_call is not None


# --------------------------------------------------------------------------- the custom ops


def test_aggregation_custom_ops_pass_opcheck():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    buffer = torch.randn(2, 3, 7, 8, generator=generator)
    torch.library.opcheck(torch.ops.mudd.aggregate.default, (weights, buffer, 5))
    grad_buffer = torch.zeros_like(buffer)
    grad_streams = torch.randn(4, 2, 3, 8, generator=generator)
    torch.library.opcheck(
        torch.ops.mudd.aggregate_backward_.default, (weights.detach(), buffer, grad_buffer, grad_streams, 5)
    )
    # the ops' arithmetic against the definition, in float64
    w, x = weights.detach().double(), buffer.double()
    expected = torch.einsum("btcj,btjd->cbtd", w, x[:, :, :5])
    assert torch.allclose(torch.ops.mudd.aggregate(w, x, 5), expected)
    accumulator = torch.ones_like(x)
    grad_w = torch.ops.mudd.aggregate_backward_(w, x, accumulator, grad_streams.double(), 5)
    assert torch.allclose(grad_w, torch.einsum("cbtd,btjd->btcj", grad_streams.double(), x[:, :, :5]))
    assert torch.allclose(accumulator[:, :, :5] - 1, torch.einsum("btcj,cbtd->btjd", w, grad_streams.double()))
    assert torch.equal(accumulator[:, :, 5:], torch.ones_like(accumulator[:, :, 5:]))
    with pytest.raises(ValueError, match="states"):
        torch.ops.mudd.aggregate(w, x, 8)
