"""Tensor parallelism: `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under
`torchrun --nproc-per-node 2` on CPU (gloo), against the same folder in one process.

Two torchrun launches (tests/tp_worker.py): the folders as remote code in processes where the installed package cannot
be imported (a MUDDPythia with biases and qk-norm, a MUDDFormer with GQA and a gated FFN, the shipped depth-8 folder,
a folder converted from the authors' Pax layout), and the first two through the installed package, with one training
step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_muddpythia import MUDDFormerConfig, MUDDFormerForCausalLM, MUDDPythiaConfig, MUDDPythiaForCausalLM
from modeling_muddpythia.cli_convert import main as convert_main

from benchmarks.families import randomize_dense_connections_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_fixtures import Shapes, pax_tensors  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("tp_worker.py")
SHIPPED = REPO / "checkpoints" / "depth8-muddpythia"
VOCAB = 96
WORLD_SIZE = 2
LEARNING_RATE = 0.1  # tp_worker.py's SGD step
# Sharding dim of each planned weight (colwise: output features; rowwise: input features; embedding/lm_head: vocab).
# Biases: colwise ones are split like their weight, rowwise ones are replicated (added once after the reduction).
SHARD_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "up_proj": 0, "gate_proj": 0, "o_proj": 1, "down_proj": 1}


def _small_models() -> dict[str, torch.nn.Module]:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, intermediate_size=256,
                  max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    pythia = MUDDPythiaForCausalLM(MUDDPythiaConfig(num_attention_heads=4, **common))  # biases, qk-norm, rotary 0.25
    former = MUDDFormerForCausalLM(MUDDFormerConfig(num_attention_heads=4, num_key_value_heads=2, **common))  # GQA
    for seed, model in enumerate((pythia, former)):
        randomize_dense_connections_(model, seed=seed)  # streams that really differ from the residual
    return {"tp-muddpythia": pythia.eval(), "tp-muddformer": former.eval()}


def _shard_size(size: int, rank: int) -> int:
    chunk = -(-size // WORLD_SIZE)
    return max(0, min(chunk, size - rank * chunk))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out_dir: Path, mode: str, folders: list[Path], train: bool = False) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD_SIZE}", "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}", str(WORKER), str(out_dir), mode, *(["--train"] if train else []),
        *map(str, folders),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out_dir / "modules"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    if mode == "remote":
        env.pop("PYTHONPATH")
    # From a folder without the package in it: remote code must not find it next to the worker's cwd either.
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out_dir, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for name, model in _small_models().items():
        model.save_pretrained(root / name)
        paths[name] = root / name
    paths["depth8-muddpythia"] = Path(shutil.copytree(SHIPPED, root / "depth8-muddpythia"))
    # A folder converted from the authors' Pax layout (vocabulary 61: the vocab-sharded weights split unevenly).
    shapes = Shapes()
    source = root / "pax.npz"
    np.savez(source, **{name: tensor.float().numpy() for name, tensor in pax_tensors(shapes).items()})
    paths["converted-pax"] = root / "converted-pax"
    assert convert_main(["--format", "pax", "--input", str(source), "--output", str(paths["converted-pax"]),
                         "--config", json.dumps({"vocab_size": shapes.vocab})]) == 0
    for index, path in enumerate(paths.values()):
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        torch.save(torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(index)), path / "ids.pt")
    return paths


@pytest.fixture(scope="module")
def remote_results(folders, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tp_remote")
    _torchrun(out_dir, "remote", list(folders.values()))
    return out_dir


@pytest.fixture(scope="module")
def package_results(folders, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tp_package")
    _torchrun(out_dir, "package", [folders["tp-muddpythia"], folders["tp-muddformer"]], train=True)
    return out_dir


def _one_process(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ranks(out_dir: Path, name: str) -> list[dict]:
    return [torch.load(out_dir / f"{name}.rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _check_inference(ranks: list[dict], folder: Path) -> None:
    model = _one_process(folder)
    ids = torch.load(folder / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    full_shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    for rank, result in enumerate(ranks):
        assert (result["logits"] - expected).abs().max().item() < 1e-4, rank
        assert torch.equal(result["generated"], generated), (rank, result["generated"], generated)
        sharded = 0
        for name, local_shape in result["shapes"].items():
            module_name, param_name = name.rsplit(".", 2)[-2:]
            full = list(full_shapes[name])
            if param_name == "weight" and module_name in SHARD_DIM:
                dim = SHARD_DIM[module_name]
                sharded += 1
            elif (param_name == "bias" and SHARD_DIM.get(module_name) == 0) or module_name in ("lm_head", "embed_tokens"):
                dim = 0
            else:
                dim = None
            if dim is not None:  # `torch.chunk` sizes: an odd size leaves the last rank one row short
                full[dim] = _shard_size(full[dim], rank)
            assert list(local_shape) == full, (rank, name, local_shape, full_shapes[name])
        # every attention and FFN projection of every layer is sharded
        mlp_projections = 3 if "gate_proj" in str(result["shapes"]) else 2
        assert sharded == model.config.num_hidden_layers * (4 + mlp_projections), sharded


@pytest.mark.parametrize("name", ["tp-muddpythia", "tp-muddformer", "depth8-muddpythia", "converted-pax"])
def test_remote_code_tp_matches_one_process(name, folders, remote_results):
    ranks = _ranks(remote_results, name)
    assert all(result["module"].startswith("transformers_modules") for result in ranks)
    _check_inference(ranks, folders[name])


@pytest.mark.parametrize("name", ["tp-muddpythia", "tp-muddformer", "depth8-muddpythia", "converted-pax"])
def test_save_pretrained_under_tp_writes_the_full_model(name, folders, remote_results):
    """`save_pretrained` on the sharded model (every rank calls it) writes the unsharded weights and the code files."""
    saved = remote_results / f"{name}-saved"
    original_tensors, saved_tensors = (load_file(path / "model.safetensors") for path in (folders[name], saved))
    assert saved_tensors.keys() == original_tensors.keys()
    for key, tensor in original_tensors.items():
        assert torch.equal(saved_tensors[key], tensor), key
    assert {path.name for path in folders[name].glob("*.py")} <= {path.name for path in saved.glob("*.py")}


@pytest.mark.parametrize("name", ["tp-muddpythia", "tp-muddformer"])
def test_package_tp_matches_one_process(name, folders, package_results):
    ranks = _ranks(package_results, name)
    assert all(result["module"].startswith("modeling_muddpythia") for result in ranks)
    _check_inference(ranks, folders[name])


@pytest.mark.parametrize("name", ["tp-muddpythia", "tp-muddformer"])
def test_tp_training_step_gives_one_process_gradients(name, folders, package_results):
    """One backward pass under TP: the loss and every gradient as in one process, and the replicated parameters
    (dense connections, stream norms, qk-norms, final norm) get the same gradient on every rank; after an SGD step
    they are still equal on every rank and the logits are those of the same step in one process."""
    ranks = _ranks(package_results, name)
    model = _one_process(folders[name]).train()
    ids = torch.load(folders[name] / "ids.pt")
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    expected = {param_name: param.grad for param_name, param in model.named_parameters()}
    replicated = set(ranks[0]["replicated_grads"])
    assert {n for n in expected if n.startswith("model.dense.")} <= replicated
    assert {n for n in expected if "q_norm" in n or "attention_norms" in n} <= replicated
    for rank, result in enumerate(ranks):
        assert abs(result["loss"].item() - loss.item()) < 1e-5, rank
        gradients = result["replicated_grads"] | result["sharded_grads"]
        assert gradients.keys() == expected.keys()
        for param_name, grad in gradients.items():
            torch.testing.assert_close(grad, expected[param_name], rtol=1e-4, atol=1e-6, msg=f"{rank} {param_name}")
        for param_name in replicated:
            assert torch.equal(result["replicated_grads"][param_name], ranks[0]["replicated_grads"][param_name]), (
                rank, param_name
            )
            assert torch.equal(result["replicated_after_step"][param_name],
                               ranks[0]["replicated_after_step"][param_name]), (rank, param_name)
    # the SGD step the worker took, in one process
    model.eval()
    with torch.no_grad():
        before_step = model(ids).logits
        torch.optim.SGD(model.parameters(), lr=LEARNING_RATE).step()
        after_step = model(ids).logits
    assert (after_step - before_step).abs().max().item() > 1e-2  # the step changes the model noticeably
    for result in ranks:
        assert (result["logits_after_step"] - after_step).abs().max().item() < 1e-4


def test_a_rank_count_that_splits_heads_is_named():
    """What a rank holds when the rank count does not divide the heads (3 ranks, 4 heads of 16: 22 query features)
    gives an error naming the cause instead of a failed reshape."""
    model = _small_models()["tp-muddformer"]
    attention = model.model.layers[0].self_attn
    attention.q_proj = torch.nn.Linear(64, 22, bias=False)
    with pytest.raises(ValueError, match=r"layer 0 projects to 22 query and 32 key features, not whole heads of 16: "
                                         r"under tensor parallelism the number of ranks must divide"):
        model(torch.tensor([[1, 2, 3]]))
