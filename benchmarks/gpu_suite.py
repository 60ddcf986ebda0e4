"""The one prepared GPU run of the compiler-stack work: correctness, kernel counts, CUDA graphs and speed, in under
8 minutes on an H100/H200 (bf16, the 1.4B shape).

    python -m benchmarks.gpu_suite --out outputs/gpu            # on a CUDA machine
    python -m benchmarks.gpu_suite --dry-run --out /tmp/gpu     # the same steps on the CPU, tiny shapes (minutes)

Steps (each prints its result at once, so a run cut short still tells what it reached):

1. compiled = eager: a float32 MUDDPythia training step through `torch.compile(fullgraph=True)` against eager
   (Triton kernels + carrier autograd), gradients compared; the eager Triton aggregation against the plain ops.
2. kernels per block: CUDA kernels of one compiled training step and of one compiled decode step, plain GPT-NeoX vs
   its muddified twin, divided by the number of blocks.
3. CUDA graphs: a compiled (`mode="reduce-overhead"`) StaticCache decode step of the MUDD model must replay as a CUDA
   graph (a `cudaGraphLaunch` in the profile) and give the eager logits.
4. speed and memory: `benchmarks.run` with bf16, 1.4B shape, B=4 x 2048 for training (eager and compiled), peak
   training memory in separate processes, compiled StaticCache decoding after a 128-token prompt.

Writes `gpu_suite.json` (+ the benchmark's results.json/.png) into `--out`; paste the printed table into
benchmarks/RESULTS_GPU.md with the date, commit and device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def _build_pair(size: str, device: torch.device, dtype: torch.dtype):
    from benchmarks.families import FAMILIES, build_pair

    return build_pair(FAMILIES["pythia"], size, device, dtype, "sdpa", image_size=0)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss


def check_compiled_equals_eager(device: torch.device) -> dict:
    """Float32 tiny MUDDPythia: compiled training-step gradients against eager ones."""
    _, mudd = _build_pair("tiny", device, torch.float32)
    mudd.train()
    ids = torch.randint(0, mudd.config.vocab_size, (2, 320), device=device)  # >= 256 positions: Triton path in eager
    _step(mudd, ids)
    eager = {name: p.grad.clone() for name, p in mudd.named_parameters()}
    torch._dynamo.reset()
    _step(torch.compile(mudd, fullgraph=True), ids)
    worst = max((p.grad - eager[name]).abs().max().item() for name, p in mudd.named_parameters())
    scale = max(g.abs().max().item() for g in eager.values())
    return {"compiled_vs_eager_max_abs_grad_diff": worst, "largest_grad": scale, "ok": worst <= 1e-4 * max(1.0, scale)}


def _count_kernels(run, device: torch.device) -> int | None:
    """CUDA kernels launched by one `run()` after a first, unprofiled one (which compiles); None off CUDA."""
    run()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def kernels_per_block(size: str, device: torch.device, dtype: torch.dtype, batch: int, seq: int) -> dict:
    from transformers.cache_utils import StaticCache

    plain, mudd = _build_pair(size, device, dtype)
    layers = plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (batch, seq), device=device)
    result = {}
    for name, model in (("plain", plain), ("mudd", mudd)):
        torch._dynamo.reset()
        model.train()
        compiled = torch.compile(model, fullgraph=True)
        kernels = _count_kernels(lambda: _step(compiled, ids), device)
        result[f"{name}_train_kernels_per_block"] = None if kernels is None else kernels / layers
        model.eval()
        cache = StaticCache(config=model.config, max_cache_len=seq + 8)
        step = torch.compile(model.forward, fullgraph=True)
        token = ids[:1, :1]
        with torch.no_grad():
            model(ids[:1], past_key_values=cache, use_cache=True)
            position = torch.tensor([[seq]], device=device)
            kernels = _count_kernels(
                lambda: step(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True), device
            )
        result[f"{name}_decode_kernels_per_block"] = None if kernels is None else kernels / layers
    del plain, mudd
    return result


def check_cuda_graph_decode(size: str, device: torch.device, dtype: torch.dtype) -> dict:
    """A reduce-overhead compiled decode step of the MUDD model replays as a CUDA graph and equals eager."""
    from transformers.cache_utils import StaticCache

    _, mudd = _build_pair(size, device, dtype)
    ids = torch.randint(0, mudd.config.vocab_size, (1, 16), device=device)
    caches = [StaticCache(config=mudd.config, max_cache_len=32) for _ in range(2)]
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    torch._dynamo.reset()
    step = torch.compile(mudd.forward, fullgraph=True, mode=mode)
    differences, graph_launches = [], None
    with torch.no_grad():
        for cache in caches:
            mudd(ids, past_key_values=cache, use_cache=True)
        token = ids[:, -1:]
        for position in range(16, 24):
            positions = torch.tensor([[position]], device=device)
            compiled = step(input_ids=token, position_ids=positions, past_key_values=caches[0], use_cache=True).logits
            compiled = compiled.float().clone()
            eager = mudd(token, position_ids=positions, past_key_values=caches[1], use_cache=True).logits.float()
            differences.append((compiled - eager).abs().max().item())
            token = eager[:, -1:].argmax(-1)
        if device.type == "cuda":
            positions = torch.tensor([[24]], device=device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                step(input_ids=token, position_ids=positions, past_key_values=caches[0], use_cache=True)
                torch.cuda.synchronize()
            graph_launches = sum(1 for event in profile.events() if "cudaGraphLaunch" in event.name)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    return {
        "decode_max_abs_vs_eager": max(differences), "cuda_graph_launches_per_step": graph_launches,
        "ok": max(differences) <= tolerance and (graph_launches is None or graph_launches >= 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu"), help="folder for the results (default: outputs/gpu)")
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU with tiny shapes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run to exercise the steps on the CPU)")
    size, dtype, batch, seq, prompt = ("tiny", torch.float32, 2, 64, 16) if args.dry_run else ("1.4b", torch.bfloat16, 4, 2048, 128)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                     "torch": torch.__version__, "commit": _commit(), "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()

    def record(name: str, value: dict) -> None:
        results[name] = value
        print(f"[{time.perf_counter() - started:6.0f} s] {name}: {json.dumps(value)}", flush=True)
        (args.out / "gpu_suite.json").write_text(json.dumps(results, indent=1))

    record("compiled_equals_eager", check_compiled_equals_eager(device))
    record("kernels_per_block", kernels_per_block(size, device, dtype, batch=1 if args.dry_run else 2, seq=256))
    record("cuda_graph_decode", check_cuda_graph_decode(size, device, dtype))
    command = [
        sys.executable, "-m", "benchmarks.run", "--families", "pythia", "--sizes", size, "--seq-lens", str(seq),
        "--batch-size", str(batch), "--device", device.type, "--dtype", str(dtype).removeprefix("torch."),
        "--metrics", "train_step", "compiled_train_step", "peak_memory", "--compile-decode",
        "--prompt-len", str(prompt), "--new-tokens", "32", "--repeats", "3", "--warmup", "1", "--out", str(args.out),
    ]
    status = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent).returncode
    benchmark = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
    ratios = {metric: value["ratio"] for case in benchmark.get("cases", []) for metric, value in case["metrics"].items()}
    record("ratios_mudd_over_plain", ratios)
    failed = [name for name in ("compiled_equals_eager", "cuda_graph_decode") if not results[name]["ok"]]
    print(f"done in {time.perf_counter() - started:.0f} s; " + (f"FAILED: {failed}" if failed or status else "all checks passed"))
    return 1 if failed or status else 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
