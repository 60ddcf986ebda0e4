"""Train a pair of tiny models: a plain GPT-NeoX and the MUDDPythia made from it.

`mudd train-tiny` made the main job's first pair (6 blocks; the main job now ships the depth experiment's 8-block
pair, trained by `depth_experiment.py` with these building blocks). It does, on CPU:

1. builds the word-level tokenizer of the synthetic language (`synthetic.py`);
2. initialises a small `GPTNeoXForCausalLM` from a seed, and the MUDDPythia that computes exactly the same function
   (`muddify`, with the compact weight generator: `dense_round64=False`, so that the dense connections cost ~1% of
   the compute instead of ~5% at this width);
3. trains both on the same batches (same documents, same order) with the same optimiser and schedule, for equal
   training compute: the plain model gets as many more steps as the dense connections cost extra FLOPs per token
   (counted with torch's FlopCounterMode), so the only difference is that the MUDD model has dense connections;
4. saves each with its tokenizer (safetensors; the MUDD folder carries its remote code and `auto_map`), plus a
   `training_log.json`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch

from .synthetic import build_tokenizer, documents


# Rotary on every head dim (Pythia uses 25%): with head dim 16, a quarter leaves two frequencies, too coarse for
# the sharp position-dependent attention that copying needs.
TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=512,
    rotary_pct=1.0,
    use_parallel_residual=True,
    tie_word_embeddings=False,
)
PLAIN_NAME, MUDD_NAME = "tiny-gptneox", "tiny-muddpythia"


def plain_model(vocab_size: int, seed: int, **shape):
    """A freshly initialised tiny `GPTNeoXForCausalLM` (bos = eos = 0, pad = 1, like the tokenizer); `shape`
    overrides fields of `TINY_SHAPE` (e.g. `num_hidden_layers`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1, **{**TINY_SHAPE, **shape}
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def mudd_model_from(plain):
    """The MUDDPythia computing the same function as `plain`, with the compact dense weight generator.

    `muddify` maps the weights; the model is then rebuilt with `dense_round64=False` (widths `C * (i + 2)` instead
    of rounded up to 64) and every non-dense weight copied over; the dense connections start at identity.
    """
    from .configuration_muddpythia import MUDDPythiaConfig
    from .modeling_muddpythia import MUDDPythiaForCausalLM
    from .muddify import muddify

    reference = muddify(plain)
    values = reference.config.to_dict()
    values.update(dense_round64=False)
    config = MUDDPythiaConfig.from_dict(values)
    config._attn_implementation = reference.config._attn_implementation
    model = MUDDPythiaForCausalLM(config)
    weights = {name: tensor for name, tensor in reference.state_dict().items() if ".dense." not in f".{name}"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(".dense." not in f".{name}" for name in missing):
        raise RuntimeError(
            f"rebuilding the MUDD model lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.train(plain.training)


def token_batches(tokenizer, seed: int, batch_size: int, seq_length: int):
    """Endless batches `[batch_size, seq_length]` of packed documents, each followed by the end-of-text token
    (GPT-NeoX/Pythia style); each row starts at a document start."""
    stream = documents(seed)
    while True:
        rows = []
        for _ in range(batch_size):
            row: list[int] = []
            while len(row) < seq_length:
                row.extend(tokenizer(next(stream))["input_ids"] + [tokenizer.eos_token_id])
            rows.append(row[:seq_length])
        yield torch.tensor(rows)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches: list[torch.Tensor], peak_lr: float, desc: str, after_step=None, disable_progress=None
          ) -> list[float]:
    """AdamW over `batches` in order; returns the loss of every step. `after_step(steps_done, model)`, if given, is
    called after every optimiser step (e.g. to measure a held-out loss along the way)."""
    from tqdm.auto import tqdm

    model.train()
    # Weight decay on matrices only: not on biases and norm scales, nor on the static dense weights b, whose
    # decay would pull every residual path towards zero.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("static_weights")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith("static_weights")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr,
        betas=(0.9, 0.95),
    )
    losses = []
    progress = tqdm(batches, desc=desc, unit="step", disable=disable_progress)
    for step, batch in enumerate(progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, len(batches), peak_lr, warmup=max(1, len(batches) // 20))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step + 1, model)
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


@torch.no_grad()
def heldout_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def forward_flops_per_token(model, seq_length: int) -> float:
    """Matmul/attention FLOPs of one forward pass per token at `seq_length`, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.full((1, seq_length), 3, dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    model.train(was_training)
    return counter.get_total_flops() / seq_length


def check_training_options(*, steps, batch_size, seq_length, peak_lr, seed, threads) -> None:
    """`ValueError` naming the first option (as `mudd train-tiny` spells it) that is out of range."""
    bounds = (("--steps", steps, 1, None), ("--batch-size", batch_size, 1, None),
              # one token has no next token to predict (NaN loss); more than the positions the models have fails
              ("--seq-length", seq_length, 2, TINY_SHAPE["max_position_embeddings"]),
              ("--seed", seed, 0, None), ("--threads", 0 if threads is None else threads, 0, None))
    for option, value, low, high in bounds:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
            raise ValueError(f"{option} must be {allowed}, got {value!r}")
    if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)) or not math.isfinite(peak_lr) or peak_lr <= 0:
        raise ValueError(f"--lr must be a finite number > 0, got {peak_lr!r}")


def train_tiny_models(
    output: str | Path = "checkpoints",
    steps: int = 1200,
    batch_size: int = 8,
    seq_length: int = 256,
    peak_lr: float = 3e-3,
    seed: int = 0,
    threads: int | None = 2,
) -> dict:
    """Train and save both tiny models under `output/`; returns a summary (also written to each folder).

    The MUDD model trains for `steps` steps. Its dense connections cost a few percent more FLOPs per token at this
    width, so the plain model trains for proportionally more steps (on the same batches, continuing the same
    stream): both get the same training compute. Arguments out of range are a `ValueError` naming the option.
    """
    check_training_options(steps=steps, batch_size=batch_size, seq_length=seq_length, peak_lr=peak_lr, seed=seed,
                           threads=threads)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    plain = plain_model(len(tokenizer), seed)
    mudd = mudd_model_from(plain)
    probe = torch.randint(3, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        start_diff = (plain.eval()(probe).logits - mudd.eval()(probe).logits).abs().max().item()
    if start_diff > 1e-4:
        raise RuntimeError(f"the MUDD model does not start as the plain model (max |logit diff| {start_diff:.2e})")

    models = {PLAIN_NAME: plain, MUDD_NAME: mudd}
    flops = {name: forward_flops_per_token(model, seq_length) for name, model in models.items()}
    model_steps = {MUDD_NAME: steps, PLAIN_NAME: round(steps * flops[MUDD_NAME] / flops[PLAIN_NAME])}
    stream = token_batches(tokenizer, seed, batch_size, seq_length)
    batches = list(itertools.islice(stream, max(model_steps.values())))
    heldout = list(itertools.islice(token_batches(tokenizer, seed + 1, batch_size, seq_length), 8))
    summary = {"batch_size": batch_size, "seq_length": seq_length, "peak_lr": peak_lr, "seed": seed,
               "start_max_logit_diff": start_diff}
    output = Path(output)
    for name, model in models.items():
        started = time.perf_counter()
        losses = train(model, batches[: model_steps[name]], peak_lr, desc=f"train {name}")
        tokens = model_steps[name] * batch_size * seq_length
        record = dict(
            summary,
            model=name,
            steps=model_steps[name],
            tokens=tokens,
            parameters=sum(p.numel() for p in model.parameters()),
            forward_flops_per_token=flops[name],
            train_flops=3 * flops[name] * tokens,  # forward + backward ~ 3 forwards
            train_seconds=round(time.perf_counter() - started, 1),
            final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
            heldout_loss=heldout_loss(model, heldout),
            losses=[round(loss, 4) for loss in losses],
        )
        model.eval()
        folder = output / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
        summary[name] = {k: v for k, v in record.items() if k != "losses" and k not in summary}
    return summary
