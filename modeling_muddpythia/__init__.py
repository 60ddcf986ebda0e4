"""MUDD (multiway dynamic dense) models for Hugging Face transformers.

Importing the package registers the MUDD configs and models with transformers' Auto classes. The one exception is
the commands `mudd`, `mudd-convert`, `mudd-finetune`, `mudd-pretrain` and `mudd-eval` (also as `python -m
modeling_muddpythia.cli`, `.cli_convert`, `.cli_finetune`, `.cli_pretrain`, `.evaluation`): they parse their arguments
first, so that `--help` answers without importing torch and
transformers (seconds), and then load what they need.
"""

import importlib
import os
import sys

# public name -> submodule that defines it
_EXPORTS = {
    "MUDDPythiaConfig": "configuration_muddpythia",
    "MUDDPythiaModel": "modeling_muddpythia",
    "MUDDPythiaForCausalLM": "modeling_muddpythia",
    "MUDDPythiaForSequenceClassification": "modeling_muddpythia",
    "MUDDPythiaForTokenClassification": "modeling_muddpythia",
    "MUDDPythiaForQuestionAnswering": "modeling_muddpythia",
    "MUDDFormerConfig": "configuration_muddformer",
    "MUDDFormerModel": "modeling_muddformer",
    "MUDDFormerForCausalLM": "modeling_muddformer",
    "MUDDFormerForSequenceClassification": "modeling_muddformer",
    "MUDDFormerForTokenClassification": "modeling_muddformer",
    "MUDDFormerForQuestionAnswering": "modeling_muddformer",
    "MUDDViTConfig": "configuration_muddvit",
    "MUDDViTModel": "modeling_muddvit",
    "MUDDViTForImageClassification": "modeling_muddvit",
    "muddify": "muddify",
}
__all__ = list(_EXPORTS)
_loaded = False


def load_package() -> None:
    """Import the model classes and register them with transformers' Auto classes (idempotent)."""
    global _loaded
    if _loaded:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    values = {name: getattr(importlib.import_module(f".{module}", __name__), name) for name, module in _EXPORTS.items()}
    globals().update(values)  # also replaces the attribute `muddify` (the submodule) by the function
    for family in ("MUDDPythia", "MUDDFormer"):
        config = values[f"{family}Config"]
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, values[f"{family}Model"], exist_ok=True)
        AutoModelForCausalLM.register(config, values[f"{family}ForCausalLM"], exist_ok=True)
        AutoModelForSequenceClassification.register(config, values[f"{family}ForSequenceClassification"], exist_ok=True)
        AutoModelForTokenClassification.register(config, values[f"{family}ForTokenClassification"], exist_ok=True)
        AutoModelForQuestionAnswering.register(config, values[f"{family}ForQuestionAnswering"], exist_ok=True)
    config = values["MUDDViTConfig"]
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, values["MUDDViTModel"], exist_ok=True)
    AutoModelForImageClassification.register(config, values["MUDDViTForImageClassification"], exist_ok=True)
    _loaded = True


def __getattr__(name):
    if name in _EXPORTS:
        load_package()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


# The commands that parse their arguments before the package is loaded, as console scripts and as `-m` modules.
_LIGHT_COMMANDS = {
    "mudd": "cli", "mudd-convert": "cli_convert", "mudd-finetune": "cli_finetune", "mudd-pretrain": "cli_pretrain",
    "mudd-eval": "evaluation",
}


def _started_as_mudd_command() -> bool:
    """True while one of `_LIGHT_COMMANDS` is starting (as a console script or with `python -m`)."""
    if sys.argv and os.path.basename(sys.argv[0]).removesuffix(".exe").removesuffix("-script.py") in _LIGHT_COMMANDS:
        return True
    argv = list(getattr(sys, "orig_argv", []))
    modules = {f"{__name__}.{module}" for module in _LIGHT_COMMANDS.values()}
    return "-m" in argv and argv[argv.index("-m") + 1: argv.index("-m") + 2] in [[module] for module in modules]


if not _started_as_mudd_command():
    load_package()
