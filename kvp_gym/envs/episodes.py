"""What every kvp-gym env shares: trace sets, the per-(trace, layer) tensors episodes gather from,
episode sampling, the observation layout, and action checks.

The envs keep the tensors of each (trace, layer) pair they touch (keys, values, the future
importance of every cached token at every prefix the env can show, optionally queries and
attention received) in a ``LayerCache``: an LRU cache whose entries are slots of preallocated
slabs [S, ...], so a whole batch of episodes is gathered with one indexing op per observation key,
whatever mix of traces, layers and heads it holds. Envs built with the same trace sets and options
in one process share one cache (a SyncVectorEnv of single envs computes each table once).

Shapes: E = batch rows (envs), N = entries shown, d = head dim, G = query heads per KV head,
w = query window, Hkv = KV heads, R = importance rows kept per layer (one per prefix length).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium import spaces

from kvp_gym.models.spec import ModelSpec
from kvp_gym.traces.dataset import Trace, TraceDataset
from kvp_gym.utility.importance import AGGREGATIONS, attention_probs, importance_table

FP16_MAX = 65504.0  # traces store q/k/v in fp16, which bounds every entry


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


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_index(name: str, value: int | None, bound: int) -> None:
    """A fixed layer / KV head must lie in [0, bound); None means sampled."""
    if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < bound):
        raise ValueError(f"{name}={value!r} is out of range [0, {bound})")


def check_common(spec: ModelSpec, layer: int | None, kv_head: int | None, agg: str, horizon: int | None,
                 sink: int, obs_queries: int) -> None:
    """Checks every env shares (one ValueError naming the argument)."""
    check_index("layer", layer, spec.num_layers)
    check_index("kv_head", kv_head, spec.num_kv_heads)
    check_choice("agg", agg, AGGREGATIONS)
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be a positive number of future queries or None, got {horizon}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if obs_queries < 0:
        raise ValueError(f"obs_queries must be >= 0 (0 = off), got {obs_queries}")


def check_vector(num_envs: int, group_size: int) -> None:
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if group_size < 1 or num_envs % group_size:
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
    chosen = {}
    for name, value in (options or {}).items():
        if name not in ranges:
            raise ValueError(f"reset options: unknown key {name!r}; known keys: {tuple(ranges)}")
        array = np.asarray(value)
        low, high = ranges[name]
        if not np.issubdtype(array.dtype, np.integer) or array.ndim > 1:
            raise ValueError(f"reset options: {name}={value!r} must be an int or a sequence of ints")
        array = np.broadcast_to(array, (count,)).astype(np.int64) if array.ndim == 0 else array.astype(np.int64)
        if array.shape != (count,) or array.min() < low or array.max() > high:
            raise ValueError(f"reset options: {name}={value!r} must be an int in [{low}, {high}] or {count} of them")
        chosen[name] = array
    return chosen


def grouped(array: np.ndarray, group_size: int) -> torch.Tensor:
    """One value per group -> one per row: [E / G] -> [E] (long)."""
    return torch.from_numpy(array).repeat_interleave(group_size)


# ----------------------------------------------------------------------------- per-layer tensors


def padded(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """The first ``width`` entries of ``x`` along ``dim``, zero-padded to ``width + 1``.

    Index ``width`` (and any index past the trace) is all zeros: padded observation slots gather it.
    """
    kept = x.narrow(dim, 0, min(width, x.shape[dim]))
    pad = list(x.shape)
    pad[dim] = width + 1 - kept.shape[dim]
    return torch.cat([kept, x.new_zeros(pad)], dim=dim)


def importance_rows(table: torch.Tensor, ns: torch.Tensor, horizon: int | None, width: int) -> torch.Tensor:
    """Future importance at many prefix lengths: table [Hkv, T + 1, T], ns [R] -> [Hkv, R, width + 1].

    Row r holds I_n(i) for n = ns[r] (0 for i >= n; ns[r] = T gives zeros), from the suffix-sum table
    of ``importance_table``, clamped at 0 against float round-off.
    """
    length = table.shape[2]
    ns = ns.clamp(max=length)
    ends = ns.new_full(ns.shape, length) if horizon is None else (ns + horizon).clamp(max=length)
    cols = min(width, length)
    rows = (table[:, ns, :cols] - table[:, ends, :cols]).clamp_(min=0)
    rows.masked_fill_(torch.arange(cols)[None, None, :] >= ns[None, :, None], 0.0)
    return padded(rows, width, 2)


def received_rows(trace: Trace, layer: int, ns: torch.Tensor, width: int, chunk: int = 256) -> torch.Tensor:
    """Attention received from the past queries at many prefix lengths: [Hkv, R, width + 1, G].

    Entry [h, r, i, g] = sum_{j < n} A_g[j, i] for n = ns[r] (utility.attention_received for each n).
    """
    spec = trace.spec
    top = int(ns.clamp(max=trace.length).max())
    q, k = trace.q(layer)[:, :top], trace.k(layer)[:, :top]
    cols = min(width, top)
    out = torch.zeros(spec.num_heads, len(ns), cols)
    running = torch.zeros(spec.num_heads, 1, top)
    for start in range(0, top, chunk):
        stop = min(start + chunk, top)
        cumulative = running + attention_probs(q, k, start, stop).cumsum(1)  # row r: queries j <= start + r
        hits = ((ns > start) & (ns <= stop)).nonzero()[:, 0]
        out[:, hits] = cumulative[:, ns[hits] - start - 1, :cols]
        running = cumulative[:, -1:]
    grouped_heads = out.view(spec.num_kv_heads, spec.group_size, len(ns), cols).permute(0, 2, 3, 1)
    return padded(grouped_heads, width, 2)


def layer_layout(spec: ModelSpec, rows: int, width: int, queries: bool, attention: bool) -> dict[str, tuple]:
    """Shapes and dtypes of one cache slot: name -> (shape, dtype); positions 0..width-1, then the zero entry."""
    hkv, d, g, w = spec.num_kv_heads, spec.head_dim, spec.group_size, width + 1
    layout = {
        "keys": ((hkv, w, d), torch.float32),
        "values": ((hkv, w, d), torch.float32),
        "importance": ((hkv, rows, w), torch.float32),
    }
    if queries:
        layout["queries"] = ((hkv, w, g, d), torch.float32)
    if attention:
        layout["attention"] = ((hkv, rows, w, g), torch.float32)
    return layout


def layer_tensors(
    trace: Trace, layer: int, ns: torch.Tensor, width: int, agg: str, horizon: int | None,
    queries: bool, attention: bool,
) -> dict[str, torch.Tensor]:
    """The tensors of one (trace, layer) in ``layer_layout`` form; importance rows at prefixes ``ns``."""
    spec = trace.spec
    tensors = {
        "keys": padded(trace.k(layer), width, 1),
        "values": padded(trace.v(layer), width, 1),
        "importance": importance_rows(importance_table(trace, layer, agg), ns, horizon, width),
    }
    if queries:
        q = trace.q(layer).view(spec.num_kv_heads, spec.group_size, trace.length, spec.head_dim)
        tensors["queries"] = padded(q.permute(0, 2, 1, 3), width, 1)
    if attention:
        tensors["attention"] = received_rows(trace, layer, ns, width)
    return tensors


# ----------------------------------------------------------------------------- the layer cache


class LayerCache:
    """LRU cache of per-(trace, layer) tensors held in slabs ``slabs[name] [S, *shape]``.

    ``lookup(trace [m], layer [m]) -> slot [m]`` builds what is missing (one ``build(trace, layer)``
    call per distinct missing pair) and, once the slabs hold ``max_bytes``, reuses the least recently
    used slots. Slots are valid until the next lookup: callers gather what they need right away.
    The slabs grow past ``max_bytes`` only if one lookup needs more pairs than fit.
    """

    def __init__(
        self, build: Callable[[int, int], dict[str, torch.Tensor]], layout: dict[str, tuple],
        num_traces: int, num_layers: int, max_bytes: float,
    ) -> None:
        self.build = build
        self.layout = layout
        self.slot_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
        self.max_slots = max(1, min(num_traces * num_layers, int(max_bytes // self.slot_bytes)))
        self.slot_of = torch.full((num_traces, num_layers), -1, dtype=torch.long)
        self.slabs: dict[str, torch.Tensor] = {}
        self.pair_of = torch.empty(0, 2, dtype=torch.long)
        self.last_used = torch.empty(0, dtype=torch.long)
        self.tick = 0
        self._grow(min(self.max_slots, 8))

    @property
    def capacity(self) -> int:
        return len(self.last_used)

    def lookup(self, trace: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Slots [m] holding each (trace, layer) pair, loading the missing ones."""
        self.tick += 1
        slots = self.slot_of[trace, layer]
        missing = slots < 0
        if missing.any():
            self.last_used[slots[~missing]] = self.tick
            pairs = torch.unique(torch.stack([trace[missing], layer[missing]], dim=1), dim=0)
            for trace_index, layer_index in pairs.tolist():
                self._load(trace_index, layer_index)
            slots = self.slot_of[trace, layer]
        self.last_used[slots] = self.tick
        return slots

    def _load(self, trace: int, layer: int) -> None:
        slot = self._free_slot()
        old_trace, old_layer = self.pair_of[slot].tolist()
        if old_trace >= 0:
            self.slot_of[old_trace, old_layer] = -1
            self.pair_of[slot] = -1
        for name, tensor in self.build(trace, layer).items():
            self.slabs[name][slot] = tensor
        self.pair_of[slot] = torch.tensor([trace, layer])
        self.slot_of[trace, layer] = slot
        self.last_used[slot] = self.tick

    def _free_slot(self) -> int:
        """An empty slot, else the least recently used one not used by the current lookup."""
        unused = (self.pair_of[:, 0] < 0).nonzero()
        if len(unused):
            return int(unused[0])
        oldest = int(self.last_used.argmin())
        if self.capacity < self.max_slots or self.last_used[oldest] == self.tick:
            self._grow(max(min(self.max_slots, 2 * self.capacity), self.capacity + 1))
            return self._free_slot()
        return oldest

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        for name, (shape, dtype) in self.layout.items():
            fresh = torch.empty((extra, *shape), dtype=dtype)
            self.slabs[name] = torch.cat([self.slabs[name], fresh]) if name in self.slabs else fresh
        self.pair_of = torch.cat([self.pair_of, torch.full((extra, 2), -1, dtype=torch.long)])
        self.last_used = torch.cat([self.last_used, torch.zeros(extra, dtype=torch.long)])


_shared_caches: weakref.WeakValueDictionary[tuple, LayerCache] = weakref.WeakValueDictionary()


def shared_layer_cache(key: tuple, make: Callable[[], LayerCache]) -> LayerCache:
    """The process-wide cache for ``key`` (trace sets + options), made on first use."""
    cache = _shared_caches.get(key)
    if cache is None:
        cache = make()
        _shared_caches[key] = cache
    return cache


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


def take(slab: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """slab[index] for broadcastable index tensors over the leading dims, as one index_select.

    slab [S, ..., *rest], k index tensors broadcasting to shape X -> [*X, *rest].
    """
    flat = torch.zeros((), dtype=torch.long)
    for size, position in zip(slab.shape, index):
        flat = flat * size + position
    rest = slab.shape[len(index):]
    return slab.reshape(-1, *rest).index_select(0, flat.reshape(-1)).view(*flat.shape, *rest)


def gather_observation(
    cache: LayerCache, slot: torch.Tensor, layer: torch.Tensor, head: torch.Tensor, row: torch.Tensor,
    positions: torch.Tensor, real: torch.Tensor, protected: torch.Tensor, query_end: torch.Tensor,
    obs_queries: int, obs_future: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Observations and importance of a batch, one gather per key.

    slot, layer, head, row, query_end [E]; positions, real, protected [E, N]. Padded entries
    (real False) gather the slab's zero entry and show position 0: never the future tokens' tensors.
    Returns (obs with [E, ...] tensors, importance [E, N] = I at prefix row ``row`` of each entry).
    """
    slabs, s, h = cache.slabs, slot[:, None], head[:, None]
    where = positions.masked_fill(~real, slabs["keys"].shape[2] - 1)  # the slabs' zero entry
    importance = take(slabs["importance"], s, h, row[:, None], where)
    obs = {
        "keys": take(slabs["keys"], s, h, where),
        "values": take(slabs["values"], s, h, where),
        "positions": positions.masked_fill(~real, 0),
        "mask": real.to(torch.int8),
        "protected": protected.to(torch.int8),
        "layer": layer.clone(),
        "kv_head": head.clone(),
    }
    if obs_queries:
        query_positions = query_end[:, None] - obs_queries + torch.arange(obs_queries)
        obs["queries"] = take(slabs["queries"], s, h, query_positions).transpose(1, 2).contiguous()
        obs["query_positions"] = query_positions
    if "attention" in slabs:
        obs["attention"] = take(slabs["attention"], s, h, row[:, None], where).transpose(1, 2).contiguous()
    if obs_future:
        obs["future_importance"] = importance.clone()
    return obs, importance


# ----------------------------------------------------------------------------- actions and outputs


def check_scores(action: Any, rows: int | None, size: int, ranked: torch.Tensor) -> torch.Tensor:
    """Validate an action (scores [N], or [E, N] for a vector env: ``rows`` = E) -> float tensor [E, N].

    Raises ValueError for a wrong shape, a non-float dtype, or NaN/inf on an entry that is ranked
    (``ranked [E, N]``; scores of padded and protected entries are ignored, whatever they hold).
    """
    name = "action" if rows is None else "actions"
    expected = (size,) if rows is None else (rows, size)
    if isinstance(action, (list, tuple)):
        action = np.asarray(action)
    if isinstance(action, np.ndarray):
        if not np.issubdtype(action.dtype, np.floating):
            raise ValueError(f"{name} must hold float scores, got dtype {action.dtype}")
        action = torch.from_numpy(np.ascontiguousarray(action))
    elif not isinstance(action, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor of float scores, got {type(action).__name__}")
    elif not action.is_floating_point():
        raise ValueError(f"{name} must hold float scores, got dtype {action.dtype}")
    else:
        action = action.detach().cpu()
    if tuple(action.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (one score per entry), got {tuple(action.shape)}")
    scores = action.reshape(ranked.shape)
    bad = ~torch.isfinite(scores) & ranked
    if bad.any():
        row, entry = bad.nonzero()[0].tolist()
        where = f"entry {entry}" if rows is None else f"env {row}, entry {entry}"
        raise ValueError(f"{name} holds NaN or inf at {where} (a ranked entry); scores must be finite")
    return scores


def to_numpy(tree: Any) -> Any:
    """Tensors -> numpy arrays (zero-copy), through dicts and tuples."""
    if isinstance(tree, dict):
        return {key: to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_numpy(value) for value in tree)
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


def unbatch(tree: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Row 0 of a batch of tensors: Python scalars for [E] tensors, fresh numpy arrays otherwise."""
    return {key: value[0].item() if value.dim() == 1 else value[0].numpy().copy() for key, value in tree.items()}


def with_masks(info: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """Gymnasium's vector info layout: every key ``k`` gets a boolean ``_k`` [E] saying which envs hold it."""
    out = {}
    for key, value in info.items():
        out[key], out[f"_{key}"] = value, mask.clone()
    return out


class CoreAccess:
    """What the single and vector env wrappers expose of their batched core (``self.core``)."""

    @property
    def model_spec(self):
        """The ModelSpec of the traces (layers, heads, KV heads, head dim)."""
        return self.core.source.spec

    @property
    def traces(self):
        """The Trace objects episodes are drawn from; info["trace"] indexes this list."""
        return self.core.source.traces


class BatchedCore(Protocol):
    """What the generic single and vector envs drive: E rows of episodes (G consecutive rows share one).

    observation_space / size: the single-env layout; ranked [E, N]: entries the action ranks now.
    reset(rng, rows, options): start new episodes on ``rows`` ([E] bool; None = all).
    observation() -> obs [E, ...]; identity() -> info [E] of the current episodes.
    step(scores [E, N]) -> (reward [E] float64, terminated [E] bool, info [E, ...]).
    """

    observation_space: spaces.Dict
    size: int

    @property
    def ranked(self) -> torch.Tensor: ...

    def reset(self, rng: np.random.Generator, rows: torch.Tensor | None = None,
              options: dict[str, Any] | None = None) -> None: ...

    def observation(self) -> dict[str, torch.Tensor]: ...

    def identity(self) -> dict[str, torch.Tensor]: ...

    def step(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...
