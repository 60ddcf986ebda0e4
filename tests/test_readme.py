"""The user documentation works as written: README.md, docs/*.md and experiments/depth/*.md.

* Every ```python block runs, on a CPU machine without network. A page's blocks run in page order, each in a fresh
  namespace, in one working folder per page (so a block may load what an earlier block of the same page saved, as a
  reader would run them). The folder links the repository's `configuration/`, `checkpoints/` and `tests/`, and holds
  small stand-ins for the placeholders a reader replaces (`path/to/...` models, `cat.jpg`, an image folder,
  `train.txt`, a LoRA run).
* Every relative link resolves: to a file or folder of the repository, and to a heading of the target page when it
  names an anchor (GitHub's heading anchors).
* The quickstart's loading code does not wait on a prompt: run under a pseudo-terminal, where transformers asks
  whether to run a folder's custom code when `trust_remote_code` is not given, it finishes without asking.

A block can carry an HTML comment on the line before its fence:

    <!-- readme-test: replace "OLD" "NEW"; replace "OLD2" "NEW2" -->   run with these substitutions (tiny sizes)
    <!-- readme-test: skip: REASON -->                                 not run (needs a GPU, several processes, ...)

A substitution whose OLD text is not in its block fails the test, so markers cannot go stale silently.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").glob("*/*.md"))]
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
MAX_SKIPPED = 3
# modules of optional extras (module -> extra); `make test` installs them all, a bare `.[test]` lacks lm_eval
OPTIONAL_EXTRAS = {"lm_eval": "eval", "matplotlib": "eval"}


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    section: str
    code: str
    replacements: list[tuple[str, str]]
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def id(self) -> str:
        return f"{self.page}-L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')[:40]}"


def readme_blocks(text: str | None = None, page: str = "README.md") -> list[Block]:
    lines = (text if text is not None else (REPO / page).read_text()).splitlines()
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
                    assert skip, f"{page} line {start}: a skip marker must give its reason"
                else:
                    replacements = re.findall(r'replace\s+"([^"]*)"\s+"([^"]*)"', spec)
                    assert replacements, f"{page} line {start}: cannot read marker {spec!r}"
            blocks.append(Block(page, start + 1, section, "\n".join(body) + "\n", replacements, skip))
        index += 1
    return blocks


BLOCKS = [block for path in PAGES for block in readme_blocks(page=str(path.relative_to(REPO)))]


def runnable_code(block: Block) -> str:
    code = block.code
    for old, new in block.replacements:
        assert old in code, f"{block.where}: marker replaces {old!r}, which the block does not contain"
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
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stand-ins")
    _make_stand_ins(folder)
    return folder


@pytest.fixture(scope="module")
def page_workdirs(stand_ins, tmp_path_factory):
    """One working folder per page, each a copy of the stand-ins, made when the page's first block runs."""
    folders = {}

    def workdir(page: str) -> Path:
        if page not in folders:
            folders[page] = tmp_path_factory.mktemp(re.sub(r"[^a-z0-9]+", "-", page.lower()))
            shutil.copytree(stand_ins, folders[page], symlinks=True, dirs_exist_ok=True)
        return folders[page]

    return workdir


# ---------------------------------------------------------------------------------------------------- tests
def test_the_blocks_are_found_and_few_are_skipped():
    pages = {block.page for block in BLOCKS}
    assert {"README.md", "docs/models.md", "docs/fine-tuning.md", "docs/evaluation.md"} <= pages, pages
    assert len(BLOCKS) >= 15
    skipped = [block for block in BLOCKS if block.skip]
    assert len(skipped) <= MAX_SKIPPED, [(b.where, b.skip) for b in skipped]
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
def test_block_runs(block, page_workdirs, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    monkeypatch.chdir(page_workdirs(block.page))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = compile(runnable_code(block), block.where, "exec")
    start = time.perf_counter()
    try:
        exec(code, {"__name__": "__readme__"})
    except ModuleNotFoundError as error:
        if error.name not in OPTIONAL_EXTRAS:
            raise
        pytest.skip(f"{block.where} needs {error.name}: pip install -e '.[{OPTIONAL_EXTRAS[error.name]}]'")
    print(f"{block.where}: {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------------- links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, `-N` for
    repeats."""
    anchors, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", text, flags=re.M | re.S).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        name = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)
        if not resolved.exists():
            problems.append(f"{target}: {name} does not exist")
        elif anchor and (resolved.suffix != ".md" or anchor not in heading_anchors(resolved.read_text())):
            problems.append(f"{target}: no heading with anchor #{anchor} in {name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert not broken_links(page), broken_links(page)


def test_link_check_finds_missing_files_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The main job (`make run`)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#the-main-job-make-run) [ok](#top) `[not a link](nowhere.md)` [web](https://x.org/y)\n"
        "# Top\n[gone](docs/b.md) [bad anchor](docs/a.md#main-job)\n"
        "```text\n[in a code block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "docs/b.md: docs/b.md does not exist", "docs/a.md#main-job: no heading with anchor #main-job in docs/a.md",
    ]


# ---------------------------------------------------------------------------------------------------- no prompt
def _run_under_terminal(code: str, timeout: float = 120) -> tuple[str, bool]:
    """Run `code` in a fresh Python whose stdin/stdout are a pseudo-terminal; return (output, asked): `asked` when
    transformers' custom-code question appeared (the child is then killed instead of waiting for an answer)."""
    import pty
    import select
    import signal

    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.chdir(REPO)
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.execv(sys.executable, [sys.executable, "-c", code])
    output, asked, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                output += data
                if b"run the custom code?" in output:
                    asked = True
                    break
        else:
            raise AssertionError(f"no answer within {timeout} s:\n{output.decode(errors='replace')[-2000:]}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    return output.decode(errors="replace"), asked


def test_quickstart_does_not_ask_about_custom_code_on_a_terminal():
    quickstart = next(block for block in BLOCKS if block.page == "README.md")
    assert "AutoTokenizer.from_pretrained" in quickstart.code and "pipeline(" in quickstart.code
    output, asked = _run_under_terminal(runnable_code(quickstart) + "print('QUICKSTART DONE')\n")
    assert not asked and "QUICKSTART DONE" in output, output[-2000:]
    # the check can fail: without the flag, AutoTokenizer on the shipped MUDD folder asks (and would wait)
    _, asked = _run_under_terminal(
        "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('checkpoints/depth8-muddpythia')\n"
    )
    assert asked


# ---------------------------------------------------------------------------------------------------- license, citation
def test_license_file_is_the_license_setup_cfg_declares_and_citation_names_the_paper():
    import configparser

    import yaml

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["license"] == "Apache-2.0" and citation["version"] == setup["metadata"]["version"]
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("MUDDFormer: Breaking Residual Bottlenecks")
    assert [a["family-names"] for a in paper["authors"]] == ["Xiao", "Meng", "Li", "Yuan"]
    assert paper["year"] == 2025 and "2502.12170" in paper["url"]
    assert "arxiv.org/abs/2502.12170" in README.read_text() and "github.com/Caiyun-AI/MUDDFormer" in README.read_text()
