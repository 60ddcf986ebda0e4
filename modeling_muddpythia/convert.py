"""`mudd-convert`: the authors' checkpoints (and plain GPT-NeoX / Llama models) -> Hub-loadable MUDD folders.

    mudd-convert --format authors-pytorch --input MUDDPythia-1.4B --output muddpythia-1.4b-hf [--verify]

The conversion streams tensor by tensor (peak memory ~ the largest tensor, not the checkpoint), holds an exclusive
claim on the output for the whole run (a second run on the same output fails), writes into a hidden sibling of the
output folder, fsyncs it and renames it only when everything, including `--verify`, succeeded: an error or an
interrupt never leaves a partial output folder, and the staging folders of killed runs are removed by the next
run. Exit codes: 0 success, 1 conversion or file error (one line naming the path and the cause), 2 bad command
line, 130 interrupted. The argument parser lives in `modeling_muddpythia.cli_convert` (no torch import before parsing),
which calls `run` here; this module does not import the parser. Inputs are read only inside what the user named
(`safe_input`), and `--force` replaces only a folder that carries this tool's ownership marker (`safe_output`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert_io import (
    FLOAT_DTYPES, ConversionError, RenamedSource, SafetensorError, ShardedSafetensorsWriter, TensorSource,
    open_flat_or_directory, open_weights, write_failure_message,
)
from .convert_plans import (
    FAMILIES, MAXTEXT_SHAPES, PAX_SHAPES, AtLeast, Family, KeyPlan, authors_config, authors_plan, config_from_shapes,
    format_shape, gpt_neox_canonical_name, gpt_neox_config, gpt_neox_plan, llama_config, llama_plan,
    maxtext_canonical_name, maxtext_plan, pax_canonical_name, pax_family, pax_plan, shape_matches,
)
from .safe_input import inside, read_bounded
from .safe_output import (
    Claim, OutputError, check_replaceable, describe_os_error, display, remove_stale, same_or_nested, staged,
)

TOOL = "mudd-convert"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)
MODEL_CARDS = Path(__file__).resolve().parent.parent / "model_cards"
# Embedding rows beyond the vocabulary that a padded source may have: real padding rounds up to a multiple of
# 64..1024, far less than this.
_PADDING_SLACK = 4096
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
    trust_remote_code: bool = False


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
        raise ConversionError(f"{what} not found: {display(path)}")
    try:
        text = read_bounded(path).decode("utf-8-sig")
    except OSError as error:
        raise ConversionError(describe_os_error(error, path, "read it")) from None
    except UnicodeDecodeError as error:
        raise ConversionError(f"{display(path)}: not UTF-8 text ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{display(path)}: not valid JSON ({error})") from None
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
    authors = _read_json(inside(folder, "config.json"), "the authors' config.json")
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
    elif not options.trust_remote_code:
        prepared.not_runnable = (
            f"running it would import the input's own Python code ({module_file.name}); pass --trust-remote-code "
            "to allow that"
        )
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
    found = _read_json(inside(folder, "config.json"), "config.json").get("model_type")
    if found != expected:
        raise ConversionError(f"--format {options.format} expects model_type {expected!r} in {folder / 'config.json'}, found {found!r}")
    try:  # never the folder's own code: the model type is a built-in one
        source_config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{folder / 'config.json'}: transformers cannot read it ({error})") from None
    family = _check_model_type(options.model_type, "muddpythia" if expected == "gpt_neox" else "muddformer", f"--format {options.format}")
    layers = source_config.num_hidden_layers
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConversionError(f"{folder / 'config.json'}: num_hidden_layers is {layers!r}; a model needs at least 1 layer")
    try:
        config = gpt_neox_config(source_config) if expected == "gpt_neox" else llama_config(source_config)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{folder / 'config.json'}: cannot build the MUDD config from it ({error})") from None
    plan = gpt_neox_plan(config) if expected == "gpt_neox" else llama_plan(config)
    source = open_weights(folder, options.allow_pickle)
    if expected == "gpt_neox":
        source = RenamedSource(source, gpt_neox_canonical_name)
    prepared = Prepared(source, family, config, plan, folder)
    prepared.load_source_model = lambda dtype: AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, trust_remote_code=False
    )
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
    missing, wrong, not_float = [], [], []
    padded: dict[int, list[tuple[str, int]]] = {}  # AtLeast(n) -> (source name, actual size)
    for rule in plan.rules:
        for name, shape in zip(rule.sources, rule.source_shapes):
            if name in used:
                raise RuntimeError(f"plan bug: {name} is used by two rules")
            used.add(name)
            if name not in names:
                missing.append(f"{name!r}: expected {rule.what}, shape {format_shape(shape)}")
                continue
            info = source.info(name)
            if info.dtype not in FLOAT_DTYPES:
                not_float.append(f"{name!r} ({rule.what}) has dtype {info.dtype_name}")
            actual = info.shape
            if not shape_matches(shape, actual):
                wrong.append(f"{name!r} has shape {list(actual)}, expected {format_shape(shape)} ({rule.what})")
                continue
            for expected, size in zip(shape, actual):
                if isinstance(expected, AtLeast):
                    if size > 2 * int(expected) + _PADDING_SLACK:  # refused before the rows are read
                        wrong.append(f"{name!r} has {size} vocabulary rows for a vocabulary of {int(expected)}: "
                                     "padding never comes near that, the file is corrupt or crafted")
                        continue
                    padded.setdefault(int(expected), []).append((name, size))
    ignored = {name: reason for name in names - used if (reason := plan.ignore_reason(name))}
    unexpected = sorted(names - used - set(ignored))
    problems = []
    if not_float:
        problems.append(
            "integer or quantized source tensors (their scales are not part of this layout, so a cast to float "
            f"would give wrong weights; dequantize them to float16/bfloat16/float32 first):{_listing(not_float)}"
        )
    for size, found in padded.items():
        if len({actual for _, actual in found}) > 1:
            listed = [f"{name!r}: {actual}" for name, actual in found]
            problems.append(
                f"the padded vocabulary dimensions disagree (the first {size} rows would be kept of each, silently "
                f"dropping the others' extra rows):{_listing(listed)}"
            )
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
    for size, found in padded.items():
        if found[0][1] > size:
            _log(f"keeping the first {size} of {found[0][1]} vocabulary rows (padding) of {[name for name, _ in found]}")
    return ignored


_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _source_dtypes(prepared: Prepared) -> Counter:
    """How many planned source tensors each (floating) dtype has."""
    return Counter(prepared.source.info(name).dtype for rule in prepared.plan.rules for name in rule.sources)


def _source_dtype(prepared: Prepared) -> torch.dtype:
    """The output dtype when none is asked for: the source's, or when sources mix float dtypes the widest one (float32
    over bfloat16/float16), so that nothing is rounded without being asked; mixed bfloat16 and float16 alone (neither
    holds the other) become float32."""
    counts = _source_dtypes(prepared)
    if not counts:
        return torch.float32
    if len(counts) == 1:
        return next(iter(counts))
    widest = max(counts, key=lambda dtype: _PRECISION[dtype])
    if widest in (torch.float16, torch.bfloat16):
        widest = torch.float32
    mix = ", ".join(f"{n} {str(d).removeprefix('torch.')}" for d, n in counts.most_common())
    _log(f"the source tensors mix dtypes ({mix}); writing {str(widest).removeprefix('torch.')} so that nothing is "
         "rounded (pass --dtype to choose)")
    return widest


def _report_downcast(prepared: Prepared, dtype: torch.dtype) -> None:
    narrower = {d: n for d, n in _source_dtypes(prepared).items() if d != dtype and _PRECISION[d] >= _PRECISION[dtype]}
    for source_dtype, count in narrower.items():
        _log(f"--dtype {str(dtype).removeprefix('torch.')}: rounding {count} {str(source_dtype).removeprefix('torch.')} "
             "source tensors")


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
        if options.dtype is not None:
            _report_downcast(prepared, options.dtype)
        self.reads: Counter = Counter()
        self.sums: dict[str, float] = {}
        self.nonfinite: list[str] = []

    def _emit(self, writer: ShardedSafetensorsWriter, target: str, tensor: torch.Tensor, origin: str) -> None:
        if tuple(tensor.shape) != self.target_shapes[target]:
            raise RuntimeError(f"plan bug: {target} came out as {list(tensor.shape)}, expected {list(self.target_shapes[target])}")
        before = _scan(tensor)[1] if tensor.dtype != self.dtype else None
        tensor = tensor.to(self.dtype)
        self.sums[target], nonfinite = _scan(tensor)
        if before is not None and nonfinite > before:
            raise ConversionError(
                f"{target} (from {origin}): {nonfinite - before} finite values overflow {str(self.dtype).removeprefix('torch.')}; "
                "choose a wider --dtype"
            )
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
        """Copy the files `tokenizer_files` found (content only: the copies' modes follow the umask)."""
        copied = []
        for path in tokenizer_files(self.options, self.prepared.folder):
            try:
                shutil.copyfile(path, directory / path.name)
            except OSError as error:
                raise ConversionError(describe_os_error(error, path, f"copy it to {display(directory)}")) from None
            copied.append(path.name)
        return copied

    def write_card(self, directory: Path) -> None:
        options, config = self.options, self.prepared.config
        for name in (options.output.name, options.input.name):
            card = MODEL_CARDS / f"{name}.md"
            if card.is_file():
                shutil.copy2(card, directory / "README.md")
                return
        parameters = sum(math.prod(shape) for shape in self.target_shapes.values())
        # Names as printable text: a file name that is not UTF-8 must not fail the card after all weights are written.
        output_name, input_name = display(options.output.name), display(options.input.name)
        (directory / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags:\n- mudd\n- {config.model_type}\n---\n\n"
            f"# {output_name}\n\n"
            f"A {config.model_type} model ({config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{parameters / 1e9:.2f}B parameters) with multiway dynamic dense (MUDD) connections, converted with "
            f"`mudd-convert --format {options.format}` from `{input_name}`.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{output_name}", trust_remote_code=True)\n```\n\n'
            "This card is a stub written by the converter: add the source checkpoint's training data, evaluation "
            "results, license and citation.\n",
            encoding="utf-8",
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
def input_model_path(format_name: str, path: Path) -> Path:
    """What counts as the input model for the overlap checks: the folder of an authors' release (also when a weights
    file inside it is given), else the file or folder given."""
    if format_name == "authors-pytorch" and not path.is_dir():
        return path.parent
    return path


def check_output_path(output: Path, inputs: dict[str, Path], force: bool) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (name -> path), or that exists (unless
    `force`, and then only a folder this tool wrote: `check_replaceable`)."""
    for what, path in inputs.items():
        if same_or_nested(output, path):
            relation = ("is" if output.resolve() == path.resolve()
                        else "contains" if path.resolve().is_relative_to(output.resolve()) else "lies inside")
            raise ConversionError(f"--output {display(output)} {relation} {what} {display(path)}; "
                                  "writing there would replace or mix with it: choose another folder")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise ConversionError(f"--output {display(output)} exists and is not a directory")
        if not force:
            raise ConversionError(f"--output {display(output)} already exists; pass --force to replace it")
        check_replaceable(output, (TOOL,))


def _check_paths(options: Options) -> None:
    if not options.input.exists():
        raise ConversionError(f"--input {display(options.input)}: no such file or directory")
    inputs = {"the input model": input_model_path(options.format, options.input)}
    if options.tokenizer is not None:
        inputs["the --tokenizer source"] = options.tokenizer
    check_output_path(options.output, inputs, options.force)


def tokenizer_files(options: Options, folder: Path | None) -> list[Path]:
    """The tokenizer files to copy: `--tokenizer` (a file, or the known files of a folder; an error when there are
    none) or those of the source folder. Checked before anything is written."""
    origin = options.tokenizer or folder
    if origin is None:
        return []
    if options.tokenizer is not None and not origin.exists():
        raise ConversionError(f"--tokenizer {display(origin)}: no such file or directory")
    if origin.is_file():
        return [origin]
    found = [inside(origin, name) for name in TOKENIZER_FILES if (origin / name).is_file()]
    if options.tokenizer is not None and not found:
        raise ConversionError(f"--tokenizer {display(origin)}: none of {list(TOKENIZER_FILES)} found")
    return found


def _write(options: Options, prepared: Prepared, run: _Conversion, staging: Path) -> None:
    try:
        run.write_metadata(staging)  # first: save_pretrained clears weight files it did not write
    except OSError as error:  # its errors may name the file being copied, not the output
        raise ConversionError(
            describe_os_error(OSError(error.errno, error.strerror), options.output, "write the config and code into it")
        ) from None
    writer = run.write_weights(staging)
    _log(f"wrote {len(writer.weight_map)} tensors ({writer.total_bytes / 1e9:.2f} GB) in {len(writer.files)} shard(s)")
    tokenizer = run.copy_tokenizer(staging)
    if tokenizer:
        _log(f"copied tokenizer files {tokenizer}")
    else:
        _log("warning: no tokenizer files were found in the source, so the output folder has no tokenizer; "
             "pass --tokenizer FOLDER (e.g. the released model's folder) to copy them")
    run.write_card(staging)
    for warning in prepared.warnings + run.nonfinite:
        _log(f"warning: {warning}")
    if options.verify:
        verify(run, staging)


def convert(options: Options) -> Path:
    """Run one conversion; returns the output folder. Raises `ConversionError`, `OutputError` (both one-line
    messages), `OSError` (a file system error; `main` names its path) or `KeyboardInterrupt`."""
    _check_paths(options)
    with Claim(options.output, TOOL):
        _check_paths(options)  # again, now that no other run can create the output
        remove_stale(options.output, _log)
        prepared = prepare(options)
        try:
            tokenizer_files(options, prepared.folder)  # a bad --tokenizer fails before any weight is written
            config = prepared.config
            run = _Conversion(options, prepared)
            _log(
                f"{options.format} -> {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{config.num_attention_heads} heads, vocab {config.vocab_size}, {run.dtype} ({len(prepared.plan.rules)} rules)"
            )
            with staged(options.output, TOOL) as staging:
                _write(options, prepared, run, staging)
        finally:
            prepared.source.close()
    _log(f"done: {display(options.output)}")
    return options.output


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _convert_vit_npz(args: argparse.Namespace) -> int:
    """`--format vit-npz`: Google's JAX ViT `.npz` -> MUDDViT folder (see `convert_vit_npz.py`)."""
    from .convert_vit_npz import convert_vit_npz

    unsupported = [flag for flag, value in (("--model-type", args.model_type), ("--tokenizer", args.tokenizer),
                                            ("--verify", args.verify), ("--allow-pickle", args.allow_pickle),
                                            ("--trust-remote-code", args.trust_remote_code)) if value]
    if unsupported:
        _log(f"error: {', '.join(unsupported)} do not apply to --format vit-npz")
        return 2
    convert_vit_npz(args.input, args.output, config_overrides=args.config or None, dtype=args.dtype or "float32",
                    force=args.force, strict=args.strict, log=_log)
    _log(f"wrote {display(args.output)}")
    return 0


def _guarded(output: Path, body: Callable[[], int]) -> int:
    """Run `body` with SIGTERM ending like Ctrl-C and every expected failure turned into one line and an exit code."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        return body()
    except (ConversionError, OutputError, ValueError, FileExistsError) as error:
        _log(f"error: {error}")
        return 1
    except OSError as error:
        _log(f"error: {describe_os_error(error)}")
        return 1
    except (SafetensorError, RuntimeError) as error:  # a failed write inside safetensors / torch
        message = write_failure_message(error, output)
        if message is None:
            raise
        _log(f"error: {message}")
        return 1
    except UnicodeError as error:  # a path or text that cannot be encoded: name what failed
        _log(f"error: {display(output)}: {error}")
        return 1
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {display(output)}")
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run the parsed `mudd-convert` command line (see `modeling_muddpythia.cli_convert.build_parser`); returns the exit code."""
    if args.format == "vit-npz":
        return _guarded(args.output, lambda: _convert_vit_npz(args))
    options = Options(
        format=args.format, input=args.input, output=args.output, model_type=args.model_type, config=args.config,
        dtype=DTYPES[args.dtype] if args.dtype else None, max_shard_bytes=args.max_shard_size, tokenizer=args.tokenizer,
        verify=args.verify, force=args.force, strict=args.strict, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )

    def body() -> int:
        convert(options)
        return 0

    return _guarded(options.output, body)

