"""The per-(trace, layer) tensors episodes gather from, held in an LRU cache of preallocated slabs.

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
from collections.abc import Callable

import torch

from kvp_gym.models.spec import ModelSpec
from kvp_gym.traces.dataset import Trace
from kvp_gym.utility.importance import importance_rows, importance_table, received_rows


def padded(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """The first ``width`` entries of ``x`` along ``dim``, zero-padded to ``width + 1``.

    Index ``width`` (and any index past the trace) is all zeros: padded observation slots gather it.
    """
    kept = x.narrow(dim, 0, min(width, x.shape[dim]))
    pad = list(x.shape)
    pad[dim] = width + 1 - kept.shape[dim]
    return torch.cat([kept, x.new_zeros(pad)], dim=dim)


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
    queries: bool, attention: bool, value_weighted: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of one (trace, layer) in ``layer_layout`` form; importance rows at prefixes ``ns``
    (times each entry's value norm when ``value_weighted``)."""
    spec = trace.spec
    importance = importance_rows(importance_table(trace, layer, agg), ns, horizon, width)  # [Hkv, R, min(width, T)]
    if value_weighted:
        importance = importance * trace.v(layer)[:, None, : importance.shape[2]].norm(dim=-1)
    tensors = {
        "keys": padded(trace.k(layer), width, 1),
        "values": padded(trace.v(layer), width, 1),
        "importance": padded(importance, width, 2),
    }
    if queries:
        q = trace.q(layer).view(spec.num_kv_heads, spec.group_size, trace.length, spec.head_dim)
        tensors["queries"] = padded(q.permute(0, 2, 1, 3), width, 1)
    if attention:
        tensors["attention"] = padded(received_rows(trace, layer, ns, width), width, 2)
    return tensors


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
