"""What every kvp-gym env shares about episodes: trace sets, argument checks, episode sampling and
the observation layout. (The per-layer tensors live in ``layer_cache``, the env wrappers in ``core``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from kvp_gym.models.spec import ModelSpec
from kvp_gym.traces.dataset import Trace, TraceDataset
from kvp_gym.utility.importance import AGGREGATIONS

FP16_MAX = 65504.0  # traces store q/k/v in fp16, which bounds every entry
MAX_TOKENS = 16384  # the largest padded observation size N (max_tokens) an env accepts


# ----------------------------------------------------------------------------- trace sets


class TraceSource:
    """The traces an env samples from: every sequence of one or more trace sets, flattened.

    ``traces``: a directory, a TraceDataset (or any object with ``spec``, ``len`` and ``[i]``), or a
    list of those; None = the default trace set (generated once into $KVP_GYM_HOME).
    ``model``: a model name or ModelSpec the traces must come from (None = any).
    """

    def __init__(self, traces: Any = None, model: str | ModelSpec | None = None) -> None:
        sets = _open_trace_sets(traces)
        self.sets = sets  # kept alive: the key below may hold their ids
        self.spec: ModelSpec = sets[0].spec
        for trace_set in sets:
            _check_model(trace_set, self.spec, model)
        self.traces: list[Trace] = [trace_set[i] for trace_set in sets for i in range(len(trace_set))]
        self.lengths = np.array([trace.length for trace in self.traces])
        self.key = tuple(_identity(trace_set) for trace_set in sets)

    def __len__(self) -> int:
        return len(self.traces)


def _open_trace_sets(traces: Any) -> list[Any]:
    if traces is None:
        from kvp_gym.envs.default_traces import default_traces

        traces = default_traces()
    single = isinstance(traces, (str, Path)) or _is_trace_set(traces)
    items = [traces] if single else list(traces)
    if not items:
        raise ValueError("traces: got an empty list; give a trace directory, a TraceDataset, or a list of them")
    sets = []
    for item in items:
        if isinstance(item, (str, Path)):
            sets.append(TraceDataset(item))
        elif _is_trace_set(item):
            sets.append(item)
        else:
            raise ValueError(f"traces: expected a directory or a TraceDataset, got {type(item).__name__}")
    return sets


def _is_trace_set(item: Any) -> bool:
    return hasattr(item, "spec") and hasattr(item, "__getitem__") and hasattr(item, "__len__")


def _check_model(trace_set: Any, first: ModelSpec, model: str | ModelSpec | None) -> None:
    where = getattr(trace_set, "directory", trace_set)
    try:
        first.check_compatible(trace_set.spec, f"trace set {where}")
    except ValueError as error:
        raise ValueError(f"traces: the trace sets come from different models: {error}") from None
    if model is None:
        return
    name = model.name if isinstance(model, ModelSpec) else model
    if trace_set.spec.name != name:
        raise ValueError(f"model={name!r}: trace set {where} was made with model {trace_set.spec.name!r}")
    if isinstance(model, ModelSpec):
        try:
            model.check_compatible(trace_set.spec, f"trace set {where}")
        except ValueError as error:
            raise ValueError(f"model: {error}") from None


def _identity(trace_set: Any) -> Any:
    """What makes two trace sets the same for cache sharing: the directory and its manifest, or the object."""
    manifest = getattr(trace_set, "manifest", None)
    if manifest is None:
        return id(trace_set)
    return str(Path(trace_set.directory).resolve()), manifest.get("created"), len(trace_set)


# ----------------------------------------------------------------------------- argument checks


def is_int(value: Any) -> bool:
    """A Python or numpy integer; bool is not an int here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, low: int, high: int | None = None, none_ok: bool = False) -> None:
    """``value`` must be an int in [low, high] (None allowed with ``none_ok``); ValueError naming ``name``."""
    if value is None and none_ok:
        return
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if none_ok:
        allowed += " or None"
    if not is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_number(name: str, value: Any, low: float) -> None:
    """A finite real number > low (bool is not a number here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= low:
        raise ValueError(f"{name} must be a finite number > {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_index(name: str, value: int | None, bound: int) -> None:
    """A fixed layer / KV head must lie in [0, bound); None means sampled."""
    if value is not None and not (is_int(value) and 0 <= value < bound):
        raise ValueError(f"{name} must be None (sampled) or an int in [0, {bound - 1}], got {value!r}")


def check_common(spec: ModelSpec, layer: int | None, kv_head: int | None, agg: str, horizon: int | None,
                 sink: int, obs_queries: int) -> None:
    """Checks every env shares (one ValueError naming the argument)."""
    check_index("layer", layer, spec.num_layers)
    check_index("kv_head", kv_head, spec.num_kv_heads)
    check_choice("agg", agg, AGGREGATIONS)
    check_int("horizon", horizon, 1, none_ok=True)
    check_int("sink", sink, 0)
    check_int("obs_queries", obs_queries, 0)


def check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        check_bool(name, value)


def check_vector(num_envs: int, group_size: int, as_torch: Any = False) -> None:
    check_int("num_envs", num_envs, 1)
    check_bool("as_torch", as_torch)
    if not is_int(group_size) or group_size < 1 or num_envs % group_size:
        raise ValueError(f"group_size must be >= 1 and divide num_envs={num_envs}, got {group_size}")


# ----------------------------------------------------------------------------- sampling


def sample_episodes(
    rng: np.random.Generator, count: int, num_traces: int, spec: ModelSpec, layer: int | None, kv_head: int | None
) -> dict[str, np.ndarray]:
    """(trace, layer, kv_head) of ``count`` new episodes, each [count] int64: fixed or sampled uniformly."""
    bounds = {"trace": num_traces, "layer": spec.num_layers, "kv_head": spec.num_kv_heads}
    fixed = {"trace": None, "layer": layer, "kv_head": kv_head}
    return {
        name: np.full(count, fixed[name], dtype=np.int64) if fixed[name] is not None
        else rng.integers(bounds[name], size=count)
        for name in bounds
    }


def episode_ranges(num_traces: int, spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Inclusive ranges of the episode fields reset(options=...) may pin."""
    return {"trace": (0, num_traces - 1), "layer": (0, spec.num_layers - 1), "kv_head": (0, spec.num_kv_heads - 1)}


def episode_options(
    options: dict[str, Any] | None, ranges: dict[str, tuple[int, int]], count: int
) -> dict[str, np.ndarray]:
    """reset(options=...) entries that pin episode fields: an int, or one int per new episode."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"reset options must be a dict with keys from {tuple(ranges)} or None, got {options!r}")
    chosen = {}
    for name, value in (options or {}).items():
        if name not in ranges:
            raise ValueError(f"reset options: unknown key {name!r}; known keys: {tuple(ranges)}")
        try:
            array = np.asarray(value)
        except ValueError:  # ragged nests
            array = np.asarray(0.5)
        low, high = ranges[name]
        if not np.issubdtype(array.dtype, np.integer) or array.ndim > 1 or array.size == 0:
            raise ValueError(f"reset options: {name}={value!r} must be an int or a sequence of ints")
        array = np.broadcast_to(array, (count,)).astype(np.int64) if array.ndim == 0 else array.astype(np.int64)
        if array.shape != (count,) or array.min() < low or array.max() > high:
            raise ValueError(f"reset options: {name}={value!r} must be an int in [{low}, {high}] or {count} of them")
        chosen[name] = array
    return chosen


def grouped(array: np.ndarray, group_size: int) -> torch.Tensor:
    """One value per group -> one per row: [E / G] -> [E] (long)."""
    return torch.from_numpy(array).repeat_interleave(group_size)


# ----------------------------------------------------------------------------- observations


def observation_space(
    spec: ModelSpec, size: int, max_position: int, obs_queries: int, obs_attention: bool, obs_future: bool
) -> spaces.Dict:
    """The single-env observation space (see the env docstrings for the meaning of each key)."""
    n, d, g = size, spec.head_dim, spec.group_size
    entries = {
        "keys": spaces.Box(-FP16_MAX, FP16_MAX, (n, d), np.float32),
        "values": spaces.Box(-FP16_MAX, FP16_MAX, (n, d), np.float32),
        "positions": spaces.Box(0, max_position, (n,), np.int64),
        "mask": spaces.Box(0, 1, (n,), np.int8),
        "protected": spaces.Box(0, 1, (n,), np.int8),
        "layer": spaces.Discrete(spec.num_layers),
        "kv_head": spaces.Discrete(spec.num_kv_heads),
    }
    if obs_queries:
        entries["queries"] = spaces.Box(-FP16_MAX, FP16_MAX, (g, obs_queries, d), np.float32)
        entries["query_positions"] = spaces.Box(0, max_position, (obs_queries,), np.int64)
    if obs_attention:
        entries["attention"] = spaces.Box(0, max_position, (g, n), np.float32)
    if obs_future:
        entries["future_importance"] = spaces.Box(0, max_position, (n,), np.float32)
    return spaces.Dict(entries)
