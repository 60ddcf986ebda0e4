"""One rank of the multi-process fine-tuning tests (started by `torchrun` from tests/test_finetune.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 finetune_worker.py ddp DUMP_DIR -- <mudd-finetune args>
    python -m torch.distributed.run --standalone --nproc_per_node 2 finetune_worker.py fsdp DUMP_DIR MODEL_DIR

`ddp`: runs `mudd-finetune` (data parallel over gloo) and saves this rank's final weights to `DUMP_DIR/rank{r}.pt`.
`fsdp`: shards a model with torch's FSDP2 `fully_shard` on every module that accelerate's TRANSFORMER_BASED_WRAP
policy selects from `_no_split_modules`, trains a few SGD steps on per-rank batches next to an unsharded copy that
sees both ranks' batches, and writes `DUMP_DIR/rank{r}.json` with the wrapped classes and the differences.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def run_ddp(dump_dir: Path, cli_args: list[str]) -> None:
    from modeling_muddpythia.finetune import build_parser, build_trainer, save_result

    args = build_parser().parse_args(cli_args)
    trainer = build_trainer(args)
    trainer.train()
    save_result(trainer, args)
    state = {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}
    info = {"distributed_type": str(trainer.accelerator.distributed_type), "world_size": trainer.args.world_size,
            "backend": dist.get_backend(), "wrapper": type(trainer.model_wrapped).__name__}
    torch.save({"state": state, "info": info}, dump_dir / f"rank{trainer.args.process_index}.pt")


def run_fsdp(dump_dir: Path, model_dir: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import modeling_muddpythia  # noqa: F401  (registers the MUDD classes)
    from modeling_muddpythia.finetune import CausalLMPaddingCollator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = copy.deepcopy(model)

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(module).__name__ for module in model.modules() if module is not model and policy(module)]
    for module in reversed(list(model.modules())):  # innermost first, as accelerate does
        if module is not model and policy(module):
            fully_shard(module)
    fully_shard(model)

    collate = CausalLMPaddingCollator(pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(3):
        lengths = torch.randint(3, 12, (2 * world,), generator=generator).tolist()
        examples = [{"input_ids": torch.randint(1, 20, (n,), generator=generator).tolist()} for n in lengths]
        batches = [collate(examples[2 * r: 2 * r + 2]) for r in range(world)]
        optimizer.zero_grad()
        model(**batches[rank]).loss.backward()  # FSDP averages the gradients over ranks
        optimizer.step()
        reference_optimizer.zero_grad()
        (sum(reference(**batch).loss for batch in batches) / world).backward()
        reference_optimizer.step()

    sharded = model.state_dict()
    full = {name: tensor.full_tensor() for name, tensor in sharded.items()}
    expected = reference.state_dict()
    result = {
        "wrapped": wrapped,
        "local_numel": sum(tensor.to_local().numel() for tensor in sharded.values()),
        "full_numel": sum(tensor.numel() for tensor in full.values()),
        "max_diff_vs_unsharded": max((full[k] - expected[k]).abs().max().item() for k in expected),
        "max_change_from_init": max((full[k] - initial[k]).abs().max().item() for k in expected),
    }
    (dump_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, dump = sys.argv[1], Path(sys.argv[2])
    if mode == "ddp":
        run_ddp(dump, sys.argv[sys.argv.index("--") + 1:])
    elif mode == "fsdp":
        run_fsdp(dump, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
