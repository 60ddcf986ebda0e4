"""Tensor containers for the checkpoint converter: lazy readers (one tensor at a time) and a streaming writer.

Readers never hold more than the tensor being read: safetensors through the safetensors library (`safe_open`,
which validates the header and the data offsets and reads tensors one by one), `.npz` members one by one,
TensorStore/Orbax arrays one by one, and pickles only when asked to (`weights_only=True`, memory-mapped). The
writer is hand-written because the library writes only whole dicts of tensors: it lays out every shard up front
from the known target shapes, so each tensor goes to disk as soon as it is converted, and fsyncs each shard.

Every problem with the input is raised as `ConversionError` with a message meant for the user. Files are read only
inside the input (`safe_input`): shard names are plain file names, links must stay inside the folder (or, for a Hub
cache snapshot, inside its repository's `blobs/`). Declared sizes are checked against stored sizes before anything
is allocated: safetensors offsets by the library, each `.npz` member's `.npy` header against the member's size, and
each TensorStore array's chunk grid against the chunks on disk (a missing chunk is an error, never fill values).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .safe_input import check_tree, inside, plain_name, read_bounded
from .safe_output import describe_os_error, display, reraise_with_path


class ConversionError(Exception):
    """A problem with the input, the options or the output folder; the message says what and where."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch has no type for (named by `label`)
    label: str = ""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else self.label


# The source dtypes the converter reads: integer and 8-bit float tensors are quantized weights whose scales live
# elsewhere; casting them to float would silently give wrong values.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NUMPY_TO_TORCH = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def _numpy_to_torch(array: np.ndarray, where: str) -> torch.Tensor:
    name = array.dtype.name
    if name not in _NUMPY_TO_TORCH:
        raise ConversionError(f"{where}: unsupported dtype {array.dtype} (expected a float or integer array)")
    if name == "bfloat16":  # ml_dtypes' bfloat16, as JAX writes it
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class TensorSource:
    """Named tensors that are listed cheaply and read one at a time."""

    description = "checkpoint"

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- safetensors
# The dtypes a safetensors header may name; the converter reads only the floating ones (see `FLOAT_DTYPES`).
_SAFETENSORS_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_error(path: Path, error: Exception) -> ConversionError:
    if isinstance(error, OSError):
        return ConversionError(describe_os_error(error, path, "read it"))
    return ConversionError(f"{display(path)}: not a valid safetensors file, it may be truncated or corrupt ({error})")


def open_safetensors(path: Path):
    """`safe_open(path)`, with the file opened by us first: the library reports every failure to open (a permission
    problem too) as "No such file", and takes only UTF-8 file names; a name that is not is passed as
    `/proc/self/fd/N` (Linux), which names the same file in ASCII."""
    fd = os.open(path, os.O_RDONLY)  # raises the real OSError (permission denied, not a file, ...)
    try:
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:
            return safe_open(f"/proc/self/fd/{fd}", framework="pt")
        return safe_open(path, framework="pt")
    finally:
        os.close(fd)


def write_failure_message(error: Exception, path: str | os.PathLike) -> str | None:
    """One line for a failed write inside safetensors or torch.save, which raise their own error types and name the
    OS error only in the text ("... (os error 27)"); None for an error that is not a failed write."""
    text = " ".join(str(error).split())
    match = re.search(r"os error (\d+)", text)
    if match:
        number = int(match.group(1))
        return describe_os_error(OSError(number, os.strerror(number)), path, "save into it")
    if isinstance(error, SafetensorError) or "write" in text.lower():
        return f"{display(path)}: cannot save into it: {text}"
    return None


class _SafetensorsFile:
    """One `.safetensors` file opened with the safetensors library (`safe_open`): the library validates the header
    (dtypes, shapes, offsets that tile the data exactly, file size) and reads one tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = open_safetensors(path)
            self._handle.__enter__()
            self.entries: dict[str, TensorInfo] = {}
            for name in self._handle.keys():
                view = self._handle.get_slice(name)
                label = view.get_dtype()
                self.entries[name] = TensorInfo(tuple(view.get_shape()), _SAFETENSORS_TO_TORCH.get(label), label)
        except (SafetensorError, OSError) as error:
            raise _safetensors_error(path, error) from None

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise _safetensors_error(self.path, error) from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None


class SafetensorsSource(TensorSource):
    """A `.safetensors` file, or shards listed by a `*.safetensors.index.json`."""

    def __init__(self, path: Path):
        self.description = display(path)
        self._files: dict[Path, _SafetensorsFile] = {}
        self._where: dict[str, _SafetensorsFile] = {}
        try:
            self._open(path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> None:
        if path.name.endswith(".index.json"):
            weight_map = _read_index(path)
            for name, shard in weight_map.items():
                shard_path = inside(path.parent, shard, f"{display(path)} (for {name!r})")
                if shard_path not in self._files:
                    if not shard_path.is_file():
                        raise ConversionError(f"{display(path)}: lists {shard!r} (for {name!r}), which does not exist")
                    self._files[shard_path] = _SafetensorsFile(shard_path)
                file = self._files[shard_path]
                if name not in file.entries:
                    raise ConversionError(f"{display(path)}: lists {name!r} in {shard!r}, but that file does not contain it")
                self._where[name] = file
            for file in self._files.values():
                unlisted = sorted(set(file.entries) - set(weight_map))
                if unlisted:
                    raise ConversionError(f"{display(file.path)}: holds tensors the index does not list: {unlisted[:5]}")
        else:
            file = _SafetensorsFile(path)
            self._files[path] = file
            self._where = {name: file for name in file.entries}

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name]

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = read_bounded(path)
    except OSError as error:
        raise ConversionError(describe_os_error(error, path, "read it")) from None
    try:
        weight_map = json.loads(data.decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{path}: not a valid shard index ({error!r})") from None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{path}: `weight_map` must map tensor names to shard files")
    for name, shard in weight_map.items():
        plain_name(shard, f"{display(path)} (for {name!r})")
    return weight_map


# ---------------------------------------------------------------------------------------------------- pickle
class TorchPickleSource(TensorSource):
    """`pytorch_model.bin` (or shards with an index), loaded with `weights_only=True`, memory-mapped when possible."""

    def __init__(self, path: Path):
        self.description = str(path)
        files = sorted(set(_read_index(path).values())) if path.name.endswith(".index.json") else [path.name]
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in self._load(inside(path.parent, file, display(path))).items():
                if name in self._tensors:
                    raise ConversionError(f"{path.parent / file}: {name!r} also appears in another shard")
                self._tensors[name] = tensor

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise ConversionError(f"{path}: file not found")
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as error:  # torch raises many types for a bad file; all mean "cannot read it"
            raise ConversionError(f"{path}: cannot be loaded as a PyTorch state dict ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path}: expected a flat state dict of tensors")
        return state

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(tuple(tensor.shape), tensor.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


# ---------------------------------------------------------------------------------------------------- npz
class NpzSource(TensorSource):
    """A `.npz` archive; shapes come from each member's `.npy` header, arrays are read one at a time."""

    def __init__(self, path: Path):
        self.description = str(path)
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except OSError as error:
            raise ConversionError(describe_os_error(error, path, "read it")) from None
        except zipfile.BadZipFile as error:
            raise ConversionError(f"{display(path)}: not a readable .npz (zip) archive, it may be truncated ({error})") from None
        self._members: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        names = [member[: -len(".npy")] if member.endswith(".npy") else member for member in self._zip.namelist()]
        duplicated = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicated:
            self._zip.close()
            raise ConversionError(
                f"{display(path)}: the archive holds several members named {duplicated[:5]}; which one is the weight "
                "is ambiguous, so the file is refused"
            )
        for member in self._zip.namelist():
            name = member[: -len(".npy")] if member.endswith(".npy") else member
            try:
                with self._zip.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = reader(handle)
                    header_size = handle.tell()
            except (ValueError, zipfile.BadZipFile, OSError, EOFError) as error:
                raise ConversionError(f"{path}: member {member!r} is not a valid .npy array ({error})") from None
            declared = math.prod(shape) * dtype.itemsize
            stored = self._zip.getinfo(member).file_size - header_size
            if declared != stored:
                self._zip.close()
                raise ConversionError(
                    f"{display(path)}: member {member!r} declares shape {list(shape)} {dtype} ({declared} bytes) but "
                    f"stores {stored} bytes; the file is corrupt or crafted, so it is refused before reading"
                )
            if dtype.name not in _NUMPY_TO_TORCH:
                raise ConversionError(
                    f"{path}: {name!r} has dtype {dtype} (bfloat16 arrays saved by numpy lose their type); "
                    "export float32 arrays instead"
                )
            self._members[name] = member
            self._infos[name] = TensorInfo(tuple(shape), _NUMPY_TO_TORCH[dtype.name])

    def names(self) -> list[str]:
        return list(self._members)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str) -> torch.Tensor:
        try:
            with self._zip.open(self._members[name]) as handle:
                array = np.lib.format.read_array(handle, allow_pickle=False)
        except (ValueError, zipfile.BadZipFile, OSError, EOFError) as error:
            raise ConversionError(f"{self.path}: cannot read {name!r}: {error}") from None
        return _numpy_to_torch(array, f"{self.path}: {name!r}")

    def close(self) -> None:
        self._zip.close()


# ---------------------------------------------------------------------------------------------------- tensorstore
def _import_tensorstore():
    try:
        import tensorstore
    except ImportError:
        raise ConversionError(
            "reading a TensorStore/Orbax checkpoint directory needs the `tensorstore` package: "
            "pip install tensorstore, or pip install -e '.[convert]' in this package's clone (or export the weights to "
            "a flat .npz/.safetensors file)"
        ) from None
    return tensorstore


_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def _is_array_dir(path: Path) -> bool:
    return (path / ".zarray").is_file() or (path / "zarr.json").is_file()


def _is_checkpoint_item(path: Path) -> bool:
    return (
        (path / "_METADATA").is_file()
        or (path / "manifest.ocdbt").is_file()
        or any(child.is_dir() and _is_array_dir(child) for child in path.iterdir())
    )


def find_checkpoint_item(path: Path) -> Path:
    """The folder that holds the arrays: `path` itself, or its single item subfolder (`state/`, `items/`, ...)."""
    if not path.is_dir():
        raise ConversionError(f"{path}: expected a TensorStore/Orbax checkpoint directory")
    if any(".orbax-checkpoint-tmp" in part for part in path.resolve().parts):
        raise ConversionError(f"{path}: an unfinished Orbax checkpoint (its save did not complete)")
    if _is_checkpoint_item(path):
        return path
    children = [child for child in sorted(path.iterdir()) if child.is_dir()]
    items = [child for child in children if _is_checkpoint_item(child)]
    if len(items) == 1:
        return items[0]
    steps = [child.name for child in children if re.fullmatch(r"(checkpoint_)?\d+", child.name)]  # Orbax / Pax steps
    if steps:
        raise ConversionError(
            f"{path}: holds several checkpoint steps {steps[:10]}; pass one step directory, e.g. {path / steps[-1]}"
        )
    if len(items) > 1:
        raise ConversionError(f"{path}: holds several checkpoint items {[i.name for i in items]}; pass the one with the weights")
    raise ConversionError(
        f"{path}: not a TensorStore/Orbax checkpoint (no _METADATA, manifest.ocdbt or zarr array folders found)"
    )


class TensorStoreSource(TensorSource):
    """An Orbax/TensorStore checkpoint directory (zarr arrays, one folder per array or in an OCDBT database).

    Array names are the tree paths joined by "." (as Orbax names the array folders); with a `_METADATA` file the
    names are read from the checkpoint's own tree metadata.
    """

    def __init__(self, path: Path):
        # Absolute and resolved: TensorStore resolves a relative OCDBT base against nothing useful.
        self.root = find_checkpoint_item(path).resolve()
        check_tree(self.root)  # every chunk file is read by TensorStore itself: links must stay inside
        self._ts = _import_tensorstore()
        self.description = str(self.root)
        metadata = self._read_metadata()
        self.ocdbt = metadata.get("use_ocdbt", (self.root / "manifest.ocdbt").is_file())
        self._chunk_counts: Counter = Counter()  # array path -> chunk files stored
        listed = self._list_arrays()  # name -> (path inside the checkpoint, metadata file)
        self.zarr3 = metadata.get("use_zarr3", any(leaf == "zarr.json" for _, leaf in listed.values()))
        self._paths = {name: path for name, (path, _) in listed.items()}
        if "tree_metadata" in metadata:
            self._names = []
            for entry in metadata["tree_metadata"].values():
                if entry.get("value_metadata", {}).get("skip_deserialize"):
                    continue
                self._names.append(".".join(str(key["key"]) for key in entry["key_metadata"]))
            missing = [name for name in self._names if name not in listed]
            if missing:
                raise ConversionError(f"{self.root}: _METADATA lists arrays that are not on disk: {missing[:5]}")
        else:
            self._names = sorted(listed)
        self._stores: dict[str, object] = {}

    def _read_metadata(self) -> dict:
        file = self.root / "_METADATA"
        if not file.is_file():
            return {}
        try:
            return json.loads(read_bounded(file))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"{file}: corrupt checkpoint metadata ({error})") from None

    def _list_arrays(self) -> dict[str, tuple[str, str]]:
        found = {}
        if self.ocdbt:
            try:
                keys = self._ts.KvStore.open(self._kvstore_spec("")).result().list().result()
            except Exception as error:  # tensorstore raises ValueError for unreadable databases
                raise ConversionError(f"{self.root}: unreadable OCDBT checkpoint ({error})") from None
            keys = [key.decode() for key in keys]
        else:
            keys = [
                str(Path(dirpath, name).relative_to(self.root))
                for dirpath, _, filenames in os.walk(self.root) for name in filenames
            ]
        for key in keys:
            path, _, leaf = key.rpartition("/")
            if leaf in (".zarray", "zarr.json"):
                found[path.replace("/", ".")] = (path, leaf)
        arrays = {path for path, _ in found.values()}
        for key in keys:
            if key.rpartition("/")[2] in _ZARR_METADATA:
                continue
            parent = key.rpartition("/")[0]
            while parent and parent not in arrays:  # chunk keys may be nested ("c/0/1", "0/1")
                parent = parent.rpartition("/")[0]
            if parent:
                self._chunk_counts[parent] += 1
        return found

    def _kvstore_spec(self, path: str) -> dict:
        # JSON specs with a "path", never "file://" URLs: a URL misreads '#', '%' and spaces in folder names.
        if self.ocdbt:
            return {"driver": "ocdbt", "base": {"driver": "file", "path": f"{self.root}/"}, "path": f"{path}/" if path else ""}
        return {"driver": "file", "path": f"{self.root / path}/"}

    def _store(self, name: str):
        if name not in self._stores:
            spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": self._kvstore_spec(self._paths[name]),
                    "fill_missing_data_reads": False}  # a missing chunk is an error, never zeros
            try:
                self._stores[name] = self._ts.open(spec, open=True, read=True).result()
            except Exception as error:
                raise ConversionError(f"{self.root}: cannot open array {name!r} ({error})") from None
        return self._stores[name]

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        store = self._store(name)
        dtype = store.dtype.numpy_dtype
        if dtype.name not in _NUMPY_TO_TORCH:
            raise ConversionError(f"{self.root}: array {name!r} has unsupported dtype {dtype}")
        return TensorInfo(tuple(int(d) for d in store.shape), _NUMPY_TO_TORCH[dtype.name])

    def read(self, name: str) -> torch.Tensor:
        store = self._store(name)
        chunk_shape = store.chunk_layout.write_chunk.shape  # one stored file per write chunk (a shard, if sharded)
        expected = math.prod(-(-int(size) // int(chunk)) for size, chunk in zip(store.shape, chunk_shape))
        stored = self._chunk_counts[self._paths[name]]
        if stored != expected:  # before the read allocates the declared shape
            raise ConversionError(
                f"{self.root}: array {name!r} declares shape {[int(d) for d in store.shape]} in {expected} chunks of "
                f"{[int(c) for c in chunk_shape]}, but {stored} chunk files are stored; the checkpoint is incomplete "
                "or crafted (missing chunks are not read as fill values)"
            )
        try:
            array = store.read().result()
        except Exception as error:
            raise ConversionError(f"{self.root}: cannot read array {name!r}, the checkpoint may be incomplete ({error})") from None
        return _numpy_to_torch(array, f"{self.root}: {name!r}")


# ---------------------------------------------------------------------------------------------------- naming
class RenamedSource(TensorSource):
    """A view of `source` under canonical names; `canonical(raw)` returns None for arrays outside the model
    (optimizer state, step counters), which are listed in `foreign` instead."""

    def __init__(self, source: TensorSource, canonical: Callable[[str], str | None]):
        self.source = source
        self.description = source.description
        self._raw: dict[str, str] = {}
        self.foreign: list[str] = []
        for raw in source.names():
            name = canonical(raw)
            if name is None:
                self.foreign.append(raw)
            elif name in self._raw:
                raise ConversionError(f"{source.description}: {self._raw[name]!r} and {raw!r} both name {name!r}")
            else:
                self._raw[name] = raw

    def names(self) -> list[str]:
        return list(self._raw)

    def info(self, name: str) -> TensorInfo:
        return self.source.info(self._raw[name])

    def read(self, name: str) -> torch.Tensor:
        return self.source.read(self._raw[name])

    def close(self) -> None:
        self.source.close()


def open_weights(path: Path, allow_pickle: bool) -> TensorSource:
    """Open the weights of a transformers-style folder (or a single weights file)."""
    if path.is_file():
        if path.name.endswith((".safetensors", ".safetensors.index.json")):
            return SafetensorsSource(path)
        if path.name.endswith((".bin", ".pt", ".pth", ".bin.index.json")):
            if not allow_pickle:
                raise ConversionError(f"{path} is a pickle; pass --allow-pickle to load it (with weights_only=True)")
            return TorchPickleSource(path)
        raise ConversionError(f"{path}: unknown weights file type (expected .safetensors or, with --allow-pickle, .bin)")
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    for candidate in ("model.safetensors.index.json", "model.safetensors"):
        if inside(path, candidate).is_file():
            return SafetensorsSource(path / candidate)
    for candidate in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        if inside(path, candidate).is_file():
            if not allow_pickle:
                raise ConversionError(
                    f"{path} only has {candidate} (a pickle); pass --allow-pickle to load it (with weights_only=True)"
                )
            return TorchPickleSource(path / candidate)
    raise ConversionError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def open_flat_or_directory(path: Path) -> TensorSource:
    """A flat `.npz` / `.safetensors` file of named arrays, or a TensorStore/Orbax directory."""
    if path.is_dir():
        return TensorStoreSource(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file or directory")
    if path.suffix == ".npz":
        return NpzSource(path)
    if path.name.endswith((".safetensors", ".safetensors.index.json")):
        return SafetensorsSource(path)
    raise ConversionError(f"{path}: expected a .npz or .safetensors file, or a TensorStore/Orbax directory")


# ---------------------------------------------------------------------------------------------------- writer
class ShardedSafetensorsWriter:
    """Writes tensors, in a fixed order, into safetensors shards whose layout is decided before the first byte.

    `layout` lists `(name, shape, dtype)` in write order; a shard closes when the next tensor would push it past
    `max_shard_bytes` (a single larger tensor gets a shard of its own). One shard is named `model.safetensors`;
    several are `model-0000k-of-0000n.safetensors` with a `model.safetensors.index.json`, as transformers writes.
    """

    def __init__(self, directory: Path, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.directory = directory
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            shard_bytes += nbytes
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        self._queue = [(file, entries) for file, entries in zip(self.files, shards)]
        self._order = [(name, shape, dtype) for entries in shards for name, shape, dtype, _ in entries]
        self._position = 0
        self._handle = None
        self._remaining: list = []
        self.total_bytes = sum(nbytes for entries in shards for *_, nbytes in entries)
        self.weight_map = {name: file for file, entries in self._queue for name, *_ in entries}

    def _open_next_shard(self) -> None:
        file, entries = self._queue.pop(0)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in entries:
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._path = self.directory / file
        try:
            self._handle = open(self._path, "wb")
            self._handle.write(len(encoded).to_bytes(8, "little") + encoded)
        except OSError as error:
            raise reraise_with_path(error, self._path) from None
        self._remaining = list(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self._order[self._position]
        if name != expected_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {expected_name} {list(shape)} {dtype}, got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if self._handle is None:
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            self._handle.write(memoryview(data.numpy()))
            self._remaining.pop(0)
            self._position += 1
            if not self._remaining:  # the shard is complete: flush it to disk before the next one
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None
        except OSError as error:
            raise reraise_with_path(error, self._path) from None

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:  # the write that failed already raised; a second error while closing adds nothing
                pass
            self._handle = None

    def finish(self) -> None:
        if self._position != len(self._order):
            raise RuntimeError(f"writer got {self._position} of {len(self._order)} tensors")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            path = self.directory / "model.safetensors.index.json"
            try:
                path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            except OSError as error:
                raise reraise_with_path(error, path) from None


# ---------------------------------------------------------------------------------------------------- completeness
_OUR_MODEL_TYPES = ("muddpythia", "muddformer", "muddvit")


def missing_weights(folder: str | os.PathLike) -> list[str] | None:
    """The parameters and persistent buffers a saved MUDD model folder needs but its safetensors weights lack
    (tied weights excepted), read from the file headers and a model built on the meta device: nothing is loaded.
    None when the folder is not one of our model types or its weights are not safetensors (not checked here)."""
    folder = Path(folder)
    try:
        config_data = json.loads((folder / "config.json").read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if config_data.get("model_type") not in _OUR_MODEL_TYPES:
        return None
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        saved = set(_read_index(index))
    elif single.is_file():
        try:
            with open_safetensors(single) as handle:
                saved = set(handle.keys())
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{display(single)}: cannot read it ({error})") from None
    else:
        return None
    import modeling_muddpythia  # noqa: F401  (registers our classes)
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = AutoModelForImageClassification if config.model_type == "muddvit" else AutoModelForCausalLM
    architectures = config_data.get("architectures") or []
    if architectures:  # the saved class: a head (causal LM, classifier, QA) has its Auto class, the bare model not
        head = re.search(r"For[A-Z]\w*$", architectures[0])  # `ForCausalLM`, ...; not the "For" of "MUDDFormer"
        auto = getattr(transformers, f"AutoModel{head.group()}", AutoModel) if head else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected -= set(getattr(model, "_tied_weights_keys", None) or {})
    return sorted(expected - saved)
