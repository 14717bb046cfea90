"""Read a trace set: a JSON manifest plus one memory-mapped safetensors file per sequence.

Every file is checked once per process, when it is first opened: its size and sha256 against the
manifest, its tensor names and shapes against the manifest's model, and each float tensor for
NaN/inf when it is first read. A damaged file fails with a ``TraceError`` naming it and saying how
to regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvp_gym.data import SOURCES
from kvp_gym.models import DEFAULT_MODEL, ModelSpec

MANIFEST = "manifest.json"
FORMAT = "kvp-gym-traces"
FORMAT_VERSION = 1
GENERATE_PARAMS = ("source", "n", "length", "split", "seed", "model")
SPEC_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "num_layers": int, "num_heads": int, "num_kv_heads": int, "head_dim": int, "rope_theta": (int, float),
}
RECORD_FIELD_TYPES: dict[str, type] = {"file": str, "length": int, "bytes": int, "sha256": str}
PER_TOKEN_TENSORS = ("tokens", "loss", "entropy")

_verified_files: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) checked in this process


class TraceError(ValueError):
    """A trace set or trace file is missing, corrupt, or does not match its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def written_file_sha256(path: Path) -> str:
    """The sha256 of a file this process has just written, remembered as checked: opening it later in this
    process (a recipe training on the traces it made) does not read it all again while its size and mtime hold."""
    digest, stat = sha256_of(path), path.stat()
    _verified_files.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest))
    return digest


def generate_command(directory: Path, params: Any) -> str | None:
    """The `kvp-gym traces generate` command that made (and resumes) the set, or None if params cannot say."""
    if not isinstance(params, dict) or params.get("source") not in SOURCES:
        return None
    if any(key not in params for key in GENERATE_PARAMS):
        return None
    options = [f"--{key} {shlex.quote(str(params[key]))}" for key in GENERATE_PARAMS if key != "model"]
    if params["model"] != DEFAULT_MODEL:
        options.append(f"--model {shlex.quote(str(params['model']))}")
    return f"kvp-gym traces generate {' '.join(options)} --out {shlex.quote(str(directory))}"


def repair_hint(directory: Path, params: Any) -> str:
    """How to regenerate a damaged file: generation redoes every file that is missing or fails its checksum."""
    command = generate_command(directory, params)
    rerun = f"`{command}`" if command else f"the command that generated {directory}"
    return f"delete it and rerun {rerun} to regenerate it"


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load ``directory/manifest.json`` and check its fields (format, model shapes, sequence records)."""
    path = directory / MANIFEST
    if not path.exists():
        raise TraceError(f"no trace set at {directory}: {path} does not exist (run `kvp-gym traces generate`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TraceError(f"corrupt manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        format_name = manifest.get("format") if isinstance(manifest, dict) else None
        raise TraceError(f"{path} is not a kvp-gym trace manifest (format={format_name!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    _check_fields(path, manifest.get("model"), "model", SPEC_FIELD_TYPES)
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if manifest["model"][field] < 1:
            raise TraceError(f"{path}: manifest field 'model.{field}' must be >= 1, got {manifest['model'][field]}")
    sequences = manifest.get("sequences")
    if not isinstance(sequences, list):
        raise TraceError(f"{path}: manifest field 'sequences' must be a list, got {type(sequences).__name__}")
    for index, record in enumerate(sequences):
        _check_fields(path, record, f"sequences[{index}]", RECORD_FIELD_TYPES)
    return manifest


def _check_fields(path: Path, value: Any, name: str, types: dict[str, type | tuple[type, ...]]) -> None:
    if not isinstance(value, dict):
        raise TraceError(f"{path}: manifest field {name!r} is missing or not an object")
    for field, kind in types.items():
        if field not in value:
            raise TraceError(f"{path}: manifest field '{name}.{field}' is missing")
        if not isinstance(value[field], kind) or isinstance(value[field], bool):
            raise TraceError(f"{path}: manifest field '{name}.{field}' has the wrong type: {value[field]!r}")


def expected_shapes(spec: ModelSpec, length: int) -> dict[str, tuple[int, ...]]:
    """The tensors a trace file of ``length`` tokens holds for a model of ``spec``, with their shapes."""
    shapes: dict[str, tuple[int, ...]] = {name: (length,) for name in PER_TOKEN_TENSORS}
    for layer in range(spec.num_layers):
        shapes[f"q.{layer}"] = (spec.num_heads, length, spec.head_dim)
        shapes[f"k.{layer}"] = (spec.num_kv_heads, length, spec.head_dim)
        shapes[f"v.{layer}"] = (spec.num_kv_heads, length, spec.head_dim)
    return shapes


class Trace:
    """One sequence of a trace set. Layer tensors are read on demand from the memory-mapped file.

    tokens [T] (long); loss [T] and entropy [T] (fp32, full-cache model; index 0 is 0);
    q(layer) [Hq, T, d], k(layer) [Hkv, T, d], v(layer) [Hkv, T, d] (fp32 views of fp16 storage).
    Opening checks the file's size, sha256 (once per process) and tensor shapes against the manifest.
    """

    def __init__(self, path: Path, record: dict[str, Any], spec: ModelSpec, index: int, repair: str) -> None:
        self.path = path
        self.index = index
        self.spec = spec
        self.length: int = record["length"]
        self.meta: dict[str, Any] = record.get("meta", {})
        self._record = record
        self._repair = repair
        self._finite: set[str] = set()
        self._check_size()
        self.verify(force=False)
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise TraceError(f"corrupt trace file {path}: {error}; {repair}") from error
        self._check_shapes()

    def _check_size(self) -> None:
        if not self.path.exists():
            raise TraceError(f"trace file {self.path} listed in the manifest is missing; {self._repair}")
        size = self.path.stat().st_size
        if size != self._record["bytes"]:
            raise TraceError(
                f"corrupt trace file {self.path}: {size} bytes, the manifest says {self._record['bytes']}; {self._repair}"
            )

    def _check_shapes(self) -> None:
        """The file must hold exactly the tensors the manifest's model implies, with their shapes."""
        expected = expected_shapes(self.spec, self.length)
        found = set(self._file.keys())
        layers = sum(name.startswith("k.") for name in found)
        if layers != self.spec.num_layers:
            raise TraceError(
                f"manifest field 'model.num_layers' is {self.spec.num_layers} but trace file {self.path} "
                f"holds {layers} layers"
            )
        if found != set(expected):
            missing, unexpected = sorted(set(expected) - found)[:4], sorted(found - set(expected))[:4]
            raise TraceError(
                f"trace file {self.path} does not hold the tensors of a trace (missing {missing}, unexpected {unexpected}); "
                f"{self._repair}"
            )
        for name, shape in expected.items():
            actual = tuple(self._file.get_slice(name).get_shape())
            if actual != shape:
                raise TraceError(self._shape_mismatch(name, actual, shape))

    def _shape_mismatch(self, name: str, actual: tuple[int, ...], shape: tuple[int, ...]) -> str:
        """The error for tensor ``name`` of shape ``actual`` where the manifest implies ``shape``, naming the field."""
        if len(actual) != len(shape):
            return f"trace file {self.path}: tensor {name!r} has shape {list(actual)}, expected {list(shape)}; {self._repair}"
        dim = next(i for i, (got, want) in enumerate(zip(actual, shape, strict=True)) if got != want)
        if name in PER_TOKEN_TENSORS or dim == 1:
            field = f"sequences[{self.index}].length"
        elif dim == 2:
            field = "model.head_dim"
        else:
            field = "model.num_heads" if name.startswith("q.") else "model.num_kv_heads"
        return f"manifest field {field!r} is {shape[dim]} but tensor {name!r} of trace file {self.path} has shape {list(actual)}"

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except Exception as error:
            raise TraceError(f"trace file {self.path} has no readable tensor {name!r}: {error}") from error

    def _float_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as fp32, checked for NaN/inf the first time it is read."""
        tensor = self._tensor(name).float()
        if name not in self._finite:
            # a sum of finite fp16 values cannot overflow fp32, so it is finite iff every value is (and cheap)
            if not bool(tensor.sum().isfinite()):
                raise TraceError(f"corrupt trace file {self.path}: tensor {name!r} holds NaN or inf; {self._repair}")
            self._finite.add(name)
        return tensor

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.spec.num_layers}) for {self.path}")

    @property
    def tokens(self) -> torch.Tensor:
        return self._tensor("tokens")

    @property
    def loss(self) -> torch.Tensor:
        return self._float_tensor("loss")

    @property
    def entropy(self) -> torch.Tensor:
        return self._float_tensor("entropy")

    def q(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._float_tensor(f"q.{layer}")

    def k(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._float_tensor(f"k.{layer}")

    def v(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._float_tensor(f"v.{layer}")

    def verify(self, force: bool = True) -> None:
        """Compare the file's sha256 with the manifest's (``force=False``: skip if this process already did)."""
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_size, stat.st_mtime_ns, self._record["sha256"])
        if not force and key in _verified_files:
            return
        if sha256_of(self.path) != self._record["sha256"]:
            raise TraceError(
                f"checksum mismatch for {self.path}: the file was modified or is corrupt; {self._repair}"
            )
        _verified_files.add(key)

    def __repr__(self) -> str:
        return f"Trace({self.path.name}, T={self.length}, source={self.meta.get('source')!r})"


class TraceDataset:
    """A trace set on disk. ``len(ds)``, ``ds.manifest``, ``ds.spec`` and ``ds[i] -> Trace``.

    Opening the set reads and checks the manifest; ``ds[i]`` opens (memory-maps) and checks a file the
    first time it is asked for. ``verify=True`` opens every file up front and recomputes every sha256.
    """

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        self.spec = ModelSpec.from_dict(self.manifest["model"])
        self.records: list[dict[str, Any]] = self.manifest["sequences"]
        if not self.records:
            raise TraceError(f"trace set {self.directory} holds no finished sequence")
        self._repair = repair_hint(self.directory, self.manifest.get("params"))
        self._open: dict[int, Trace] = {}
        if verify:
            for index in range(len(self)):
                self[index].verify()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Trace:
        if not -len(self) <= index < len(self):
            raise IndexError(f"trace index {index} out of range for {len(self)} traces in {self.directory}")
        index %= len(self)
        if index not in self._open:
            record = self.records[index]
            self._open[index] = Trace(self.directory / record["file"], record, self.spec, index, self._repair)
        return self._open[index]

    @property
    def lengths(self) -> list[int]:
        return [record["length"] for record in self.records]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_bytes(self) -> int:
        return sum(record["bytes"] for record in self.records)

    def __repr__(self) -> str:
        return f"TraceDataset({self.directory}, {len(self)} traces, {self.num_tokens} tokens, model={self.spec.name})"
