"""KVEvict-v0: KVP's eviction problem as a one-step ranking bandit.

An episode is one cache prefix of n tokens on one KV head of one layer of a real trace. The agent
sees the n cached entries (padded to N = ``max_tokens``) and scores them; the ranking induced by the
scores (higher = keep) is the eviction decision for every budget at once, and the reward is minus
its budget-agnostic cost relative to the ideal ranking (kvp_gym.envs.reward).

The batched ``KVEvictCore`` does all the work for E rows at once; ``KVEvictEnv`` drives it with
E = 1 (``core.CoreEnv``), and the native vector env (kv_evict_vector.py) with E = num_envs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvp_gym.envs.core import CoreEnv
from kvp_gym.envs.episodes import (
    MAX_TOKENS,
    TraceSource,
    check_choice,
    check_common,
    check_flags,
    check_int,
    check_number,
    episode_options,
    episode_ranges,
    grouped,
    observation_space,
    sample_episodes,
)
from kvp_gym.envs.layer_cache import LayerCache, gather_observation, layer_layout, layer_tensors, shared_layer_cache
from kvp_gym.envs.reward import BUDGET_FRACTIONS, curve_of_sorted, kept_fraction_at, ranking_costs
from kvp_gym.ranking import DEFAULT_PROTECTED, Protected

REWARDS = ("cost_ratio", "neg_cost")


def prefix_range(
    lengths: np.ndarray, max_tokens: int, protected: Protected,
    prefix: tuple[int, int] | None, min_prefix: int | None, max_prefix: int | None, obs_queries: int = 0,
) -> tuple[int, int]:
    """The prefix lengths (lo, hi) episodes sample from, checked against N and the traces' lengths.

    The default shortest prefix is max(sink + recent + 16, obs_queries): every episode has the
    ``obs_queries`` queries it shows.
    """
    if prefix is not None:
        if min_prefix is not None or max_prefix is not None:
            raise ValueError("prefix: give either prefix=(lo, hi) or min_prefix/max_prefix, not both")
        if not isinstance(prefix, (tuple, list)) or len(prefix) != 2:
            raise ValueError(f"prefix must be a pair (lo, hi) of ints, got {prefix!r}")
        min_prefix, max_prefix = prefix
    check_int("min_prefix", min_prefix, 1, none_ok=True)
    check_int("max_prefix", max_prefix, 1, none_ok=True)
    shortest = int(lengths.min())
    sink, recent = protected.sink, protected.recent
    lo = max(sink + recent + 16, obs_queries) if min_prefix is None else min_prefix
    hi = min(max_tokens, shortest - 1) if max_prefix is None else max_prefix
    if lo < sink + recent + 1:
        raise ValueError(f"min_prefix={lo} leaves no token to rank: it must be > sink + recent = {sink + recent}")
    if hi > max_tokens:
        raise ValueError(f"max_prefix={hi} exceeds max_tokens={max_tokens} (the padded observation size N)")
    if hi > shortest - 1:
        raise ValueError(
            f"prefix range ({lo}, {hi}) is outside the traces' lengths: the shortest trace has {shortest} "
            f"tokens, so prefixes must be < {shortest} (a prefix needs at least one future token)"
        )
    if min_prefix is None and obs_queries > hi:
        raise ValueError(
            f"obs_queries={obs_queries} exceeds the longest prefix {hi} (max_prefix, else the smaller of "
            f"max_tokens={max_tokens} and the shortest trace's {shortest} tokens - 1)"
        )
    if lo > hi:
        raise ValueError(f"prefix range ({lo}, {hi}) is empty (min_prefix > max_prefix)")
    return lo, hi


class KVEvictCore:
    """KVEvict-v0 episodes on E = ``num_rows`` rows, batched; G = ``group_size`` consecutive rows share one.

    Arguments are those of ``KVEvictEnv`` (see its docstring).
    """

    def __init__(
        self,
        traces: Any = None,
        *,
        layer: int | None = None,
        kv_head: int | None = None,
        prefix: tuple[int, int] | None = None,
        min_prefix: int | None = None,
        max_prefix: int | None = None,
        max_tokens: int = 512,
        sink: int = DEFAULT_PROTECTED.sink,
        recent: int = DEFAULT_PROTECTED.recent,
        agg: str = "max",
        horizon: int | None = None,
        value_weighted: bool = False,
        reward: str = "cost_ratio",
        obs_queries: int = 0,
        obs_attention: bool = False,
        obs_future: bool = False,
        curve: bool = False,
        model: Any = None,
        cache_gb: float = 1.0,
        num_rows: int = 1,
        group_size: int = 1,
    ) -> None:
        check_int("max_tokens", max_tokens, 2, MAX_TOKENS)
        check_flags(obs_attention=obs_attention, obs_future=obs_future, curve=curve, value_weighted=value_weighted)
        check_number("cache_gb", cache_gb, 0.0)
        self.source = TraceSource(traces, model)
        spec = self.source.spec
        check_common(spec, layer, kv_head, agg, horizon, sink, obs_queries)
        check_choice("reward", reward, REWARDS)
        check_int("recent", recent, 0)
        self.protected = Protected(sink, recent)
        self.budget = self.step_size = None  # budget-agnostic, one step
        self.lo, self.hi = prefix_range(self.source.lengths, max_tokens, self.protected, prefix, min_prefix, max_prefix,
                                        obs_queries)
        if obs_queries > self.lo:
            raise ValueError(f"obs_queries={obs_queries} exceeds the shortest prefix {self.lo} (min_prefix)")
        self.size = max_tokens
        self.layer, self.kv_head, self.reward, self.curve = layer, kv_head, reward, curve
        self.obs_queries, self.obs_future = obs_queries, obs_future
        self.num_rows, self.group_size = num_rows, group_size
        self.observation_space = observation_space(
            spec, max_tokens, int(self.source.lengths.max()), obs_queries, obs_attention, obs_future
        )
        self.cache = self._layer_cache(agg, horizon, value_weighted, bool(obs_queries), obs_attention, cache_gb)

    def _layer_cache(self, agg: str, horizon: int | None, value_weighted: bool, queries: bool, attention: bool,
                     cache_gb: float) -> LayerCache:
        """Per (trace, layer): keys/values [Hkv, N, d] and importance at every prefix n in [lo, hi]."""
        source, spec, width = self.source, self.source.spec, self.size
        prefixes = torch.arange(self.lo, self.hi + 1)
        layout = layer_layout(spec, len(prefixes), width, queries, attention)

        def build(trace: int, layer: int) -> dict[str, torch.Tensor]:
            return layer_tensors(source.traces[trace], layer, prefixes, width, agg, horizon, queries, attention,
                                 value_weighted)

        key = ("KVEvict", source.key, width, self.lo, self.hi, agg, horizon, value_weighted, queries, attention)
        return shared_layer_cache(
            key, lambda: LayerCache(build, layout, len(source), spec.num_layers, cache_gb * 2**30)
        )

    def reset(self, rng: np.random.Generator, rows: torch.Tensor | None = None,
              options: dict[str, Any] | None = None) -> None:
        """New episodes on every row (every step ends every episode, so ``rows`` is always all)."""
        groups = self.num_rows // self.group_size
        episode = sample_episodes(rng, groups, len(self.source), self.source.spec, self.layer, self.kv_head)
        episode["n"] = rng.integers(self.lo, self.hi + 1, size=groups)
        ranges = dict(episode_ranges(len(self.source), self.source.spec), n=(self.lo, self.hi))
        episode.update(episode_options(options, ranges, groups))
        trace, layer, head, n = (grouped(episode[key], self.group_size) for key in ("trace", "layer", "kv_head", "n"))
        index = torch.arange(self.size)
        real = index < n[:, None]
        self._ranked = self.protected.ranked(real)
        slot = self.cache.lookup(trace, layer)
        self._obs, self._importance = gather_observation(
            self.cache, slot, layer, head, n - self.lo, index.expand(len(n), -1), real,
            real & ~self._ranked, n, self.obs_queries, self.obs_future,
        )
        self._identity = {"trace": trace, "layer": layer, "kv_head": head, "n": n}

    @property
    def ranked(self) -> torch.Tensor:
        """[E, N] the unprotected real entries U = [sink, n - recent), which the action ranks."""
        return self._ranked

    def observation(self) -> dict[str, torch.Tensor]:
        return self._obs

    def identity(self) -> dict[str, torch.Tensor]:
        return dict(self._identity)

    def step(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards [E] of the rankings ``scores [E, N]`` (higher = keep); every episode terminates."""
        costs = ranking_costs(scores, self._importance, self._ranked)
        curve = curve_of_sorted(costs.in_order)
        kept = kept_fraction_at(curve, self._ranked)
        info = dict(self._identity, cost_ratio=costs.ratio, cost=costs.cost, optimal_cost=costs.optimal)
        for column, fraction in enumerate(BUDGET_FRACTIONS):
            info[f"kept_fraction_{round(fraction * 100)}"] = kept[:, column]
        if self.curve:
            info["curve"] = curve
        reward = -costs.ratio if self.reward == "cost_ratio" else -costs.cost
        return reward, torch.ones(len(reward), dtype=torch.bool), info


class KVEvictEnv(CoreEnv):
    """KVEvict-v0: rank the cached entries of one KV head; reward = -cost(sigma) / cost(sigma*).

    Arguments (all optional):
      traces          trace directory, TraceDataset, or a list of them (None: the default trace set,
                      generated once into $KVP_GYM_HOME)
      layer, kv_head  fix them (one agent per head) or None to sample per episode
      prefix          (lo, hi) range of the prefix length n (or min_prefix / max_prefix); default
                      lo = max(sink + recent + 16, obs_queries), hi = min(max_tokens, shortest trace - 1)
      max_tokens      N, the padded observation size (default 512; at most MAX_TOKENS = 16384)
      sink, recent    protected first / last tokens (4, 16): kept by every policy, never ranked
      agg             "max" (KVP) or "mean" (ForesightKV) over the query heads of the group
      horizon         future queries counted in the importance (None: the rest of the trace)
      value_weighted  the importance of entry i is I(i) ||v_i|| (what i adds to the attention output;
                      evicting by it in the real cache costs less perplexity than by I alone)
      reward          "cost_ratio" (-cost/cost*, <= -1, -1 is optimal) or "neg_cost" (-cost)
      obs_queries     w > 0 adds queries [G, w, d] (queries at positions n-w..n-1) and query_positions [w]
      obs_attention   adds attention [G, N]: attention each entry received from queries j < n
      obs_future      adds future_importance [N]: the true I (cheating: for the oracle / upper bound)
      curve           adds the kept-fraction curve [N] to the step info
      model           a model name or ModelSpec the traces must come from
      cache_gb        memory for the per-(trace, layer) tensors (LRU beyond it)

    Observation: keys, values [N, d] float32; positions [N] int64; mask [N] int8 (1 = real entry,
    0 = padding); protected [N] int8 (1 = sink/recent: real but not ranked); layer, kv_head
    (Discrete); plus the optional keys above. Action: [N] float32 scores, higher = keep (any finite
    float32 value; padded and protected entries are ignored).
    Reset info: trace, layer, kv_head, n. Step info: the same plus cost_ratio, cost, optimal_cost,
    kept_fraction_10/25/50 (share of the future attention over U kept by the top 10/25/50 % of U),
    and curve if asked. ``reset(options={"trace": i, "layer": l, "kv_head": h, "n": n})`` pins any of them.
    """

    def __init__(self, traces: Any = None, **kwargs: Any) -> None:
        super().__init__(KVEvictCore(traces, **kwargs))
