"""docs/CHECKPOINT_FORMATS.md names every source array the converter reads, and nothing it does not read.

The page's name patterns (first column of each table) are expanded (`{i}` = block index, `{a,b}` = each choice,
the page's `P.` / `T.` / `params/decoder/` abbreviations) and compared, per format, with the source names of the
converter's own plans built for small configs with every option on and off.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from modeling_muddpythia import MUDDFormerConfig, MUDDPythiaConfig, MUDDViTConfig
from modeling_muddpythia.convert_plans import (
    FAMILIES, authors_plan, gpt_neox_plan, llama_plan, maxtext_plan, pax_plan,
)
from modeling_muddpythia.convert_vit_npz import expected_shapes

DOC = Path(__file__).resolve().parent.parent / "docs" / "CHECKPOINT_FORMATS.md"
LAYERS = 3


def sections() -> dict[str, list[str]]:
    """`{format: [name pattern, ...]}` from the first column of each section's tables."""
    result, current = {}, None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"## `([a-z-]+)`", line)
        if heading:
            current = heading.group(1)
            result[current] = []
        elif current and line.startswith("| `"):
            result[current].append(re.match(r"\| `([^`]+)`", line).group(1))
    return result


def expand(pattern: str) -> set[str]:
    names = set()
    for i in range(LAYERS):
        text = pattern.replace("{i}", str(i))
        parts = re.split(r"\{([^{}]*)\}", text)
        choices = [[p] if k % 2 == 0 else p.split(",") for k, p in enumerate(parts)]
        names |= {"".join(c.strip() for c in combo) for combo in itertools.product(*choices)}
    return names


def canonical(section: str, name: str) -> str:
    if section == "pax":
        if name.startswith("T."):
            name = "P.transformer.x_layers_{i}." + name[2:]
        if name.startswith("P."):
            name = "state.mdl_vars.params.lm." + name[2:]
    if section == "maxtext":
        name = name.replace("/", ".")
        if not name.startswith("params."):
            name = "params.decoder." + name
    return name


def small(config_class, **fields):
    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=64)
    return config_class(**{**sizes, **fields})


def plan_sources(section: str) -> set[str]:
    pythia, former = FAMILIES["muddpythia"], FAMILIES["muddformer"]
    plans = []
    if section == "authors-pytorch":
        plans = [authors_plan(small(MUDDPythiaConfig), pythia), authors_plan(small(MUDDFormerConfig), former),
                 authors_plan(small(MUDDFormerConfig, num_key_value_heads=2, attention_bias=True, mlp_bias=True), former)]
    elif section == "pax":
        plans = [pax_plan(small(MUDDPythiaConfig), pythia), pax_plan(small(MUDDFormerConfig), former)]
    elif section == "maxtext":
        plans = [maxtext_plan(small(MUDDFormerConfig, use_qk_norm=False), former),
                 maxtext_plan(small(MUDDFormerConfig, separate_stream_norms_first_layer=True, dense_prenorm=True,
                                    dense_postnorm=True), former)]
    elif section == "gpt-neox":
        plans = [gpt_neox_plan(small(MUDDPythiaConfig, use_qk_norm=False, ffn_width_reallocation=False))]
    elif section == "llama":
        plans = [llama_plan(small(MUDDFormerConfig, use_qk_norm=False, ffn_width_reallocation=False,
                                  attention_bias=True, mlp_bias=True))]
    elif section == "vit-npz":
        return set(expected_shapes(small(MUDDViTConfig, image_size=32, patch_size=8, num_labels=5)))
    return {source for plan in plans for rule in plan.rules for source in rule.sources}


FORMATS = ["authors-pytorch", "pax", "maxtext", "gpt-neox", "llama", "vit-npz"]


def test_the_page_has_a_section_per_format():
    assert set(FORMATS) <= set(sections())


@pytest.mark.parametrize("section", FORMATS)
def test_every_source_name_is_documented_and_every_documented_name_is_read(section):
    patterns = sections()[section]
    documented = {pattern: expand(canonical(section, pattern)) for pattern in patterns}
    all_documented = set().union(*documented.values())
    sources = plan_sources(section)
    assert sources, section
    undocumented = sorted(sources - all_documented)
    assert not undocumented, f"{section}: read by the converter but not on the page: {undocumented[:8]}"
    phantom = [pattern for pattern, names in documented.items() if not names & sources]
    assert not phantom, f"{section}: on the page but never read: {phantom}"
