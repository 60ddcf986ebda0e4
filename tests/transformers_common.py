"""transformers' own common model tests, taken from the sdist of the installed transformers version.

`make test-setup` downloads that sdist from the package index and unpacks its `tests/` folder into the ignored
`build/transformers-tests/` (see the Makefile); nothing of it is kept in this repository. This module imports it as
the package `transformers_common_tests` and provides, in our own words, the three modules the sdist does not ship but
`test_modeling_common.py` / `test_configuration_common.py` import:

* `generation.test_utils.GenerationTesterMixin`: our generation behaviour tests (`generation_behaviours.py`);
* `exporters.test_export.ExportTesterMixin`: a `torch.export` check (`ExportBehaviours` below);
* `utils.test_configuration_utils.config_common_kwargs`: a non-default value for every argument the 5.x base config
  takes, which `ConfigTester.check_config_arguments_init` sets and reads back.

`MappingNamesForTheClass` adds the MUDD classes to transformers' `*_MAPPING_NAMES` tables while a tester runs: the
mixins decide by class name there which inputs a head needs (`labels` for causal-LM and classification heads, span
positions for question answering), and `AutoModel.register` does not fill them.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from pathlib import Path

import torch
import transformers
from transformers.models.auto import modeling_auto


ROOT = Path(__file__).resolve().parent.parent
HF_TESTS = ROOT / "build" / "transformers-tests"
PACKAGE = "transformers_common_tests"


class ExportBehaviours:
    """`torch.export` of every model class gives a program whose outputs equal the eager model's (what transformers'
    export tests check for in-library models)."""

    test_torch_exportable = True

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="test_torch_exportable is off for this tester")
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs_for_class = self._prepare_for_class(inputs, model_class)
            inputs_for_class = {k: v for k, v in inputs_for_class.items() if isinstance(v, torch.Tensor)}
            if "use_cache" in inspect.signature(model_class.forward).parameters:
                inputs_for_class["use_cache"] = False  # a Cache object is no pytree output
            with torch.no_grad():
                eager = model(**inputs_for_class)
                program = torch.export.export(model, args=(), kwargs=inputs_for_class, strict=False)
                exported = program.module()(**inputs_for_class)
            compared = [key for key, value in eager.items() if isinstance(value, torch.Tensor)]  # logits, spans...
            assert compared, model_class.__name__
            for key in compared:
                torch.testing.assert_close(exported[key], eager[key], rtol=1e-5, atol=1e-5, msg=key)


# Our own values, one per argument of `PreTrainedConfig` in transformers 5.23, none of them the default.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["SomeModelForCausalLM"],
    "id2label": {0: "first", 1: "second", 2: "third"},
    "label2id": {"first": 0, "second": 1, "third": 2},
    "problem_type": "multi_label_classification",
    "bos_token_id": 3,
    "eos_token_id": 4,
    "pad_token_id": 5,
}


def _add_module(name: str, is_package: bool = False, **attributes) -> types.ModuleType:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    if is_package:
        module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module
    return module


MAPPING_NAMES = {
    "MODEL_MAPPING_NAMES": {"muddpythia": "MUDDPythiaModel", "muddformer": "MUDDFormerModel", "muddvit": "MUDDViTModel"},
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {"muddpythia": "MUDDPythiaForCausalLM", "muddformer": "MUDDFormerForCausalLM"},
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": {"muddvit": "MUDDViTForImageClassification"},
    **{
        f"MODEL_FOR_{task.upper()}_MAPPING_NAMES": {
            "muddpythia": f"MUDDPythiaFor{name}", "muddformer": f"MUDDFormerFor{name}"
        }
        for task, name in (
            ("sequence_classification", "SequenceClassification"),
            ("token_classification", "TokenClassification"),
            ("question_answering", "QuestionAnswering"),
        )
    },
}


class MappingNamesForTheClass:
    """For a `unittest.TestCase` running the mixins: the MUDD classes are in transformers' `*_MAPPING_NAMES` while
    the class's tests run, and removed afterwards, so that no other test sees entries whose module transformers
    cannot import. transformers' log level is its default (warning) meanwhile: several mixin tests read warnings,
    and other code in the same process (e.g. `Trainer`, which sets the level) may have changed it."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for table, entries in MAPPING_NAMES.items():
            getattr(modeling_auto, table).update(entries)
        cls._previous_verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_warning()

    @classmethod
    def tearDownClass(cls):
        transformers.logging.set_verbosity(cls._previous_verbosity)
        for table, entries in MAPPING_NAMES.items():
            for model_type in entries:
                getattr(modeling_auto, table).pop(model_type, None)
        super().tearDownClass()


def load_common_tests() -> types.ModuleType:
    """Import the sdist's test package (once) and return it; a clear error when `make test-setup` has not run."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    tests_dir = HF_TESTS / "tests"
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise RuntimeError(
            f"transformers' common tests are not in {tests_dir}: run `make test-setup` (it downloads the transformers "
            "sdist of the installed version from the package index and unpacks its tests there)"
        )
    version = (HF_TESTS / "VERSION").read_text().strip()
    if version != transformers.__version__:
        raise RuntimeError(
            f"{tests_dir} holds the tests of transformers {version}, but {transformers.__version__} is installed: "
            "run `rm -rf build/transformers-tests && make test-setup`"
        )
    from generation_behaviours import GenerationBehaviours

    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = package
    _add_module("generation", is_package=True)
    _add_module("generation.test_utils", GenerationTesterMixin=GenerationBehaviours)
    _add_module("exporters", is_package=True)
    _add_module("exporters.test_export", ExportTesterMixin=ExportBehaviours)
    _add_module("utils", is_package=True)
    _add_module("utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    return package


def common_module(name: str) -> types.ModuleType:
    """`common_module("test_modeling_common")` -> the sdist's module of that name."""
    load_common_tests()
    # test_configuration_common.py imports "the transformers source next to the tests" with
    # `direct_transformers_import(tests_dir)`, which reads `tests/__init__.py` of a source checkout; the sdist's tests
    # folder has none, and the installed transformers is the one meant (it stays unused there anyway).
    original = transformers.utils.direct_transformers_import
    transformers.utils.direct_transformers_import = lambda path, file="__init__.py": transformers
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        transformers.utils.direct_transformers_import = original
