"""Scorer checkpoints: one safetensors file holding the weights and a JSON header.

A checkpoint is rebuilt by name through the scorer registry, so it works for any registered scorer:
a trained agent (``agents.mlp_scorer.PerHeadMLPScorer``, registry name ``"mlp"``) or a heuristic (no
weights, only its config). The JSON header is stored in the safetensors metadata under the key
``"kvp_gym"``:

    format, format_version   "kvp-gym-scorer", 1
    registry_name, config    kvp_gym.scorers.get(registry_name, **config) rebuilds the scorer
    model                    the ModelSpec the scorer was made for (load_scorer refuses other shapes)
    protected                the always-kept tokens it was trained with, e.g. {"sink": 4, "recent": 16}
    env                      the env id it was trained on (e.g. "KVEvict-v0"), or null
    training                 the training run's settings (agent, steps, seed, ...)
    versions, created        package versions and a UTC timestamp

``save_scorer(..., path)`` writes ``path`` itself when it ends in ``.safetensors``, else
``path/scorer.safetensors``; ``load_scorer`` and ``read_header`` accept either form. Writes are atomic.

``save_state(path, tree)`` / ``load_state(path)`` store any nest of dicts, lists and tuples of tensors
and JSON scalars (an optimizer's or an SB3 model's state dict, a training step) the same way: tensors
in safetensors, the structure as JSON in its metadata. Nothing is ever unpickled, so a planted file
can at worst fail to load; it can never run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvp_gym import scorers
from kvp_gym.models.spec import ModelSpec

FORMAT = "kvp-gym-scorer"
FORMAT_VERSION = 1
METADATA_KEY = "kvp_gym"
FILE_NAME = "scorer.safetensors"


class CheckpointError(ValueError):
    """A scorer checkpoint is missing, corrupt, or made for another model."""


@dataclasses.dataclass(frozen=True)
class CheckpointHeader:
    """The JSON header of a scorer checkpoint (see the module docstring)."""

    registry_name: str
    config: dict[str, Any]
    model_spec: ModelSpec
    protected: dict[str, int]
    env: str | None
    training: dict[str, Any]
    versions: dict[str, str]
    created: str


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file of a checkpoint given as a file or as a run directory."""
    path = Path(path).expanduser()
    return path if path.suffix == ".safetensors" else path / FILE_NAME


def save_scorer(
    scorer: Any,
    path: str | Path,
    *,
    registry_name: str,
    config: dict[str, Any],
    model_spec: ModelSpec,
    protected: dict[str, int],
    training: dict[str, Any],
    env: str | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``scorer`` (an ``nn.Module`` with weights, or a weightless heuristic) and its header; returns the file.

    ``config`` must rebuild the scorer: ``kvp_gym.scorers.get(registry_name, **config)``. If the config
    names the model's shapes (num_layers / num_kv_heads / head_dim) they must agree with ``model_spec``.
    ``weights_dtype`` stores the floating-point weights in that dtype (e.g. torch.float16, half the size,
    to ship); ``load_scorer`` casts them back to the module's own dtype.
    """
    from kvp_gym.io import package_versions, write_atomic

    for key, spec_key in (("num_layers", "num_layers"), ("num_kv_heads", "num_kv_heads"), ("head_dim", "head_dim")):
        if key in config and config[key] != getattr(model_spec, spec_key):
            raise CheckpointError(
                f"scorer config has {key}={config[key]} but the model {model_spec.name!r} has {getattr(model_spec, spec_key)}"
            )
    if not set(protected) <= {"sink", "recent"} or not all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in protected.values()
    ):
        raise CheckpointError(f"protected must map 'sink' / 'recent' to non-negative ints, got {protected}")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "registry_name": registry_name,
        "config": config,
        "model": model_spec.to_dict(),
        "protected": protected,
        "env": env,
        "training": training,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        encoded = json.dumps(header)
    except TypeError as error:
        raise CheckpointError(f"checkpoint header must be JSON-serialisable: {error}") from error
    tensors = {}
    if isinstance(scorer, torch.nn.Module):
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in scorer.state_dict().items()}
        if weights_dtype is not None:
            tensors = {name: tensor.to(weights_dtype) if tensor.is_floating_point() else tensor
                       for name, tensor in tensors.items()}
    file = checkpoint_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: encoded}))
    return file


def _read(file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not file.exists():
        raise CheckpointError(f"no scorer checkpoint at {file}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"corrupt scorer checkpoint {file}: {error}") from error
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} has no kvp-gym scorer header (not a scorer checkpoint?)") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has no kvp-gym scorer header (not a scorer checkpoint?)")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format {header.get('format')!r} v{header.get('format_version')}, expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    _check_header(header, file)
    try:
        ModelSpec.from_dict(header["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: header field 'model' is not a model spec ({error})") from None
    return header, tensors


def _check_header(data: dict[str, Any], file: Path) -> None:
    """Every header field has the type it must have (a hand-edited header fails here, naming the field)."""
    kinds = {"registry_name": str, "config": dict, "model": dict, "training": dict, "versions": dict,
             "created": str}
    for field, kind in kinds.items():
        if not isinstance(data.get(field), kind):
            raise CheckpointError(f"{file}: header field {field!r} must be a {kind.__name__}, got {data.get(field)!r}")
    protected = data.get("protected")
    if not isinstance(protected, dict) or not set(protected) <= {"sink", "recent"} or not all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in protected.values()
    ):
        raise CheckpointError(
            f"{file}: header field 'protected' must map 'sink' / 'recent' to non-negative ints, got {protected!r}"
        )
    if data.get("env") is not None and not isinstance(data["env"], str):
        raise CheckpointError(f"{file}: header field 'env' must be an env id or null, got {data['env']!r}")


def _header(data: dict[str, Any]) -> CheckpointHeader:
    return CheckpointHeader(
        registry_name=data["registry_name"],
        config=data["config"],
        model_spec=ModelSpec.from_dict(data["model"]),
        protected=data["protected"],
        env=data.get("env"),
        training=data["training"],
        versions=data["versions"],
        created=data["created"],
    )


def read_header(path: str | Path) -> CheckpointHeader:
    """The header of the checkpoint at ``path`` (a file or a run directory), without building the scorer."""
    return _header(_read(checkpoint_file(path))[0])


def load_scorer(path: str | Path, expect_spec: ModelSpec | None = None) -> Any:
    """Rebuild the scorer saved at ``path`` (file or run directory) and load its weights (eval mode, CPU).

    With ``expect_spec``, a checkpoint made for another model's shapes is refused with a clear error.
    """
    file = checkpoint_file(path)
    data, tensors = _read(file)
    header = _header(data)
    if expect_spec is not None:
        expect_spec.check_compatible(header.model_spec, f"scorer checkpoint {file}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"scorer checkpoint {file} holds non-finite values in {name!r}")
    try:
        scorer = scorers.get(header.registry_name, **header.config)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"cannot rebuild scorer {header.registry_name!r} of {file}: {error}") from error
    if isinstance(scorer, torch.nn.Module):
        try:
            scorer.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"weights of {file} do not fit scorer {header.registry_name!r}: {error}") from error
        scorer.eval()
    elif tensors:
        raise CheckpointError(f"{file} holds weights but scorer {header.registry_name!r} takes none")
    return scorer


# ----------------------------------------------------------------------------- training state (no pickle)

STATE_FORMAT = "kvp-gym-state"
STATE_SCALARS = (bool, int, float, str, type(None))


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """A nest of containers, tensors and scalars -> JSON; tensors are moved to ``tensors``."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) and not isinstance(key, bool) for key in value):
            raise CheckpointError(f"state {where}: dict keys must be str or int, got {list(value)[:5]}")
        return {"dict": [[key, _encode(item, tensors, f"{where}.{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, STATE_SCALARS):
        return {"value": value}
    raise CheckpointError(f"state {where}: cannot store a {type(value).__name__} (tensors, containers and scalars only)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"corrupt training state {file}: malformed structure")
    (kind, body), = node.items()
    if kind == "tensor" and body in tensors:
        return tensors[body]
    if kind == "dict" and isinstance(body, list):
        return {key: _decode(item, tensors, file) for key, item in body}
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode(item, tensors, file) for item in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if kind == "value" and isinstance(body, STATE_SCALARS):
        return body
    raise CheckpointError(f"corrupt training state {file}: unknown entry {kind!r}")


def save_state(path: str | Path, tree: Any) -> Path:
    """Write ``tree`` (dicts / lists / tuples of tensors and JSON scalars) atomically as safetensors + JSON."""
    from kvp_gym.io import write_atomic

    file = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps({"format": STATE_FORMAT, "tree": _encode(tree, tensors, "")})
    write_atomic(file, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: structure}))
    return file


def load_state(path: str | Path) -> Any:
    """Read what ``save_state`` wrote; anything else is refused with a CheckpointError (never unpickled)."""
    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        data = json.loads(metadata[METADATA_KEY])
    except Exception as error:  # safetensors' own errors, a missing key, bad JSON
        raise CheckpointError(
            f"corrupt training state {file} ({type(error).__name__}: {error}); delete it to restart the run"
        ) from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file} is not a kvp-gym training state; delete it to restart the run")
    return _decode(data.get("tree"), tensors, file)
