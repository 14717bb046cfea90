"""Read a trace set: a JSON manifest plus one memory-mapped safetensors file per sequence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvp_gym.models.spec import ModelSpec

MANIFEST = "manifest.json"
FORMAT = "kvp-gym-traces"
FORMAT_VERSION = 1


class TraceError(ValueError):
    """A trace set or trace file is missing, corrupt, or does not match its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load and sanity-check ``directory/manifest.json``."""
    path = directory / MANIFEST
    if not path.exists():
        raise TraceError(f"no trace set at {directory}: {path} does not exist (run `kvp-gym traces generate`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TraceError(f"corrupt manifest {path}: {error}") from error
    if manifest.get("format") != FORMAT:
        raise TraceError(f"{path} is not a kvp-gym trace manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


class Trace:
    """One sequence of a trace set. Layer tensors are read on demand from the memory-mapped file.

    tokens [T] (long); loss [T] and entropy [T] (fp32, full-cache model; index 0 is 0);
    q(layer) [Hq, T, d], k(layer) [Hkv, T, d], v(layer) [Hkv, T, d] (fp32 views of fp16 storage).
    """

    def __init__(self, path: Path, record: dict[str, Any], spec: ModelSpec, index: int) -> None:
        self.path = path
        self.index = index
        self.spec = spec
        self.length: int = record["length"]
        self.meta: dict[str, Any] = record.get("meta", {})
        self._record = record
        if not path.exists():
            raise TraceError(f"trace file {path} listed in the manifest is missing")
        if path.stat().st_size != record["bytes"]:
            raise TraceError(
                f"trace file {path} has {path.stat().st_size} bytes, the manifest says {record['bytes']} (corrupt?)"
            )
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise TraceError(f"corrupt trace file {path}: {error}") from error

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except Exception as error:
            raise TraceError(f"trace file {self.path} has no readable tensor {name!r}: {error}") from error

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.spec.num_layers}) for {self.path}")

    @property
    def tokens(self) -> torch.Tensor:
        return self._tensor("tokens")

    @property
    def loss(self) -> torch.Tensor:
        return self._tensor("loss")

    @property
    def entropy(self) -> torch.Tensor:
        return self._tensor("entropy")

    def q(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._tensor(f"q.{layer}").float()

    def k(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._tensor(f"k.{layer}").float()

    def v(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._tensor(f"v.{layer}").float()

    def verify(self) -> None:
        """Compare the file's sha256 with the manifest's."""
        actual = sha256_of(self.path)
        if actual != self._record["sha256"]:
            raise TraceError(f"checksum mismatch for {self.path}: the file was modified or is corrupt")

    def __repr__(self) -> str:
        return f"Trace({self.path.name}, T={self.length}, source={self.meta.get('source')!r})"


class TraceDataset:
    """A trace set on disk. ``len(ds)``, ``ds.manifest``, ``ds.spec`` and ``ds[i] -> Trace``.

    Opening is cheap: files are memory-mapped and tensors read per layer when asked for.
    ``verify=True`` checks every file's sha256 against the manifest up front.
    """

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        self.spec = ModelSpec.from_dict(self.manifest["model"])
        self.records: list[dict[str, Any]] = self.manifest["sequences"]
        if not self.records:
            raise TraceError(f"trace set {self.directory} holds no finished sequence")
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
            self._open[index] = Trace(self.directory / record["file"], record, self.spec, index)
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
