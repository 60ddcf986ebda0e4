"""`mudd-convert`: the authors' checkpoints (and plain GPT-NeoX / Llama models) -> Hub-loadable MUDD folders.

    mudd-convert --format authors-pytorch --input MUDDPythia-1.4B --output muddpythia-1.4b-hf [--verify]

The conversion streams tensor by tensor (peak memory ~ the largest tensor, not the checkpoint), writes into a
temporary sibling of the output folder and renames it only when everything, including `--verify`, succeeded:
an error or an interrupt never leaves a partial output folder. Exit codes: 0 success, 1 conversion error,
2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert_io import (
    ConversionError, RenamedSource, ShardedSafetensorsWriter, TensorSource, open_flat_or_directory, open_weights, parse_size,
)
from .convert_plans import (
    FAMILIES, MAXTEXT_SHAPES, PAX_SHAPES, Family, KeyPlan, authors_config, authors_plan, config_from_shapes, format_shape,
    gpt_neox_canonical_name, gpt_neox_config, gpt_neox_plan, llama_config, llama_plan, maxtext_canonical_name,
    maxtext_plan, pax_canonical_name, pax_family, pax_plan, shape_matches,
)


FORMATS = ("authors-pytorch", "pax", "maxtext", "gpt-neox", "llama", "vit-npz")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)
MODEL_CARDS = Path(__file__).resolve().parent.parent / "model_cards"
# How many offending names an error message lists.
_LIST_LIMIT = 10


def _log(message: str) -> None:
    print(f"mudd-convert: {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    format: str
    input: Path
    output: Path
    model_type: str | None = None
    config: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    max_shard_bytes: int = 5 * 10**9
    tokenizer: Path | None = None
    verify: bool = False
    force: bool = False
    strict: bool = False
    allow_pickle: bool = False


@dataclass
class Prepared:
    """Everything known before the first tensor is read."""

    source: TensorSource
    family: Family
    config: object
    plan: KeyPlan
    folder: Path | None  # the source folder (tokenizer files, runnable source model)
    load_source_model: Callable[[torch.dtype], torch.nn.Module] | None = None
    not_runnable: str = "the source format has no runnable model"
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- preparation
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _check_model_type(requested: str | None, found: str, where: str) -> Family:
    if found not in FAMILIES:
        raise ConversionError(f"{where}: model_type {found!r} is not one of {sorted(FAMILIES)}")
    if requested is not None and requested != found:
        raise ConversionError(f"--model-type {requested} does not match {where} (model_type {found!r})")
    return FAMILIES[found]


def _prepare_authors(options: Options) -> Prepared:
    warnings: list[str] = []
    folder = options.input if options.input.is_dir() else options.input.parent
    authors = _read_json(folder / "config.json", "the authors' config.json")
    if "model_type" not in authors and options.model_type is None:
        raise ConversionError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    family = _check_model_type(options.model_type, authors.get("model_type", options.model_type), str(folder / "config.json"))
    source = open_weights(options.input, options.allow_pickle)
    try:
        config = authors_config(authors, source, family, options.config, warnings.append)
    except BaseException:
        source.close()
        raise
    prepared = Prepared(source, family, config, authors_plan(config, family), folder, warnings=warnings)
    reference = (authors.get("auto_map") or {}).get("AutoModelForCausalLM")
    module_file = folder / f"{str(reference).rsplit('.', 1)[0]}.py"
    if reference is None:
        prepared.not_runnable = "the authors' config.json has no auto_map entry for AutoModelForCausalLM"
    elif "--" in reference or not module_file.is_file():
        prepared.not_runnable = f"the authors' modeling code ({reference}) is not in {folder}"
    else:
        def load_authors_model(dtype: torch.dtype):
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            # Resolved by hand: our package registers the same model_type, which AutoModel would prefer.
            model_class = get_class_from_dynamic_module(reference, folder, local_files_only=True)
            return model_class.from_pretrained(folder, dtype=dtype)

        prepared.load_source_model = load_authors_model
    return prepared


def _prepare_jax(options: Options) -> Prepared:
    if options.format == "pax":
        source = RenamedSource(open_flat_or_directory(options.input), pax_canonical_name)
    else:
        if options.model_type not in (None, "muddformer"):
            raise ConversionError("maxtext checkpoints are MUDDFormer (Llama family) models: use --model-type muddformer")
        source = RenamedSource(open_flat_or_directory(options.input), maxtext_canonical_name)
    try:
        if source.foreign:
            _log(f"skipping {len(source.foreign)} arrays that are not model weights (e.g. {source.foreign[0]!r})")
        if options.format == "pax":
            family = pax_family(source, options.model_type)
            config = config_from_shapes(source, family, options.config, PAX_SHAPES)
            plan = pax_plan(config, family)
        else:
            family = FAMILIES["muddformer"]
            config = config_from_shapes(source, family, options.config, MAXTEXT_SHAPES)
            plan = maxtext_plan(config, family)
    except BaseException:
        source.close()
        raise
    return Prepared(source, family, config, plan, None)


def _prepare_plain(options: Options) -> Prepared:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = options.input
    if not folder.is_dir():
        raise ConversionError(f"--format {options.format} expects a transformers model folder, got {folder}")
    if options.config:
        raise ConversionError(f"--config is not used with --format {options.format}: the model's config.json is complete")
    expected = {"gpt-neox": "gpt_neox", "llama": "llama"}[options.format]
    found = _read_json(folder / "config.json", "config.json").get("model_type")
    if found != expected:
        raise ConversionError(f"--format {options.format} expects model_type {expected!r} in {folder / 'config.json'}, found {found!r}")
    try:
        source_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{folder / 'config.json'}: transformers cannot read it ({error})") from None
    family = _check_model_type(options.model_type, "muddpythia" if expected == "gpt_neox" else "muddformer", f"--format {options.format}")
    config = gpt_neox_config(source_config) if expected == "gpt_neox" else llama_config(source_config)
    plan = gpt_neox_plan(config) if expected == "gpt_neox" else llama_plan(config)
    source = open_weights(folder, options.allow_pickle)
    if expected == "gpt_neox":
        source = RenamedSource(source, gpt_neox_canonical_name)
    prepared = Prepared(source, family, config, plan, folder)
    prepared.load_source_model = lambda dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return prepared


def prepare(options: Options) -> Prepared:
    if options.format == "authors-pytorch":
        return _prepare_authors(options)
    if options.format in ("pax", "maxtext"):
        return _prepare_jax(options)
    return _prepare_plain(options)


# ---------------------------------------------------------------------------------------------------- checks
def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_LIST_LIMIT])
    more = f"\n  ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"\n  {shown}{more}"


def check_plan(prepared: Prepared, format_name: str, target_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Check the source against the plan before anything is written; returns the ignored source names (-> reason).

    Raises `ConversionError` listing missing keys (with what was expected), wrong shapes (got and expected) and
    unexpected keys.
    """
    plan, source = prepared.plan, prepared.source
    names = set(source.names())
    used: set[str] = set()
    missing, wrong = [], []
    for rule in plan.rules:
        for name, shape in zip(rule.sources, rule.source_shapes):
            if name in used:
                raise RuntimeError(f"plan bug: {name} is used by two rules")
            used.add(name)
            if name not in names:
                missing.append(f"{name!r}: expected {rule.what}, shape {format_shape(shape)}")
                continue
            actual = source.info(name).shape
            if not shape_matches(shape, actual):
                wrong.append(f"{name!r} has shape {list(actual)}, expected {format_shape(shape)} ({rule.what})")
    ignored = {name: reason for name in names - used if (reason := plan.ignore_reason(name))}
    unexpected = sorted(names - used - set(ignored))
    problems = []
    if missing:
        problems.append(f"missing keys in {source.description}:{_listing(missing)}")
    if wrong:
        problems.append(f"wrong shapes:{_listing(wrong)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of the {format_name} layout for this config):{_listing(unexpected)}")
    if problems:
        raise ConversionError("\n".join(problems))

    produced = Counter(target for rule in plan.rules for target in rule.targets)
    produced.update(name for name in target_shapes if name.startswith(tuple(p + "." for p in plan.initialized)))
    doubled = sorted(name for name, count in produced.items() if count > 1)
    if doubled:
        raise RuntimeError(f"plan bug: targets filled twice: {doubled[:5]}")
    unfilled = sorted(set(target_shapes) - set(produced))
    if unfilled:
        raise ConversionError(
            f"the {format_name} layout has nothing for these parameters of the derived config "
            f"(check --config):{_listing(unfilled)}"
        )
    extra = sorted(set(produced) - set(target_shapes))
    if extra:
        raise RuntimeError(f"plan bug: targets the model does not have: {extra[:5]}")
    return ignored


def _source_dtype(prepared: Prepared) -> torch.dtype:
    """The floating dtype holding most of the planned source numbers."""
    weights: Counter = Counter()
    for rule in prepared.plan.rules:
        for name in rule.sources:
            info = prepared.source.info(name)
            if info.dtype.is_floating_point:
                weights[info.dtype] += math.prod(info.shape)
    return weights.most_common(1)[0][0] if weights else torch.float32


# ---------------------------------------------------------------------------------------------------- writing
def _meta_model(prepared: Prepared) -> torch.nn.Module:
    with torch.device("meta"):
        return prepared.family.model_class(prepared.config)


def _target_shapes(model: torch.nn.Module, config) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        for tied in getattr(model, "_tied_weights_keys", None) or {}:
            shapes.pop(tied, None)
    return shapes


def _initialized_tensors(model: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's own (seeded) init of the given submodules: the identity dense connections of a muddified model."""
    tensors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for prefix in prefixes:
            module = model.get_submodule(prefix).to_empty(device="cpu")
            module.apply(model._init_weights)
            tensors.update(module.state_dict(prefix=prefix + "."))
    return tensors


@contextlib.contextmanager
def _quiet_progress():
    """transformers' progress bars (saving, loading) would interleave with our log lines."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _scan(tensor: torch.Tensor) -> tuple[float, int]:
    """(float64 sum of the finite values, number of non-finite values), computed in chunks: a whole-tensor float
    copy of an embedding would otherwise be the largest allocation of the run."""
    total, nonfinite = 0.0, 0
    for chunk in tensor.reshape(-1).split(1 << 22):
        values = chunk.to(torch.float64)
        finite = torch.isfinite(values)
        nonfinite += values.numel() - int(finite.sum())
        total += float(values.masked_fill_(~finite, 0.0).sum())
    return total, nonfinite


class _Conversion:
    """One run: checks, streams every tensor into the temporary folder, records what was read and written."""

    def __init__(self, options: Options, prepared: Prepared):
        self.options, self.prepared = options, prepared
        self.model = _meta_model(prepared)
        self.target_shapes = _target_shapes(self.model, prepared.config)
        self.ignored = check_plan(prepared, options.format, self.target_shapes)
        self.dtype = options.dtype or _source_dtype(prepared)
        self.reads: Counter = Counter()
        self.sums: dict[str, float] = {}
        self.nonfinite: list[str] = []

    def _emit(self, writer: ShardedSafetensorsWriter, target: str, tensor: torch.Tensor, origin: str) -> None:
        if tuple(tensor.shape) != self.target_shapes[target]:
            raise RuntimeError(f"plan bug: {target} came out as {list(tensor.shape)}, expected {list(self.target_shapes[target])}")
        tensor = tensor.to(self.dtype)
        self.sums[target], nonfinite = _scan(tensor)
        if nonfinite:
            message = f"{target} (from {origin}) has {nonfinite} non-finite values"
            if self.options.strict:
                raise ConversionError(f"{message} (--strict)")
            self.nonfinite.append(message)
        writer.write(target, tensor)

    def write_weights(self, directory: Path) -> ShardedSafetensorsWriter:
        plan, source = self.prepared.plan, self.prepared.source
        initialized = [name for name in self.target_shapes if name.startswith(tuple(p + "." for p in plan.initialized))]
        order = [target for rule in plan.rules for target in rule.targets] + initialized
        writer = ShardedSafetensorsWriter(directory, ((n, self.target_shapes[n], self.dtype) for n in order), self.options.max_shard_bytes)
        try:
            for rule in plan.rules:
                tensors = []
                for name in rule.sources:
                    tensors.append(source.read(name))
                    self.reads[name] += 1
                for target, tensor in zip(rule.targets, rule.apply(*tensors), strict=True):
                    self._emit(writer, target, tensor, ", ".join(rule.sources))
                del tensors
            if initialized:
                generated = _initialized_tensors(self.model, plan.initialized)
                for name in initialized:
                    self._emit(writer, name, generated[name], "the identity initialisation")
            writer.finish()
        finally:
            writer.close()
        return writer

    def write_metadata(self, directory: Path) -> None:
        """Config, generation config and the model's .py files, exactly as save_pretrained writes them (no weights)."""
        with _quiet_progress():
            self.model.to(self.dtype).save_pretrained(directory, state_dict={})

    def copy_tokenizer(self, directory: Path) -> list[str]:
        origin = self.options.tokenizer or self.prepared.folder
        if origin is None:
            return []
        if origin.is_file():
            shutil.copy2(origin, directory / origin.name)
            return [origin.name]
        copied = [name for name in TOKENIZER_FILES if (origin / name).is_file()]
        if self.options.tokenizer is not None and not copied:
            raise ConversionError(f"--tokenizer {origin}: none of {list(TOKENIZER_FILES)} found")
        for name in copied:
            shutil.copy2(origin / name, directory / name)
        return copied

    def write_card(self, directory: Path) -> None:
        options, config = self.options, self.prepared.config
        for name in (options.output.name, options.input.name):
            card = MODEL_CARDS / f"{name}.md"
            if card.is_file():
                shutil.copy2(card, directory / "README.md")
                return
        parameters = sum(math.prod(shape) for shape in self.target_shapes.values())
        (directory / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags:\n- mudd\n- {config.model_type}\n---\n\n"
            f"# {options.output.name}\n\n"
            f"A {config.model_type} model ({config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{parameters / 1e9:.2f}B parameters) with multiway dynamic dense (MUDD) connections, converted with "
            f"`mudd-convert --format {options.format}` from `{options.input.name}`.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{options.output.name}", trust_remote_code=True)\n```\n\n'
            "This card is a stub written by the converter: add the source checkpoint's training data, evaluation "
            "results, license and citation.\n"
        )


# ---------------------------------------------------------------------------------------------------- verify
def _logits(output) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def verify(run: _Conversion, directory: Path) -> None:
    """Reload the written folder and check it against what the conversion read and wrote.

    Both models run in the output dtype (what users will load), so verifying costs one model's memory (two with a
    runnable source), not a float32 copy; half-precision logits are compared with a looser tolerance.
    """
    prepared = run.prepared
    planned = [name for rule in prepared.plan.rules for name in rule.sources]
    misused = sorted(f"{name} (read {run.reads[name]} times)" for name in planned if run.reads[name] != 1)
    if misused or set(run.reads) - set(planned):
        raise ConversionError(f"verify: source tensors not used exactly once:{_listing(misused)}")
    with _quiet_progress():
        model, info = prepared.family.model_class.from_pretrained(directory, output_loading_info=True, dtype=run.dtype)
    problems = {key: value for key, value in info.items() if key in ("missing_keys", "unexpected_keys", "mismatched_keys") and value}
    if problems:
        raise ConversionError(f"verify: loading the output reported {problems}")
    state = model.state_dict()
    unfilled = sorted(set(run.target_shapes) - set(run.sums))
    differing = [
        name for name, total in run.sums.items()
        if not math.isclose(_scan(state[name])[0], total, rel_tol=1e-9, abs_tol=1e-9)
    ]
    if unfilled or differing:
        raise ConversionError(f"verify: parameters not filled with the converted values:{_listing(unfilled + differing)}")
    _log(
        f"verify: {len(planned)} source tensors each used once ({len(run.ignored)} ignored), "
        f"{len(run.sums)} parameters filled and reloaded intact"
    )

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, prepared.config.vocab_size, (1, min(8, prepared.config.max_position_embeddings)), generator=generator)
    with torch.no_grad():
        logits = _logits(model.eval()(input_ids)).float()
    if not torch.isfinite(logits).all():
        raise ConversionError("verify: the converted model produces non-finite logits")
    if prepared.load_source_model is None:
        _log(f"verify: forward comparison skipped: {prepared.not_runnable}")
        return
    try:
        with _quiet_progress():
            source_model = prepared.load_source_model(run.dtype)
    except Exception as error:  # the authors' code may not run here; the parameter checks above still hold
        _log(f"verify: forward comparison skipped: the source model does not load ({type(error).__name__}: {error})")
        return
    with torch.no_grad():
        expected = _logits(source_model.eval()(input_ids)).float()
    tolerance = (1e-3 if run.dtype == torch.float32 else 1e-1) * max(1.0, float(expected.abs().max()))
    difference = float((logits - expected).abs().max())
    if difference > tolerance:
        raise ConversionError(f"verify: logits differ from the source model's by {difference:.3g} (tolerance {tolerance:.3g})")
    _log(f"verify: logits match the source model's (max |diff| {difference:.3g})")


# ---------------------------------------------------------------------------------------------------- driver
def _check_paths(options: Options) -> None:
    source, output = options.input.resolve(), options.output.resolve()
    if not options.input.exists():
        raise ConversionError(f"--input {options.input}: no such file or directory")
    if source.is_relative_to(output):
        raise ConversionError(f"--output {options.output} would replace the input {options.input}")
    if options.output.exists() or options.output.is_symlink():
        if not options.output.is_dir():
            raise ConversionError(f"--output {options.output} exists and is not a directory")
        if not options.force:
            raise ConversionError(f"--output {options.output} already exists; pass --force to replace it")


def _publish(temporary: Path, output: Path) -> None:
    """Move the finished folder into place; an existing output (with --force) is replaced only at this point."""
    if not output.exists():
        os.replace(temporary, output)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    os.replace(output, holder / output.name)
    try:
        os.replace(temporary, output)
    except BaseException:
        os.replace(holder / output.name, output)
        raise
    finally:
        if output.exists():
            shutil.rmtree(holder, ignore_errors=True)


def convert(options: Options) -> Path:
    """Run one conversion; returns the output folder. Raises `ConversionError` (or `KeyboardInterrupt`)."""
    _check_paths(options)
    prepared = prepare(options)
    try:
        config = prepared.config
        run = _Conversion(options, prepared)
        _log(
            f"{options.format} -> {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads, vocab {config.vocab_size}, {run.dtype} ({len(prepared.plan.rules)} rules)"
        )
        options.output.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{options.output.name}.partial-", dir=options.output.parent))
        try:
            run.write_metadata(temporary)  # first: save_pretrained clears weight files it did not write
            writer = run.write_weights(temporary)
            _log(f"wrote {len(writer.weight_map)} tensors ({writer.total_bytes / 1e9:.2f} GB) in {len(writer.files)} shard(s)")
            tokenizer = run.copy_tokenizer(temporary)
            if tokenizer:
                _log(f"copied tokenizer files {tokenizer}")
            else:
                _log("warning: no tokenizer files were found in the source, so the output folder has no tokenizer; "
                     "pass --tokenizer FOLDER (e.g. the released model's folder) to copy them")
            run.write_card(temporary)
            for warning in prepared.warnings + run.nonfinite:
                _log(f"warning: {warning}")
            if options.verify:
                verify(run, temporary)
            _publish(temporary, options.output)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    finally:
        prepared.source.close()
    _log(f"done: {options.output}")
    return options.output


def _config_argument(text: str) -> dict:
    """`--config`: inline JSON or a path to a JSON file (e.g. a preset from `configuration/`)."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a JSON object or a JSON file: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mudd-convert",
        description="Convert the MUDD authors' checkpoints (or a plain GPT-NeoX / Llama model) into a folder that "
        "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) loads. The source layouts of every "
        "--format (names, shapes, transforms) are in docs/CHECKPOINT_FORMATS.md of the repository.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of --input (CHECKPOINT_FORMATS.md)")
    parser.add_argument("--input", required=True, type=Path, help="checkpoint folder or file")
    parser.add_argument("--output", required=True, type=Path, help="folder to create")
    parser.add_argument("--model-type", choices=sorted(FAMILIES), help="model family, when the source does not say")
    parser.add_argument("--config", type=_config_argument, default={}, help="JSON object or file of config fields "
                        "for what the checkpoint cannot tell (e.g. '{\"rope_parameters\": ...}')")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", type=_size_argument, default=5 * 10**9, help="largest shard (default 5GB)")
    parser.add_argument("--tokenizer", type=Path, help="folder (or file) with tokenizer files to copy")
    parser.add_argument("--verify", action="store_true", help="reload the result and check it (and compare logits "
                        "with the source model where it can run)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--strict", action="store_true", help="fail on non-finite weights instead of warning")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (weights_only=True)")
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _convert_vit_npz(args: argparse.Namespace) -> int:
    """`--format vit-npz`: Google's JAX ViT `.npz` -> MUDDViT folder (see `convert_vit_npz.py`)."""
    from .convert_vit_npz import convert_vit_npz

    unsupported = [flag for flag, value in (("--model-type", args.model_type), ("--tokenizer", args.tokenizer),
                                            ("--verify", args.verify), ("--allow-pickle", args.allow_pickle)) if value]
    if unsupported:
        _log(f"error: {', '.join(unsupported)} do not apply to --format vit-npz")
        return 2
    try:
        convert_vit_npz(args.input, args.output, config_overrides=args.config or None, dtype=args.dtype or "float32",
                        force=args.force, strict=args.strict)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        _log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {args.output}")
        return 130
    _log(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "vit-npz":
        return _convert_vit_npz(args)
    options = Options(
        format=args.format, input=args.input, output=args.output, model_type=args.model_type, config=args.config,
        dtype=DTYPES[args.dtype] if args.dtype else None, max_shard_bytes=args.max_shard_size, tokenizer=args.tokenizer,
        verify=args.verify, force=args.force, strict=args.strict, allow_pickle=args.allow_pickle,
    )
    # A termination request ends like Ctrl-C: the temporary folder is removed on the way out.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        convert(options)
    except ConversionError as error:
        _log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {options.output}")
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
