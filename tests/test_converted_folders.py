"""What a converted folder carries besides weights: a model card for vit-npz, a warning when it has no tokenizer."""

from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from convert_fixtures import Shapes, pax_tensors  # noqa: E402
from test_muddvit import synthetic_npz_arrays, write_npz  # noqa: E402

from modeling_muddpythia import cli_convert  # noqa: E402


def test_vit_npz_folder_gets_a_model_card_that_says_what_it_is(tmp_path):
    from modeling_muddpythia.convert_vit_npz import convert_vit_npz

    source = write_npz(tmp_path / "ViT-T_8.npz", synthetic_npz_arrays())
    out = convert_vit_npz(source, tmp_path / "muddvit-t8")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-classification\n")
    assert "`ViT-T_8.npz`" in card and "same function as the source ViT" in card
    assert "not a model trained with MUDD" in card
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}" in card


def test_a_converted_folder_without_tokenizer_gets_a_warning(tmp_path, capsys):
    shapes = Shapes()
    source = tmp_path / "pax.npz"
    np.savez(source, **{name: t.float().numpy() for name, t in pax_tensors(shapes).items()})
    status = cli_convert.main(["--format", "pax", "--input", str(source), "--output", str(tmp_path / "out"),
                           "--config", '{"vocab_size": %d}' % shapes.vocab])
    assert status == 0
    err = capsys.readouterr().err
    assert "warning: no tokenizer files" in err and "--tokenizer" in err
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "out").iterdir())
