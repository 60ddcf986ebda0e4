"""Every ```python block of README.md runs, as written, on a CPU machine without network.

Blocks run in README order, each in a fresh namespace, in one working folder (so a block may load what an earlier
block saved, as a reader would run them). The folder links the repository's `configuration/`, `checkpoints/` and
`tests/`, and holds small stand-ins for the placeholders a reader replaces (`path/to/...` models, `cat.jpg`, an image
folder, `train.txt`, a LoRA run). A block can carry an HTML comment on the line before its fence:

    <!-- readme-test: replace "OLD" "NEW"; replace "OLD2" "NEW2" -->   run with these substitutions (tiny sizes)
    <!-- readme-test: skip: REASON -->                                 not run (needs a GPU, several processes, ...)

A substitution whose OLD text is not in its block fails the test, so markers cannot go stale silently.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
MAX_SKIPPED = 3
# modules of optional extras (module -> extra); `make test` installs them all, a bare `.[test]` lacks lm_eval
OPTIONAL_EXTRAS = {"lm_eval": "eval", "matplotlib": "eval"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    section: str
    code: str
    replacements: list[tuple[str, str]]
    skip: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')[:40]}"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (text if text is not None else README.read_text()).splitlines()
    blocks, section, index = [], "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = index
            body = []
            index += 1
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            replacements, skip = [], None
            marker = MARKER.search(lines[start - 1]) if start > 0 else None
            if marker:
                spec = marker.group(1).strip()
                if spec.startswith("skip:"):
                    skip = spec[len("skip:"):].strip()
                    assert skip, f"README line {start}: a skip marker must give its reason"
                else:
                    replacements = re.findall(r'replace\s+"([^"]*)"\s+"([^"]*)"', spec)
                    assert replacements, f"README line {start}: cannot read marker {spec!r}"
            blocks.append(Block(start + 1, section, "\n".join(body) + "\n", replacements, skip))
        index += 1
    return blocks


BLOCKS = readme_blocks()


def runnable_code(block: Block) -> str:
    code = block.code
    for old, new in block.replacements:
        assert old in code, f"README line {block.line}: marker replaces {old!r}, which the block does not contain"
        code = code.replace(old, new)
    return code


# ---------------------------------------------------------------------------------------------------- stand-ins
def _make_stand_ins(folder: Path) -> None:
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    for name in ("configuration", "checkpoints", "tests"):
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).save_pretrained(folder / "tiny-llama")
    ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=3,
    )).save_pretrained(folder / "tiny-vit")
    (folder / "tiny-muddvit.json").write_text(
        '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, '
        '"image_size": 32, "patch_size": 8, "num_labels": 3}\n'
    )
    generator = torch.Generator().manual_seed(0)

    def image(size: int) -> Image.Image:
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    image(64).save(folder / "cat.jpg")
    for label in ("circle", "square"):
        (folder / "images" / "train" / label).mkdir(parents=True)
        for k in range(4):
            image(40).save(folder / "images" / "train" / label / f"{k}.png")
    (folder / "train.txt").write_text(
        "alice and bob went to the park .\ncopy A B C = A B C .\n3 plus 4 is 7 .\ncount 1 2 3 4 .\n"
    )
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from modeling_muddpythia.finetune import lora_config

    base = AutoModelForCausalLM.from_pretrained(REPO / "checkpoints" / "depth8-muddpythia")
    get_peft_model(base, lora_config(base, r=4)).save_pretrained(folder / "runs" / "lora")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    _make_stand_ins(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- tests
def test_the_readme_blocks_are_found_and_few_are_skipped():
    assert len(BLOCKS) >= 10
    skipped = [block for block in BLOCKS if block.skip]
    assert len(skipped) <= MAX_SKIPPED, [(b.line, b.skip) for b in skipped]
    for block in BLOCKS:
        runnable_code(block)  # every substitution applies


def test_markers_are_read_and_stale_ones_fail():
    text = 'x\n<!-- readme-test: replace "a" "b"; replace "c d" "e" -->\n```python\na = "c d"\n```\n'
    (block,) = readme_blocks(text)
    assert block.replacements == [("a", "b"), ("c d", "e")] and runnable_code(block) == 'b = "e"\n'
    (stale,) = readme_blocks(text.replace('a = "c d"', "z = 1"))
    with pytest.raises(AssertionError, match="does not contain"):
        runnable_code(stale)
    (skipped,) = readme_blocks("<!-- readme-test: skip: needs a GPU -->\n```python\nimport cuda\n```\n")
    assert skipped.skip == "needs a GPU"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block, workdir, monkeypatch):
    if block.skip:
        pytest.skip(f"README line {block.line}: {block.skip}")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = compile(runnable_code(block), f"README.md:{block.line}", "exec")
    start = time.perf_counter()
    try:
        exec(code, {"__name__": "__readme__"})
    except ModuleNotFoundError as error:
        if error.name not in OPTIONAL_EXTRAS:
            raise
        pytest.skip(f"README line {block.line} needs {error.name}: pip install -e '.[{OPTIONAL_EXTRAS[error.name]}]'")
    print(f"README line {block.line}: {time.perf_counter() - start:.1f} s")
