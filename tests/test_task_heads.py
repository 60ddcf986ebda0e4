"""The MUDD decoders' task heads: sequence classification, token classification, extractive question answering.

References: transformers' own GPT-NeoX and Llama heads (a muddified model, identity dense connections, computes
their function), the pooling rule written out by hand on a model with non-identity dense connections, loading under
the Auto classes (installed package and remote code), and training with `Trainer` and TRL's `RewardTrainer`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
    AutoModelForTokenClassification, GPTNeoXConfig, LlamaConfig, Trainer, TrainingArguments,
)

import modeling_muddpythia
from modeling_muddpythia import MUDDFormerConfig, MUDDFormerForCausalLM, muddify

from helpers import TASK_HEADS
from mudd_reference import randomize_


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints" / "depth8-muddpythia"
VOCAB, PAD = 97, 0
AUTO_CLASSES = {
    "SequenceClassification": AutoModelForSequenceClassification,
    "TokenClassification": AutoModelForTokenClassification,
    "QuestionAnswering": AutoModelForQuestionAnswering,
}
OUTPUT_KEYS = {"SequenceClassification": ("logits",), "TokenClassification": ("logits",),
               "QuestionAnswering": ("start_logits", "end_logits")}


def plain_config(family: str, **task_fields):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=PAD, attn_implementation="eager", **task_fields)
    if family == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.5, **common)
    return LlamaConfig(num_key_value_heads=2, **common)


def plain_task_model(family: str, task: str, seed: int = 0, **task_fields):
    """transformers' GPT-NeoX / Llama task model with random weights (norm scales and head biases off their init)."""
    torch.manual_seed(seed)
    prefix = "GPTNeoX" if family == "gpt_neox" else "Llama"
    model = getattr(transformers, f"{prefix}For{task}")(plain_config(family, **task_fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    return model


def padded_batch(side: str, pad: int = PAD) -> dict[str, torch.Tensor]:
    """Three rows of lengths 9, 5, 2 (real ids are 2 or more, never a pad id), padded with `pad` on `side`; left
    padding also gives the positions `generate` would use."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, VOCAB, (n,), generator=generator) for n in (9, 5, 2)]
    ids, mask = torch.full((3, 9), pad), torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(9 - len(row), 9) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if side == "left":
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def labels_for(task: str, batch: dict, problem_type: str | None, num_labels: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    if task == "QuestionAnswering":
        return {"start_positions": torch.tensor([1, 4, 8]), "end_positions": torch.tensor([3, 6, 20])}  # 20: outside
    if task == "TokenClassification":
        labels = torch.randint(0, num_labels, batch["input_ids"].shape, generator=generator)
        return {"labels": labels.masked_fill(batch["attention_mask"] == 0, -100)}
    if problem_type == "regression":
        return {"labels": torch.randn(3, generator=generator)}
    if problem_type == "multi_label_classification":
        return {"labels": torch.randint(0, 2, (3, num_labels), generator=generator).float()}
    return {"labels": torch.randint(0, num_labels, (3,), generator=generator)}


CASES = [
    ("SequenceClassification", "single_label_classification", 3),
    ("SequenceClassification", "multi_label_classification", 3),
    ("SequenceClassification", "regression", 1),
    ("TokenClassification", None, 4),
    ("QuestionAnswering", None, 2),
]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("task,problem_type,num_labels", CASES)
def test_muddified_task_model_matches_transformers_head(family, task, problem_type, num_labels):
    """muddify of a GPT-NeoX / Llama task model: our head class, the same head weights, and logits and loss equal to
    transformers' head (<= 1e-5) with padding on either side."""
    fields = {"num_labels": num_labels} if task != "QuestionAnswering" else {}
    if task == "SequenceClassification":
        fields["problem_type"] = problem_type
    plain = plain_task_model(family, task, **fields)
    mudd = muddify(plain)
    assert type(mudd).__name__ == ("MUDDPythia" if family == "gpt_neox" else "MUDDFormer") + f"For{task}"
    assert type(mudd) is type(AUTO_CLASSES[task].from_config(mudd.config))
    assert mudd.config.num_labels == plain.config.num_labels and mudd.config.problem_type == plain.config.problem_type
    plain_head = {k: v for k, v in plain.state_dict().items() if not k.startswith(f"{plain.base_model_prefix}.")}
    mudd_head = {k: v for k, v in mudd.state_dict().items() if not k.startswith("model.")}
    assert len(plain_head) == len(mudd_head) > 0
    for name, tensor in plain_head.items():  # GPT-NeoX's token classifier is `classifier`; ours is `score`
        assert torch.equal(mudd_head[name.replace("classifier.", "score.")], tensor), name
    for side in ("left", "right"):
        batch = padded_batch(side)
        labels = labels_for(task, batch, problem_type, num_labels)
        with torch.no_grad():
            expected, got = plain(**batch, **labels), mudd(**batch, **labels)
        for key in OUTPUT_KEYS[task]:
            assert got[key].shape == expected[key].shape, key
            assert (got[key] - expected[key]).abs().max() <= 1e-5, (side, key)
        assert abs(got.loss.item() - expected.loss.item()) <= 1e-5, side


def test_muddify_keeps_the_token_classifier_dropout():
    plain = plain_task_model("gpt_neox", "TokenClassification", classifier_dropout=0.3, num_labels=4)
    mudd = muddify(plain)
    assert mudd.dropout.p == 0.3 and mudd.config.classifier_dropout == 0.3
    fresh = AutoModelForTokenClassification.from_config(tiny_mudd_config(hidden_dropout=0.05))
    assert fresh.dropout.p == 0.05  # no `classifier_dropout`: the config's hidden dropout


def tiny_mudd_config(**overrides) -> MUDDFormerConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, max_position_embeddings=64, pad_token_id=PAD, num_labels=3)
    return MUDDFormerConfig(**{**fields, **overrides})


def test_sequence_classifier_reads_the_last_real_token():
    """With non-identity dense connections: the pooled logits are `score` of the final hidden state at the last
    token that is not the pad id, and a right-padded row scores as it does alone."""
    model = AutoModelForSequenceClassification.from_config(tiny_mudd_config(), attn_implementation="eager").eval()
    randomize_(model, seed=3)
    batch = padded_batch("right")
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.model(**batch).last_hidden_state
        last = batch["attention_mask"].sum(-1) - 1
        torch.testing.assert_close(logits, model.score(hidden[torch.arange(3), last]), rtol=0, atol=1e-6)
        for row in range(3):
            alone = model(batch["input_ids"][row : row + 1, : last[row] + 1]).logits
            assert (alone[0] - logits[row]).abs().max() < 1e-5, row
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="no padding token"):
        model(**batch)


def test_task_models_load_a_causal_lm_folder_with_its_backbone(tmp_path):
    """A saved causal LM loads under each task's Auto class (installed package): same backbone weights, a new head;
    the saved task model reloads with identical outputs and an `auto_map` naming every head."""
    causal = MUDDFormerForCausalLM(tiny_mudd_config()).eval()
    causal.save_pretrained(tmp_path / "lm")
    batch = padded_batch("right")
    for task, auto_class in AUTO_CLASSES.items():
        model = auto_class.from_pretrained(tmp_path / "lm", num_labels=5).eval()
        assert type(model) is getattr(modeling_muddpythia, f"MUDDFormerFor{task}")
        for name, tensor in causal.model.state_dict().items():
            assert torch.equal(model.model.state_dict()[name], tensor), name
        model.save_pretrained(tmp_path / task)
        saved = json.loads((tmp_path / task / "config.json").read_text())
        assert saved["architectures"] == [f"MUDDFormerFor{task}"]
        assert {f"AutoModelFor{t}" for t in TASK_HEADS} | {"AutoModelForCausalLM"} <= set(saved["auto_map"])
        reloaded = auto_class.from_pretrained(tmp_path / task).eval()
        with torch.no_grad():
            for key in OUTPUT_KEYS[task]:
                torch.testing.assert_close(reloaded(**batch)[key], model(**batch)[key], rtol=0, atol=1e-6)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "SequenceClassification")) is MUDDFormerForCausalLM


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_muddpythia"] = None  # the installed package must not be importable
    import torch
    import transformers
    path, out = sys.argv[1:3]
    batch = torch.load(out + "/batch.pt")
    results = {}
    for task in ("SequenceClassification", "TokenClassification", "QuestionAnswering"):
        auto_class = getattr(transformers, "AutoModelFor" + task)
        model = auto_class.from_pretrained(path, trust_remote_code=True, num_labels=3).eval()
        with torch.no_grad():
            outputs = model(**batch)
        results[task] = {
            "class": type(model).__name__, "module": type(model).__module__,
            "head": {k: v for k, v in model.state_dict().items() if not k.startswith("model.")},
            "outputs": {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)},
        }
    torch.save(results, out + "/remote.pt")
    """
)


@pytest.mark.parametrize("folder", ["shipped-muddpythia", "saved-muddformer"])
def test_causal_lm_folder_loads_under_each_task_auto_class_as_remote_code(folder, tmp_path):
    """In a process where our package cannot be imported, `AutoModelFor<task>.from_pretrained(causal-LM folder,
    trust_remote_code=True)` builds our head class from the folder's code; with the same head weights its outputs
    equal the installed package's."""
    if folder == "shipped-muddpythia":
        path, family = SHIPPED, "MUDDPythia"
    else:
        path, family = tmp_path / "lm", "MUDDFormer"
        MUDDFormerForCausalLM(tiny_mudd_config(vocab_size=200, pad_token_id=1)).save_pretrained(path)
    batch = padded_batch("left", pad=1)  # the pad id of both folders
    torch.save(batch, tmp_path / "batch.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", _REMOTE_SCRIPT, str(path), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    for task, auto_class in AUTO_CLASSES.items():
        got = remote[task]
        assert got["class"] == f"{family}For{task}" and got["module"].startswith("transformers_modules"), got["module"]
        local = auto_class.from_pretrained(path, num_labels=3).eval()
        assert type(local).__module__.startswith("modeling_muddpythia.")
        local.load_state_dict(got["head"], strict=False)
        with torch.no_grad():
            expected = local(**batch)
        assert set(got["outputs"]) == set(OUTPUT_KEYS[task])
        for key in OUTPUT_KEYS[task]:
            assert (got["outputs"][key] - expected[key]).abs().max() < 1e-6, (task, key)


def _quiet_training_args(tmp_path: Path, **overrides) -> dict:
    return dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0, **overrides)


def test_trainer_fine_tunes_a_sequence_classifier(tmp_path):
    """`Trainer` on a small labelled set (does the sequence contain token 7?), rows right-padded to different
    lengths: the evaluation loss falls well below its start and the classifier learns the rule."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(4)
    rows = []
    for i in range(64):
        length = 4 + i % 5
        ids = torch.randint(8, VOCAB, (length,), generator=generator)
        label = i % 2
        if label:
            ids[torch.randint(0, length, (1,), generator=generator)] = 7
        padded = torch.cat([ids, torch.full((8 - length,), PAD)])
        mask = [1] * length + [0] * (8 - length)
        rows.append({"input_ids": padded.tolist(), "attention_mask": mask, "labels": label})
    data = Dataset.from_list(rows)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_mudd_config(num_labels=2, num_hidden_layers=2))
    args = TrainingArguments(**_quiet_training_args(tmp_path, num_train_epochs=12, per_device_train_batch_size=16,
                                                    learning_rate=3e-3, warmup_steps=4))
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    with torch.no_grad():
        predictions = model.eval()(torch.tensor(data["input_ids"]), attention_mask=torch.tensor(data["attention_mask"]))
    accuracy = (predictions.logits.argmax(-1) == torch.tensor(data["labels"])).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_trl_reward_trainer_trains_a_mudd_reward_model(tmp_path):
    """TRL's `RewardTrainer` builds the reward model from the shipped MUDDPythia causal-LM folder itself (through
    `AutoModelForSequenceClassification`, one label) and trains it on preference pairs: the pairwise loss falls and
    every chosen answer ends with a higher reward than its rejected one."""
    import trl  # the test extra installs it
    from datasets import Dataset

    words = ["A", "B", "C", "D", "E", "F", "G", "H", "J", "K", "L", "M"]
    pairs = []
    for i in range(8):
        a, b, c = words[i % 12], words[(i + 3) % 12], words[(i + 7) % 12]
        pairs.append({"chosen": f"copy {a} {b} {c} = {a} {b} {c} .", "rejected": f"copy {a} {b} {c} = {c} {a} ."})
    data = Dataset.from_list(pairs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    args = trl.RewardConfig(**_quiet_training_args(tmp_path, num_train_epochs=10, per_device_train_batch_size=4,
                                                   learning_rate=1e-3), model_init_kwargs={"dtype": torch.float32})
    trainer = trl.RewardTrainer(model=str(SHIPPED), args=args, train_dataset=data, processing_class=tokenizer)
    assert type(trainer.model).__name__ == "MUDDPythiaForSequenceClassification"
    assert trainer.model.config.num_labels == 1 and trainer.model.config.pad_token_id == tokenizer.pad_token_id

    def rewards(texts):
        encoded = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
        with torch.no_grad():
            return trainer.model.eval()(**encoded).logits[:, 0]

    def pairwise_loss():
        return -torch.nn.functional.logsigmoid(rewards(data["chosen"]) - rewards(data["rejected"])).mean().item()

    before = pairwise_loss()
    trainer.train()
    after = pairwise_loss()
    assert after < 0.5 * before, (before, after)
    assert (rewards(data["chosen"]) > rewards(data["rejected"])).all()


def test_compiled_classifier_training_step_equals_eager():
    """A sequence classifier (non-identity dense connections, padded batch) compiles as one graph with its backward
    (`fullgraph=True`; the `aot_eager` backend, as inductor's code generation is what tests/test_compile.py covers
    for the backbone): the same loss and gradients as eager."""
    torch._dynamo.reset()
    model = AutoModelForSequenceClassification.from_config(
        tiny_mudd_config(num_hidden_layers=2), attn_implementation="sdpa"
    ).train()
    randomize_(model, seed=5, scale=0.1)
    batch = {**padded_batch("right"), "labels": torch.tensor([0, 2, 1])}

    def step(run):
        model.zero_grad(set_to_none=True)
        loss = run(**batch).loss
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager_grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    assert abs(compiled_loss - eager_loss) <= 1e-5
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).abs().max().item() <= 1e-5, name


def test_missing_weights_of_a_task_model_folder(tmp_path):
    """The completeness check (`mudd-eval`, `mudd-finetune`) reads a saved task model with its head's parameters."""
    from safetensors.torch import load_file, save_file

    from modeling_muddpythia.convert_io import missing_weights

    model = AutoModelForQuestionAnswering.from_config(tiny_mudd_config())
    model.save_pretrained(tmp_path)
    assert missing_weights(tmp_path) == []
    weights = load_file(tmp_path / "model.safetensors")
    del weights["qa_outputs.bias"], weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert missing_weights(tmp_path) == ["model.norm.weight", "qa_outputs.bias"]
