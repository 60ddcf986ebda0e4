"""Fine-tuning (`modeling_muddpythia.finetune`, the `mudd-finetune` command): Trainer with the padding collator,
gradient checkpointing, resume, Trainer's `num_items_in_batch` loss path, bf16 autocast, LoRA through peft,
`--muddify`, 2-process data parallel over gloo and FSDP2 sharding. Tiny models, a character tokenizer built here,
CPU, no network."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from modeling_muddpythia import MUDDFormerConfig, MUDDFormerForCausalLM, MUDDPythiaConfig, MUDDPythiaForCausalLM
from modeling_muddpythia import finetune, safe_output, training
from modeling_muddpythia.finetune import (
    LORA_TARGET_MODULES,
    CausalLMPaddingCollator,
    build_parser,
    build_trainer,
    main,
    read_texts,
    save_result,
    tokenize_texts,
    training_arguments,
)

from mudd_reference import randomize_


CHARS = "abcdefghijklmnopqrstuvwxyz .,"
VOCAB = len(CHARS) + 2  # + <|endoftext|> (EOS and pad, id 0) and <unk>
PHRASES = ["the cat sat", "a dog ran", "on the mat", "in the sun", "far away"]
WORKER = Path(__file__).with_name("finetune_worker.py")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; `<|endoftext|>` (id 0) is the EOS token and there is no pad token, as in Pythia."""
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")


def tiny_config(**overrides) -> MUDDPythiaConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=64)
    return MUDDPythiaConfig(**(values | overrides))


def save_folder(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_phrases(path: Path, phrases: list[str], seed: int) -> Path:
    """48 JSON-lines examples of 1 to 4 random phrases each (so of very different lengths)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(48):
            f.write(json.dumps({"text": " ".join(rng.choice(phrases) for _ in range(rng.randint(1, 4)))}) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: fastest for these tiny models, and several threads thrash on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Tiny MUDDPythia folders with the tokenizer (random init, random init with dropout, and "pretrained": 24
    steps on `data`), the training data and a second data set of other phrases for LoRA."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model_dir = save_folder(root / "model", MUDDPythiaForCausalLM(tiny_config()), tokenizer)
    torch.manual_seed(0)
    dropout_dir = save_folder(root / "dropout", MUDDPythiaForCausalLM(tiny_config(hidden_dropout=0.1)), tokenizer)
    data = write_phrases(root / "train.jsonl", PHRASES, seed=0)
    train(cli_args(model_dir, data, root / "pretrained", "--max-steps", 24))
    other_data = write_phrases(root / "other.jsonl", ["jump over box", "quick zebra", "lazy fox", "we go home"], 1)
    return {"model": model_dir, "dropout": dropout_dir, "pretrained": root / "pretrained", "data": data,
            "other_data": other_data}


def cli_args(model_dir: Path, data: Path, output: Path, *extra) -> list[str]:
    return [str(model_dir), "--data", str(data), "--output", str(output), "--cpu", "--batch-size", "8",
            "--learning-rate", "1e-2", "--logging-steps", "1", "--save-steps", "1000", *map(str, extra)]


def train(argv: list[str], callbacks=()) -> Trainer:
    args = build_parser().parse_args(argv)
    trainer = build_trainer(args)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    save_result(trainer, args)
    return trainer


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def probe_ids() -> torch.Tensor:
    return torch.tensor([[20, 9, 6, 28, 4, 2, 21, 28, 20, 2, 21], [3, 28, 5, 16, 8, 28, 19, 2, 15, 0, 0]])


def assert_states_close(expected: dict, actual: dict, atol: float) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        diff = (expected[name].float() - actual[name].float()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


def run_torchrun(*worker_args, timeout: float = 240) -> str:
    """Run `finetune_worker.py` on 2 CPU processes (gloo over loopback); `--standalone` picks a free port."""
    env = dict(os.environ, **OFFLINE_ENV, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), *map(str, worker_args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return output


# --------------------------------------------------------------------------- data


def test_padding_collator_masks_padding_by_position_not_by_pad_id():
    # id 0 is EOS and pad at once: the real EOS of the first example stays a target, the padding does not.
    batch = CausalLMPaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 0]}, {"input_ids": [7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 0], [7, -100, -100]]
    padded = CausalLMPaddingCollator(pad_token_id=3, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9]}])
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 3, 3]]


def test_reading_and_tokenizing_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("ab c\n\n  \nd\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"body": "y", "text": "z"}\n')
    assert read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["ab c", "d", "x", "z"]
    with pytest.raises(ValueError, match=r"b.jsonl line 1: expected an object with a string field 'body'"):
        read_texts([tmp_path / "b.jsonl"], text_field="body")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        read_texts([tmp_path / "bad.jsonl"])
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        read_texts([tmp_path / "c.csv"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_texts([tmp_path / "empty.txt"])

    # EOS closes every example; truncation cuts it off a long one; a lone token is dropped
    dataset = tokenize_texts(["ab", "abcdef", ""], char_tokenizer(), max_length=4)
    assert dataset["input_ids"] == [[2, 3, 0], [2, 3, 4, 5]]


# --------------------------------------------------------------------------- Trainer


def test_trainer_lowers_loss_and_checkpointing_changes_nothing(workspace, tmp_path):
    final = {}
    for checkpointing in (False, True):
        output = tmp_path / f"checkpointing-{checkpointing}"
        extra = ["--max-steps", 16] + (["--gradient-checkpointing"] if checkpointing else [])
        trainer = train(cli_args(workspace["model"], workspace["data"], output, *extra))
        assert trainer.model.is_activation_checkpointing == checkpointing
        losses = logged_losses(trainer)
        assert len(losses) == 16 and losses[-1] < 0.75 * losses[0], losses
        final[checkpointing] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    # Recomputing activations in backward gives the same gradients, hence the same trained weights.
    assert_states_close(final[False], final[True], atol=1e-5)
    # The output folder is a complete model (weights, config, remote code, tokenizer) of the trained weights.
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert isinstance(reloaded, MUDDPythiaForCausalLM)
    assert_states_close(final[True], reloaded.state_dict(), atol=0)
    assert (output / "tokenizer.json").exists() and (output / "mudd.py").exists()


def test_trainer_loss_kwargs_average_over_all_accumulated_tokens(workspace, tmp_path):
    """Trainer passes `num_items_in_batch` (the label count of all accumulated micro-batches) to `forward`, which
    hands it to the loss: one step with 2 micro-batches of 2 must equal SGD on the token mean over all 4 examples."""
    # float64 throughout, so that the tolerance below can be derived from the computation (float32 at learning rate
    # 0.5 gave differences of ~1e-5 that depend on the machine's summation order)
    model = AutoModelForCausalLM.from_pretrained(workspace["model"], dtype=torch.float64)
    randomize_(model, seed=3)  # non-identity dense connections, so that their gradients are exercised too
    reference = AutoModelForCausalLM.from_pretrained(workspace["model"], dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    examples = [{"input_ids": ids} for ids in ([5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 0], [14, 15, 16, 17, 0], [18, 0])]
    collate = CausalLMPaddingCollator(pad_token_id=0)

    # forward itself: the summed token loss divided by the given count
    batch = collate(examples[:2])
    logits = model(**batch).logits
    summed = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss = model(**batch, num_items_in_batch=torch.tensor(13)).loss
    # transformers' causal-LM loss upcasts the logits to float32 (only to float32: from float64 that is a downcast)
    torch.testing.assert_close(loss.double(), summed / 13, rtol=1e-6, atol=0.0)

    lr = 0.5
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        optim="sgd", learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()

    def token_mean_loss(items):
        full = collate(items)
        full_logits = reference(**full).logits
        return torch.nn.functional.cross_entropy(
            full_logits[:, :-1].reshape(-1, VOCAB), full["labels"][:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum",
        ) / label_count  # the mean over every label token of the 4 examples

    label_count = collate(examples)["labels"][:, 1:].ne(-100).sum()
    # Per-example gradient magnitudes, for the tolerance.
    per_example = {name: torch.zeros_like(param) for name, param in reference.named_parameters()}
    for example in examples:
        reference.zero_grad()
        token_mean_loss([example]).backward()
        for name, param in reference.named_parameters():
            per_example[name] += param.grad.abs()
    reference.zero_grad()
    token_mean_loss(examples).backward()

    # The tolerance, derived. Both sides compute the same update `theta - lr * g`, in float64 except the loss, which
    # transformers computes in float32 on the trained side (above). So they differ by rounding only:
    # * float32 loss: each logit is rounded to float32 (relative u32 = 2**-24, i.e. an absolute error up to
    #   u32 * max|logit| in the exponent of the softmax) and the softmax over V entries sums V float32 terms
    #   (relative error V * u32) and divides and subtracts (2 more roundings). So each entry of d loss / d logits is
    #   off by at most (V + 2 + 2 * max|logit|) * u32 relative to the magnitude of the softmax terms; backward is
    #   linear in d loss / d logits, so to first order each parameter tensor's gradient is off by at most that factor
    #   times the largest of its per-example gradient magnitudes (`per_example` adds the examples' contributions
    #   without cancellation; per tensor, not per entry, because backward spreads each logit's error over the whole
    #   tensor; measured on this model the differences stay below a tenth of the bound);
    # * float64 sums in another order (two micro-batches padded to 8 and 5 tokens and accumulated, against one batch
    #   of 4 padded to 8): a sum of n terms is within n * u64 * sum|terms| of the exact one (Higham's gamma_n), with
    #   n = batch * sequence * widest dimension, through at most `chain` reductions in series;
    # * the update itself rounds by u64 * |theta|.
    # This comes to ~1e-6 at most here (the float32 loss dominates), while averaging per micro-batch instead of over all accumulated tokens moves
    # the parameters by ~1e-2.
    config = reference.config
    with torch.no_grad():
        max_logit = reference(**collate(examples)).logits.abs().max().item()
    widest = max(config.vocab_size, *(config.ffn_width(i) for i in range(config.num_hidden_layers)))
    chain = 2 * config.num_hidden_layers + 3
    u32, u64 = 2.0**-24, 2.0**-53
    relative = (config.vocab_size + 2 + 2 * max_logit) * u32 + chain * 4 * 8 * widest * u64
    with torch.no_grad():
        for name, param in reference.named_parameters():
            expected = param - lr * param.grad
            tolerance = lr * relative * per_example[name].max() + u64 * expected.abs().max()
            diff = (model.state_dict()[name] - expected).abs().max()
            assert diff <= tolerance, f"{name}: max |diff| {diff.item():.3g} > tolerance {tolerance.item():.3g}"


def test_resume_from_checkpoint_equals_uninterrupted_run(workspace, tmp_path):
    """8 steps in one go == 4 steps, stop, resume to 8 (dropout on: the RNG state must be restored, and the data
    order: 6 steps make an epoch, so the resumed run skips 4 batches and then crosses into epoch 2)."""

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_save = True
                control.should_training_stop = True

    model, data = workspace["dropout"], workspace["data"]
    straight = train(cli_args(model, data, tmp_path / "straight", "--max-steps", 8))
    expected = {k: v.detach().clone() for k, v in straight.model.state_dict().items()}

    interrupted = train(cli_args(model, data, tmp_path / "resumed", "--max-steps", 8), callbacks=[StopAt()])
    assert interrupted.state.global_step == 4 and (tmp_path / "resumed" / "checkpoint-4").is_dir()
    assert max((expected[k] - v).abs().max().item() for k, v in interrupted.model.state_dict().items()) > 1e-3

    # the command line, resuming from the last checkpoint in --output
    assert main(cli_args(model, data, tmp_path / "resumed", "--max-steps", 8, "--resume-from-checkpoint")) == 0
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    assert_states_close(expected, resumed.state_dict(), atol=1e-6)


# --------------------------------------------------------------------------- precision


def test_bf16_autocast_training_matches_float32_gradients():
    torch.manual_seed(0)
    model = MUDDPythiaForCausalLM(tiny_config()).train()
    randomize_(model, seed=4)
    ids = probe_ids()

    def gradients(autocast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    exact, mixed = gradients(False), gradients(True)
    for name in exact:
        assert torch.isfinite(mixed[name]).all(), name
        error = (mixed[name] - exact[name]).norm() / exact[name].norm().clamp_min(1e-8)
        assert error < 0.1, f"{name}: relative gradient error {error:.3f} under bf16 autocast"


def test_bf16_flag_falls_back_to_float32_with_a_message(workspace, tmp_path, monkeypatch, capsys):
    args = build_parser().parse_args(cli_args(workspace["model"], workspace["data"], tmp_path, "--bf16"))
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: False)
    assert training_arguments(args).bf16 is False
    assert "no native bfloat16 support; training in float32" in capsys.readouterr().err
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)
    assert training_arguments(args).bf16 is True
    assert training_arguments(build_parser().parse_args(cli_args(workspace["model"], workspace["data"], tmp_path))).bf16 is False


# --------------------------------------------------------------------------- LoRA and muddify


def test_lora_trains_adapters_and_dense_connections_only(workspace, tmp_path):
    output = tmp_path / "lora"
    # LoRA adapts a trained model to new data
    base_dir = workspace["pretrained"]
    args = build_parser().parse_args(cli_args(base_dir, workspace["other_data"], output, "--max-steps", 12,
                                              "--learning-rate", 2e-2, "--lora", "--merge-lora"))
    trainer = build_trainer(args)
    adapted = trainer.model
    trainable = {name for name, param in adapted.named_parameters() if param.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or ".dense.modules_to_save." in n for n in trainable), trainable
    adapted_layers = {n.split(".lora_B.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_B." in n}
    assert adapted_layers == set(LORA_TARGET_MODULES) - {"gate_proj"}  # MUDDPythia's FFN has no gate
    for dense_part in ("static_weights", "proj_in.weight", "proj_out.weight"):
        assert any(n.endswith(dense_part) for n in trainable), dense_part
    before = {name: param.detach().clone() for name, param in adapted.named_parameters()}

    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < 0.7 * losses[0], losses
    for name, param in adapted.named_parameters():
        if name in trainable and (".lora_B." in name or "static_weights" in name):
            assert not torch.equal(before[name], param), f"{name} did not train"
        elif name not in trainable:
            assert torch.equal(before[name], param), f"frozen {name} changed"
    save_result(trainer, args)

    ids = probe_ids()
    adapted.eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(output)
        reloaded = AutoPeftModelForCausalLM.from_pretrained(output / "adapter").eval()
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        assert isinstance(merged, MUDDPythiaForCausalLM)
        assert (merged(ids).logits - expected).abs().max().item() < 1e-5
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-5
        assert (base(ids).logits - expected).abs().max().item() > 1e-2  # the adapter does change the model

    frozen_dense = build_trainer(build_parser().parse_args(
        cli_args(workspace["model"], workspace["data"], tmp_path / "frozen", "--lora", "--lora-freeze-dense")
    ))
    trainable = [n for n, p in frozen_dense.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_muddify_plain_pythia_then_lora_adapter_reloads(workspace, tmp_path):
    torch.manual_seed(1)
    plain = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, rotary_pct=0.5,
    ))
    pythia = save_folder(tmp_path / "pythia", plain, char_tokenizer())
    output = tmp_path / "out"
    trainer = train(cli_args(pythia, workspace["data"], output, "--max-steps", 3, "--muddify", "--lora"))

    ids = probe_ids()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(output / "base")
        assert isinstance(base, MUDDPythiaForCausalLM)
        assert (base(ids).logits - plain.eval()(ids).logits).abs().max().item() < 1e-5  # identity dense connections
        config = json.loads((output / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((output / "base").resolve())
        reloaded = AutoPeftModelForCausalLM.from_pretrained(output).eval()
        expected = trainer.model.eval()(input_ids=ids).logits
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-5

    with pytest.raises(ValueError, match="not a MUDD model; --muddify converts"):
        build_trainer(build_parser().parse_args(cli_args(pythia, workspace["data"], tmp_path / "x")))
    with pytest.raises(ValueError, match="already holds a MUDD model"):
        build_trainer(build_parser().parse_args(cli_args(workspace["model"], workspace["data"], tmp_path / "x",
                                                         "--muddify")))


def test_muddformer_fine_tunes_and_lora_covers_its_swiglu(workspace, tmp_path):
    torch.manual_seed(0)
    config = MUDDFormerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64)
    model_dir = save_folder(tmp_path / "muddformer", MUDDFormerForCausalLM(config), char_tokenizer())
    trainer = train(cli_args(model_dir, workspace["data"], tmp_path / "full", "--max-steps", 12))
    losses = logged_losses(trainer)
    assert isinstance(trainer.model, MUDDFormerForCausalLM) and losses[-1] < 0.75 * losses[0], losses

    lora = build_trainer(build_parser().parse_args(cli_args(model_dir, workspace["data"], tmp_path / "lora", "--lora")))
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    adapted_layers = {n.split(".lora_B.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_B." in n}
    assert adapted_layers == set(LORA_TARGET_MODULES)
    assert any(".dense.modules_to_save." in n for n in trainable)


def test_rejected_option_combinations(workspace, tmp_path):
    def build(*extra):
        return build_trainer(build_parser().parse_args(cli_args(workspace["model"], workspace["data"], tmp_path, *extra)))

    with pytest.raises(ValueError, match="--fsdp needs GPUs"):  # accelerate would silently run DDP on CPU
        build("--fsdp")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        build("--max-length", 65)


# --------------------------------------------------------------------------- multi-process


def test_two_process_data_parallel_ranks_end_identical(workspace, tmp_path):
    dump, output = tmp_path / "dump", tmp_path / "ddp"
    dump.mkdir()
    run_torchrun("ddp", dump, "--",
                 *cli_args(workspace["model"], workspace["data"], output, "--max-steps", 4, "--batch-size", 4))
    ranks = [torch.load(dump / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["info"] == {"distributed_type": "DistributedType.MULTI_CPU", "world_size": 2, "backend": "gloo",
                                "wrapper": "DistributedDataParallel"}
    assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    initial = AutoModelForCausalLM.from_pretrained(workspace["model"]).state_dict()
    assert max((initial[k] - v).abs().max().item() for k, v in ranks[0]["state"].items()) > 1e-3
    assert_states_close(ranks[0]["state"], AutoModelForCausalLM.from_pretrained(output).state_dict(), atol=0)

    # The two ranks together made the steps one process makes with their joint batch of 8: same data order,
    # gradients averaged over all tokens of both ranks (`num_items_in_batch` gathered across processes).
    single = train(cli_args(workspace["model"], workspace["data"], tmp_path / "single", "--max-steps", 4))
    assert_states_close(single.model.state_dict(), ranks[0]["state"], atol=1e-5)


def test_two_process_fsdp2_wraps_no_split_modules_and_matches_unsharded(workspace, tmp_path):
    run_torchrun("fsdp", tmp_path, workspace["model"])
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    result = results[0]
    assert all(results[1][key] == value for key, value in result.items() if key != "local_numel")
    # accelerate's TRANSFORMER_BASED_WRAP policy, from `_no_split_modules`: each decoder layer and the dense module
    assert sorted(result["wrapped"]) == ["MUDDDecoderLayer", "MUDDDecoderLayer", "MUDDDenseConnections"]
    assert result["local_numel"] < 0.6 * result["full_numel"]  # each rank holds about half of every parameter
    assert result["max_diff_vs_unsharded"] < 1e-5
    assert result["max_change_from_init"] > 1e-3


# --------------------------------------------------------------------------- faults and hostile input (issue 12)


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_bad_paths_are_one_line_errors(workspace, tmp_path, capsys):
    model, data = workspace["model"], workspace["data"]
    (tmp_path / "notes.txt").write_text("hello\n")
    cases = [
        (cli_args(tmp_path / "missing", data, tmp_path / "o1"), f"{tmp_path / 'missing'}: no such model folder"),
        (cli_args(tmp_path / "notes.txt", data, tmp_path / "o2"), f"{tmp_path / 'notes.txt'}: is a file, not a model folder"),
        (cli_args(model, tmp_path / "nope.jsonl", tmp_path / "o3"), f"--data {tmp_path / 'nope.jsonl'}: no such file"),
        (cli_args(model, data, tmp_path / "o4", "--tokenizer", tmp_path / "tok"), f"{tmp_path / 'tok'}: no such tokenizer folder"),
        (cli_args(model, data, tmp_path / "notes.txt" / "out"), f"{tmp_path / 'notes.txt'} is a file, not a folder"),
        (cli_args(model, data, model), "is, contains or lies inside the model folder"),
        (cli_args(model, data, model / "ft"), "is, contains or lies inside the model folder"),
        (cli_args(model, data, model.parent), "is, contains or lies inside the model folder"),
    ]
    before = (model / "model.safetensors").read_bytes()
    for argv, message in cases:
        code, lines = run_cli(capsys, *argv)
        assert code == 1 and len(lines) == 1 and message in lines[0], (message, lines)
        assert "Repo id" not in lines[0]
    assert (model / "model.safetensors").read_bytes() == before


def test_data_encoding_bom_and_bad_bytes(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffthe cat sat\non the mat\n".encode("utf-8"))
    assert read_texts([tmp_path / "bom.txt"]) == ["the cat sat", "on the mat"]  # no U+FEFF glued to "the"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a dog"}).encode() + b"\n")
    assert read_texts([tmp_path / "bom.jsonl"]) == ["a dog"]
    (tmp_path / "latin1.txt").write_bytes("fine\nalso fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt line 3: not UTF-8 \(byte 0xe9 at byte 4 of the line\)"):
        read_texts([tmp_path / "latin1.txt"])


def test_model_folder_with_missing_weights_is_refused(workspace, tmp_path, capsys):
    folder = tmp_path / "incomplete"
    shutil.copytree(workspace["model"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.dense.layers.0.proj_out.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    code, lines = run_cli(capsys, *cli_args(folder, workspace["data"], tmp_path / "out", "--max-steps", 1))
    assert code == 1 and "the saved weights lack 1 tensors the model needs" in lines[0]
    assert "model.dense.layers.0.proj_out.weight" in lines[0] and not (tmp_path / "out" / "model.safetensors").exists()


def test_a_nan_loss_stops_training_before_anything_of_it_is_saved(workspace, tmp_path, capsys):
    class Poison(TrainerCallback):  # a fault that turns a weight into NaN before step 3's forward
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("nan")

    output = tmp_path / "out"
    args = build_parser().parse_args(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 6,
                                              "--save-steps", 1))
    trainer = build_trainer(args)
    trainer.add_callback(Poison())
    with pytest.raises(finetune.NonFiniteError, match="the training loss became nan at step 3"):
        trainer.train()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (output / "model.safetensors").exists()


def test_non_finite_weights_after_an_optimizer_step_stop_training(workspace, tmp_path):
    class PoisonGradients(TrainerCallback):  # finite loss, NaN gradients: the step itself makes the weights NaN
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                model.model.embed_tokens.weight.register_hook(lambda grad: grad * float("nan"))

    output = tmp_path / "out"
    args = build_parser().parse_args(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 4,
                                              "--save-steps", 1))
    trainer = build_trainer(args)
    trainer.add_callback(PoisonGradients())
    with pytest.raises(finetune.NonFiniteError, match="weights became non-finite .* in step 2"):
        trainer.train()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]


def test_damaged_or_partial_checkpoints_are_skipped_and_the_choice_is_said(workspace, tmp_path, capsys):
    output = tmp_path / "run"
    model, data = workspace["model"], workspace["data"]
    train(cli_args(model, data, output, "--max-steps", 4, "--save-steps", 1))
    assert all((output / f"checkpoint-{k}" / finetune.CHECKPOINT_MANIFEST).is_file() for k in range(1, 5))
    capsys.readouterr()
    # checkpoint-4: 4 KB of random bytes in the weights' data region (what once ended in exit 0 with NaN weights)
    weights = output / "checkpoint-4" / "model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[-6000:-6000 + 4096] = os.urandom(4096)
    weights.write_bytes(bytes(data_bytes))
    # checkpoint-3: partial (its trainer_state.json was never written)
    (output / "checkpoint-3" / "trainer_state.json").unlink()
    code = main(cli_args(model, data, output, "--max-steps", 4, "--save-steps", 1, "--resume-from-checkpoint"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"skipping {output / 'checkpoint-4'}: model.safetensors differs from what was saved" in err
    assert f"skipping {output / 'checkpoint-3'}: no trainer_state.json" in err
    assert f"resuming from {output / 'checkpoint-2'}" in err
    final = AutoModelForCausalLM.from_pretrained(output).state_dict()
    assert all(torch.isfinite(t).all() for t in final.values())
    # given explicitly, a partial checkpoint is an error, not a silent fallback
    (output / "checkpoint-3" / "trainer_state.json").unlink()  # (the resumed run had saved it again)
    code, lines = run_cli(capsys, *cli_args(model, data, output, "--resume-from-checkpoint", output / "checkpoint-3"))
    assert code == 1 and lines == [f"mudd-finetune: error: --resume-from-checkpoint {output / 'checkpoint-3'}: "
                                   "cannot resume from it: no trainer_state.json (a partial checkpoint: its save did not finish)"]


def test_final_model_is_staged_beside_the_output_and_published_in_one_rename(workspace, tmp_path, monkeypatch):
    """The final model and this run's checkpoints are gathered in the staging folder beside the output, which then
    takes the output's place: the folder changes in one rename, never file by file."""
    moves, real_replace = [], os.replace

    def replace(a, b):
        moves.append((Path(a).name, Path(b).name))
        real_replace(a, b)

    monkeypatch.setattr(training.os, "replace", replace)
    monkeypatch.setattr("modeling_muddpythia.safe_output.os.replace", replace)
    output = tmp_path / "out"
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 2, "--save-steps", 1)) == 0
    structural = [move for move in moves if not move[0].startswith((".mudd", "."+finetune.CHECKPOINT_MANIFEST))]
    staging = ".out.partial-final"
    assert ("checkpoint-1", "checkpoint-1") in structural and ("checkpoint-2", "checkpoint-2") in structural
    assert structural[-1] == (staging, "out")  # the last move publishes everything at once
    assert not any(name == "model.safetensors" for move in structural for name in move)  # no file-by-file moves
    names = {p.name for p in output.iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "config.json", "model.safetensors", "tokenizer.json",
            "trainer_state.json"} <= names
    assert sorted(name for name in names if name.startswith(".")) == [training.OWNER_MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, lock or replaced folder left


def test_attention_mask_of_the_wrong_length_is_an_error():
    model = MUDDPythiaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"`attention_mask` has length 5, expected cached \+ new tokens = 0 \+ 6 = 6"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    out = model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long), use_cache=True)
    step = torch.randint(0, VOCAB, (2, 1))
    model(step, attention_mask=torch.ones(2, 7, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match=r"expected cached \+ new tokens = 7 \+ 1 = 8"):
        model(step, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=out.past_key_values)


def test_file_size_limit_while_saving_is_one_line(workspace, tmp_path):
    """`ulimit -f` (or a full disk) while a checkpoint is written: one line naming the cause, exit code 1."""
    import resource

    limit = 60_000  # the config and tokenizer fit, the weights (about 250 KB) do not

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = cli_args(workspace["model"], workspace["data"], tmp_path / "out", "--max-steps", 2, "--save-steps", 1)
    env = dict(os.environ, **OFFLINE_ENV, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "modeling_muddpythia.cli_finetune", *argv], capture_output=True, text=True,
                            preexec_fn=set_limit, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "file size limit" in lines[0] and str(tmp_path / "out") in lines[0], lines


# --------------------------------------------------------------------------- output ownership and argument checks


def cli_env() -> dict[str, str]:
    return dict(os.environ, **OFFLINE_ENV, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(workspace, tmp_path):
    """Two processes: while the first trains into --output, the second exits 1 at once naming the first's pid; the
    first's output is untouched by it; once the first is gone, the output (its own) takes a new run."""
    output = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "modeling_muddpythia.cli_finetune",
         *cli_args(workspace["model"], workspace["data"], output, "--max-steps", 100000, "--save-steps", 5)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / "checkpoint-5" / finetune.CHECKPOINT_MANIFEST).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "modeling_muddpythia.cli_finetune",
             *cli_args(workspace["model"], workspace["data"], output, "--max-steps", 1)],
            capture_output=True, text=True, env=cli_env(), timeout=120)
        lines = [line for line in second.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
        assert f"another mudd-finetune run (pid {first.pid}) is writing this output right now" in lines[0]
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the killed run's output is its own: a new run resumes from its newest complete checkpoint
    newest = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*")
                 if training.checkpoint_problem(p) is None)
    code = main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", newest + 1, "--save-steps", 5,
                         "--resume-from-checkpoint"))
    assert code == 0 and (output / "model.safetensors").is_file()
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == newest + 1


def test_another_models_folder_is_refused_without_force_and_replaced_whole_with_it(workspace, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(workspace["model"], other)  # saved by save_pretrained, not by mudd-finetune
    (other / "README.md").write_text("# another model's card\n")
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    argv = cli_args(workspace["model"], workspace["data"], other, "--max-steps", 2)
    code, lines = run_cli(capsys, *argv)
    assert code == 1 and len(lines) == 1 and f"--output {other}: holds files mudd-finetune did not write" in lines[0]
    assert "--force" in lines[0]
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before  # untouched
    # with --force the folder becomes this run's result as a whole: the old card does not stay beside it
    assert main([*argv, "--force"]) == 0
    assert not (other / "README.md").exists() and (other / training.OWNER_MARKER).is_file()
    assert (other / "model.safetensors").read_bytes() != before["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(other)
    # a folder that is the output of the other command is not ours either
    pretrain_out = tmp_path / "pretrained-elsewhere"
    pretrain_out.mkdir()
    safe_output.mark_owner(pretrain_out, "mudd-pretrain")
    (pretrain_out / "config.json").write_text("{}")
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], pretrain_out, "--max-steps", 1))
    assert code == 1 and "holds the output of mudd-pretrain" in lines[0]


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(workspace, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 3, "--save-steps", 3)) == 0
    capsys.readouterr()
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], output, "--max-steps", 2,
                                            "--save-steps", 1))
    assert code == 1 and len(lines) == 1
    assert "holds the checkpoints of an earlier run (add --resume-from-checkpoint to continue it)" in lines[0]
    # --force starts over: the result holds this run's checkpoints only
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 2, "--save-steps", 1,
                         "--force")) == 0
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2


def test_an_unmarked_output_of_an_earlier_finetune_still_resumes(workspace, tmp_path):
    """Outputs written before the ownership marker existed are recognised by their checksummed checkpoints."""
    output = tmp_path / "old"
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 2, "--save-steps", 1)) == 0
    (output / training.OWNER_MARKER).unlink()
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 3, "--save-steps", 1,
                         "--resume-from-checkpoint")) == 0
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    assert (output / training.OWNER_MARKER).is_file()


def test_a_failed_run_leaves_nothing_behind_and_a_forced_folder_as_it_was(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"no text": 1}\n')
    output = tmp_path / "new"
    code, lines = run_cli(capsys, *cli_args(workspace["model"], bad, output, "--max-steps", 2))
    assert code == 1 and "bad.jsonl line 2: expected an object with a string field 'text'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, lock or staging folder
    # a folder taken with --force goes back to what it held
    other = tmp_path / "other"
    shutil.copytree(workspace["model"], other)
    before = sorted(p.relative_to(other).as_posix() for p in other.rglob("*"))
    code, _ = run_cli(capsys, *cli_args(workspace["model"], bad, other, "--max-steps", 2, "--force"))
    assert code == 1 and sorted(p.relative_to(other).as_posix() for p in other.rglob("*")) == before
    # an empty folder the user made stays, empty
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = run_cli(capsys, *cli_args(workspace["model"], bad, empty, "--max-steps", 2))
    assert code == 1 and list(empty.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed_and_a_users_staging_folder_is_refused(workspace, tmp_path, capsys):
    """Beside the output, the staging and replaced folders a killed run left (they carry the claim marker) are removed
    by the next run; a folder of the user's at the staging path is an error and stays."""
    output = tmp_path / "out"
    staging = safe_output.make_staging(output, "mudd-finetune", "final")
    (staging / "model.safetensors").write_bytes(b"half written")
    replaced = safe_output.make_staging(output, "mudd-finetune")
    replaced = replaced.rename(replaced.with_name(replaced.name.replace(".partial-", ".replaced-")))
    users = tmp_path / ".out.old-1"
    users.mkdir()
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 1)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-1", "out"]

    mine = tmp_path / "mine"
    (tmp_path / ".mine.partial-final").mkdir()
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], mine, "--max-steps", 1))
    assert code == 1 and lines == [f"mudd-finetune: error: --output {mine}: {tmp_path / '.mine.partial-final'} exists "
                                   "and was not written by mudd-finetune; move it away (this run stages its final "
                                   "model there)"]
    assert (tmp_path / ".mine.partial-final").is_dir() and not mine.exists()


def test_a_failed_final_save_leaves_the_previous_result_whole(workspace, tmp_path, monkeypatch, capsys):
    """The disk fills up at the final rename: the output keeps the previous run's model and all checkpoints, and
    no staging folder stays."""
    output = tmp_path / "out"
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 2, "--save-steps", 1)) == 0
    before = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    real_publish = training.publish

    def full_disk(staging, target, tool):
        assert (staging / "checkpoint-3").is_dir()  # the checkpoints were gathered with the final model
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(training, "publish", full_disk)
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], output, "--max-steps", 3,
                                            "--save-steps", 1, "--resume-from-checkpoint"))
    assert code == 1 and len(lines) == 1 and f"{output}: the disk is full" in lines[0]
    after = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if not k.startswith("checkpoint-3/")} == before
    assert (output / "checkpoint-3" / finetune.CHECKPOINT_MANIFEST).is_file()  # back in place, for resuming
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(training, "publish", real_publish)
    assert main(cli_args(workspace["model"], workspace["data"], output, "--max-steps", 3, "--save-steps", 1,
                         "--resume-from-checkpoint")) == 0
    # checkpoint-3 had reached --max-steps: its weights are the result, no step is added
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    final, saved = load_file(output / "model.safetensors"), load_file(output / "checkpoint-3" / "model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_a_full_disk_at_the_final_save_of_a_new_output_leaves_nothing(workspace, tmp_path):
    import resource

    limit = 60_000  # the config and tokenizer fit, the weights (about 250 KB) do not

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    (tmp_path / "out").parent.mkdir(exist_ok=True)
    argv = cli_args(workspace["model"], workspace["data"], tmp_path / "out", "--max-steps", 1)
    result = subprocess.run([sys.executable, "-m", "modeling_muddpythia.cli_finetune", *argv], capture_output=True,
                            text=True, preexec_fn=set_limit, env=cli_env(), timeout=300)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 1 and len(lines) == 1 and "file size limit" in lines[0], result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "-3"], "argument --epochs: must be at least 0, got -3"),
    (["--max-steps", "-5", "--epochs", "0"], "argument --max-steps: must be at least 1, got -5"),
    (["--epochs", "0"], "--epochs 0 trains nothing"),
    (["--epochs", "nan"], "argument --epochs: must be a finite number, got 'nan'"),
    (["--learning-rate", "inf"], "argument --learning-rate: must be a finite number, got 'inf'"),
    (["--learning-rate", "0"], "argument --learning-rate: must be greater than 0, got 0"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be at least 0, got -0.1"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--lora-dropout", "1"], "argument --lora-dropout: must be less than 1, got 1"),
    (["--lora-alpha", "-16"], "argument --lora-alpha: must be greater than 0, got -16"),
    (["--lr-scheduler", "cosine_typo"], "argument --lr-scheduler: invalid choice: 'cosine_typo'"),
    (["--max-length", "1"], "argument --max-length: must be at least 2, got 1"),
    (["--max-data-bytes", "0"], "argument --max-data-bytes: must be at least 1, got 0"),
    (["--merge-lora"], "--merge-lora and --lora-freeze-dense need --lora"),
    (["--fsdp", "--lora"], "--fsdp with --lora is not supported"),
])
def test_every_bad_option_is_one_line_before_any_work(workspace, tmp_path, capsys, extra, message):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(workspace["model"], workspace["data"], output, *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("mudd-finetune: error: ") and not output.exists()


def test_epochs_zero_with_max_steps_is_valid(workspace, tmp_path):
    output = tmp_path / "out"
    assert main(cli_args(workspace["model"], workspace["data"], output, "--epochs", 0, "--max-steps", 1)) == 0
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 1


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(workspace, tmp_path, capsys):
    big = char_tokenizer()
    big.add_tokens([f"<extra_{i}>" for i in range(5)])
    big.save_pretrained(tmp_path / "big")
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], tmp_path / "o1",
                                            "--tokenizer", tmp_path / "big", "--max-steps", 1))
    assert code == 1 and len(lines) == 1
    assert f"--tokenizer: the tokenizer has {VOCAB + 5} ids but the model's vocabulary has {VOCAB}" in lines[0]
    assert not (tmp_path / "o1").exists()
    char_tokenizer().save_pretrained(tmp_path / "same")  # the neighbour: as many ids as the vocabulary
    assert main(cli_args(workspace["model"], workspace["data"], tmp_path / "o2", "--tokenizer", tmp_path / "same",
                         "--max-steps", 1)) == 0


def test_resuming_from_another_models_checkpoint_is_refused(workspace, tmp_path, capsys):
    wide = save_folder(tmp_path / "wide", MUDDPythiaForCausalLM(tiny_config(hidden_size=64)), char_tokenizer())
    other_run = tmp_path / "wide-run"
    assert main(cli_args(wide, workspace["data"], other_run, "--max-steps", 1, "--save-steps", 1)) == 0
    capsys.readouterr()
    code, lines = run_cli(capsys, *cli_args(workspace["model"], workspace["data"], tmp_path / "out", "--max-steps", 2,
                                            "--resume-from-checkpoint", other_run / "checkpoint-1"))
    assert code == 1 and len(lines) == 1
    assert f"--resume-from-checkpoint {other_run / 'checkpoint-1'}: cannot resume from it: it was saved from another " \
           "model (hidden_size 64, this model has 32)" in lines[0]
    # without its config.json the tensors tell
    (other_run / "checkpoint-1" / "config.json").unlink()
    problem = training.checkpoint_mismatch(other_run / "checkpoint-1", MUDDPythiaForCausalLM(tiny_config()))
    assert f"has shape ({VOCAB}, 64), this model's is ({VOCAB}, 32)" in problem
    # the neighbour: a checkpoint of the same model resumes
    assert training.checkpoint_mismatch(other_run / "checkpoint-1", MUDDPythiaForCausalLM(tiny_config(hidden_size=64))) is None


def test_data_is_read_with_a_bound(workspace, tmp_path, capsys):
    """An endless single line (/dev/zero) and an endless stream of lines (a FIFO fed forever) end in one-line errors
    naming the option, within a memory limit far below what reading them whole would take."""
    (tmp_path / "zeros.txt").symlink_to("/dev/zero")
    with pytest.raises(finetune.FinetuneError, match=r"zeros.txt line 1: longer than --max-document-bytes \(1000 bytes\)"):
        read_texts([tmp_path / "zeros.txt"], max_document_bytes=1000)
    fifo = tmp_path / "endless.txt"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"import sys\nwith open({str(fifo)!r}, 'w') as f:\n"
                               "    while True: f.write('the cat sat\\n')"], stderr=subprocess.DEVNULL)
    try:
        code, lines = run_cli(capsys, *cli_args(workspace["model"], fifo, tmp_path / "out", "--max-steps", 1,
                                                "--max-data-bytes", 1_000_000))
        assert code == 1 and len(lines) == 1 and "--data: more than --max-data-bytes bytes to read" in lines[0]
    finally:
        writer.kill()
        writer.wait()
    # the whole command with the default bounds, in a process limited to 4 GiB of address space: /dev/zero is
    # refused after 16 MiB
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    argv = cli_args(workspace["model"], tmp_path / "zeros.txt", tmp_path / "out2", "--max-steps", 1)
    result = subprocess.run([sys.executable, "-m", "modeling_muddpythia.cli_finetune", *argv], capture_output=True,
                            text=True, env=cli_env(), preexec_fn=limit_memory, timeout=300)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "zeros.txt line 1: longer than --max-document-bytes (16777216 bytes)" in lines[0]
    assert not (tmp_path / "out2").exists()
    # the neighbour: a file within the bounds reads
    assert read_texts([workspace["data"]], max_data_bytes=workspace["data"].stat().st_size)[0]


def test_imports_run_one_way():
    """train_options imports nothing of the package nor anything heavy; finetune never imports the commands."""
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((Path(finetune.__file__).parent / f"{module}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return found

    assert imports("train_options") <= {"__future__", "argparse", "math"}
    for module in ("finetune", "training", "pretrain"):
        assert not {name for name in imports(module) if "cli_" in name}, module
    assert ".finetune" in imports("cli_finetune") and ".train_options" in imports("finetune")
