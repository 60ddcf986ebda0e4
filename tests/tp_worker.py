"""One rank of a tensor-parallel run, started by tests/test_tensor_parallel.py with `torchrun --nproc-per-node 2`.

    tp_worker.py OUT_DIR (remote|package) [--train] FOLDER...

Each FOLDER (a saved MUDD causal LM plus `ids.pt`) is loaded with `distributed_config=DistributedConfig(tp_plan=
"auto")`: as remote code in a process where the installed package cannot be imported (`remote`), or through the
installed package (`package`). Every rank writes `OUT_DIR/<folder name>.rank<r>.pt` with what the test compares
against one process: logits, greedy tokens, the local shapes of the sharded weights (and `save_pretrained` writes
`OUT_DIR/<folder name>-saved`) and, with `--train`, the loss
and every parameter's gradient after one backward pass, then the logits and replicated parameters after an SGD step.
"""

from __future__ import annotations

import sys


out_dir, mode, *rest = sys.argv[1:]
train = "--train" in rest
folders = [arg for arg in rest if arg != "--train"]
if mode == "remote":
    sys.modules["modeling_muddpythia"] = None  # the installed package must not be importable
elif mode != "package":
    raise SystemExit(f"mode must be 'remote' or 'package', got {mode!r}")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import AutoModelForCausalLM, DistributedConfig  # noqa: E402

if mode == "package":
    import modeling_muddpythia

    modeling_muddpythia.load_package()

torch.manual_seed(0)  # every rank must hold the same replicated parameters and draw nothing else
LEARNING_RATE = 0.1
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=mode == "remote", distributed_config=DistributedConfig(tp_plan="auto"),
        dtype=torch.float32,
    ).eval()
    module = type(model).__module__
    assert module.startswith("transformers_modules" if mode == "remote" else "modeling_muddpythia"), module
    ids = torch.load(f"{folder}/ids.pt")
    with torch.no_grad():
        logits = local(model(ids).logits)
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    shapes = {
        name: tuple(local(param).shape)
        for name, param in model.named_parameters()
        if name.rsplit(".", 2)[-2] in SHARDED or name.startswith("lm_head") or name.endswith("embed_tokens.weight")
    }
    result = {"logits": logits, "generated": generated, "shapes": shapes, "module": module}
    folder_name = folder.rstrip("/").rsplit("/", 1)[-1]
    model.save_pretrained(f"{out_dir}/{folder_name}-saved")  # gathers the shards; every rank must call it
    if train:
        model.train()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        result["loss"] = local(loss).detach()
        # Replicated parameters as each rank holds them (they must agree), sharded ones gathered.
        result["replicated_grads"] = {
            name: param.grad.clone() for name, param in model.named_parameters() if not isinstance(param, DTensor)
        }
        result["sharded_grads"] = {
            name: param.grad.full_tensor() for name, param in model.named_parameters() if isinstance(param, DTensor)
        }
        torch.optim.SGD(model.parameters(), lr=LEARNING_RATE).step()
        model.eval()
        with torch.no_grad():
            result["logits_after_step"] = local(model(ids).logits)
        result["replicated_after_step"] = {
            name: param.detach().clone() for name, param in model.named_parameters() if not isinstance(param, DTensor)
        }
    rank = dist.get_rank()
    torch.save(result, f"{out_dir}/{folder_name}.rank{rank}.pt")
    dist.barrier()

dist.destroy_process_group()
