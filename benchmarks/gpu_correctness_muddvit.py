"""GPU correctness checks for MUDDViT (run on a CUDA machine; not part of the CPU test suite).

    python benchmarks/gpu_correctness_muddvit.py [--out results.json] [--device cuda]

(`--device cpu` runs the same comparisons on the CPU, without the timing, to check the script itself.)

Checks: CUDA float32 = CPU float32 (random non-identity weights); a muddified transformers ViT = the ViT on CUDA;
sdpa = eager (float32 and bfloat16); bfloat16 close to float32; interpolated position embeddings in bfloat16;
gradient checkpointing gives the same gradients; a bfloat16 training step gives finite loss and gradients.
Also times forward+backward of the S/16 preset against transformers' ViT-S/16 (reported, not checked).
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from modeling_muddpythia import MUDDViTConfig, MUDDViTForImageClassification, muddify


REPO = Path(__file__).resolve().parent.parent
SMALL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024, image_size=64,
             patch_size=8, num_labels=10)


def _non_identity(model: MUDDViTForImageClassification, seed: int = 0) -> MUDDViTForImageClassification:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the dense connections matter
        for layer in model.vit.encoder.dense.layers:
            layer.proj_out.weight.normal_(0, 0.05, generator=generator)
            layer.static_weights.add_(0.1 * torch.randn(layer.static_weights.shape, generator=generator))
    return model


def _model(attn: str, seed: int = 0) -> MUDDViTForImageClassification:
    torch.manual_seed(seed)
    return _non_identity(MUDDViTForImageClassification(MUDDViTConfig(**SMALL, attn_implementation=attn)).eval(), seed)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _time_train_step(model, pixels, labels, steps: int = 10) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    for _ in range(3):
        model(pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False  # the patch convolution in full float32, as on the CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    results, failures = {"device": torch.cuda.get_device_name() if on_cuda else device}, []

    def check(name: str, value: float, limit: float) -> None:
        results[name] = value
        if not value < limit:
            failures.append(f"{name}: {value} >= {limit}")

    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = _model("sdpa")(pixels).logits
        for attn in ("sdpa", "eager"):
            gpu = _model(attn).to(device)(pixels.to(device)).logits
            check(f"fp32_{attn}_vs_cpu", _max_diff(gpu, cpu), 1e-4)
        bf16 = {attn: _model(attn).to(device, torch.bfloat16)(pixels.to(device)).logits for attn in ("sdpa", "eager")}
        check("bf16_sdpa_vs_eager", _max_diff(bf16["sdpa"], bf16["eager"]), 0.1)
        check("bf16_vs_fp32_relative", _max_diff(bf16["sdpa"], cpu) / cpu.abs().max().item(), 0.05)
        big = torch.randn(2, 3, 96, 80).to(device)
        logits = _model("sdpa").to(device, torch.bfloat16)(big, interpolate_pos_encoding=True).logits
        check("bf16_interpolated_nonfinite", float((~torch.isfinite(logits)).sum()), 0.5)

        vit_config = ViTConfig(**SMALL, attn_implementation="sdpa")
        torch.manual_seed(2)
        vit = ViTForImageClassification(vit_config).eval().to(device)
        mudd = muddify(vit)
        check("muddify_fp32", _max_diff(mudd(pixels.to(device)).logits, vit(pixels.to(device)).logits), 1e-5)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model("sdpa").to(device).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(pixels.to(device), labels=torch.arange(4, device=device)).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    check("checkpointing_grad_max_diff", max(_max_diff(plain[n], checkpointed[n]) for n in plain), 1e-5)

    model = _model("sdpa").to(device, torch.bfloat16).train()
    loss = model(pixels.to(device, torch.bfloat16), labels=torch.arange(4, device=device)).loss
    loss.backward()
    finite = torch.isfinite(loss).item() and all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    check("bf16_train_step_nonfinite", 0.0 if finite else 1.0, 0.5)

    if on_cuda:  # timing (reported only): S/16 preset vs transformers' ViT-S/16, bf16, sdpa, batch 64 at 224px
        config = MUDDViTConfig.from_json_file(REPO / "configuration" / "muddvit-s16.json")
        batch = torch.randn(64, 3, 224, 224, device=device, dtype=torch.bfloat16)
        labels = torch.randint(0, 1000, (64,), device=device)
        mudd_s16 = MUDDViTForImageClassification(config).to(device, torch.bfloat16).train()
        vit_config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                               num_labels=1000)
        vit_s16 = ViTForImageClassification(vit_config).to(device, torch.bfloat16).train()
        results["s16_train_step_s_muddvit"] = _time_train_step(mudd_s16, batch, labels)
        results["s16_train_step_s_vit"] = _time_train_step(vit_s16, batch, labels)

    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
