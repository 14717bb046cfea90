"""KVEvictStream-v0: ForesightKV's streaming eviction as a multi-step MDP over one trace.

The cache holds B = ``budget`` entries of one KV head. Each step appends the next L = ``step`` trace
tokens; the agent scores the B + L entries, and the L lowest-scored among the B older ones are
evicted (the L just appended and the first ``sink`` tokens are protected). The step's reward is
minus the future attention mass of what was evicted: for a step whose chunk ends at e, token i is
worth I_e(i) = sum_{j >= e} agg_g A_g[j, i] (utility.importance_from_table at n = e). Evictions
change every later observation. The episode is the whole trace: num_stream_steps(T, B, L) steps.

Step t appends tokens [B + t L, B + (t + 1) L), as in utility.golden_eviction_schedule; the info
compares the episode's return with that golden schedule's, scored with the same reward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvp_gym.envs.core import CoreEnv, CoreVectorEnv
from kvp_gym.envs.episodes import (
    MAX_TOKENS,
    TraceSource,
    check_common,
    check_flags,
    check_int,
    check_number,
    check_vector,
    episode_options,
    episode_ranges,
    grouped,
    observation_space,
    sample_episodes,
)
from kvp_gym.envs.layer_cache import LayerCache, gather_observation, layer_layout, layer_tensors, shared_layer_cache
from kvp_gym.ranking import DEFAULT_PROTECTED, Protected, ranking_order
from kvp_gym.utility.golden import golden_eviction_schedule, num_stream_steps


def golden_masses(importance: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """Mass the golden schedule evicts at each step: importance [Hkv, R, T], evicted [steps, Hkv, L] -> [Hkv, R].

    Row t of ``importance`` is I at the end of step t's chunk; rows past the schedule get 0.
    """
    steps = evicted.shape[0]
    per_step = importance[:, :steps].gather(2, evicted.permute(1, 0, 2)).sum(-1)
    return torch.cat([per_step, per_step.new_zeros(per_step.shape[0], importance.shape[1] - steps)], dim=1)


def start_state(budget: int, trace: torch.Tensor, layer: torch.Tensor, head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh episodes: the cache holds tokens 0..B-1; cached [E, B] true positions (ascending), step [E]."""
    rows = len(trace)
    return {
        "trace": trace,
        "layer": layer,
        "kv_head": head,
        "step": torch.zeros(rows, dtype=torch.long),
        "cached": torch.arange(budget).repeat(rows, 1),
        "episode_return": torch.zeros(rows, dtype=torch.float64),
        "golden_return": torch.zeros(rows, dtype=torch.float64),
    }


class StreamCore:
    """KVEvictStream-v0 episodes on E = ``num_rows`` rows, batched; G = ``group_size`` consecutive rows
    start from the same episode (same trace, layer, head) and then follow their own actions.

    Arguments are those of ``KVEvictStreamEnv`` (see its docstring).
    """

    def __init__(
        self,
        traces: Any = None,
        *,
        layer: int | None = None,
        kv_head: int | None = None,
        budget: int = 256,
        step: int = 64,
        sink: int = DEFAULT_PROTECTED.sink,
        agg: str = "mean",
        horizon: int | None = None,
        obs_queries: int = 0,
        obs_attention: bool = False,
        obs_future: bool = False,
        model: Any = None,
        cache_gb: float = 1.0,
        num_rows: int = 1,
        group_size: int = 1,
    ) -> None:
        check_int("budget", budget, 1, MAX_TOKENS)
        check_int("step", step, 1, MAX_TOKENS)
        check_flags(obs_attention=obs_attention, obs_future=obs_future)
        check_number("cache_gb", cache_gb, 0.0)
        self.source = TraceSource(traces, model)
        spec, lengths = self.source.spec, self.source.lengths
        check_common(spec, layer, kv_head, agg, horizon, sink, obs_queries)
        if step < 1 or budget < sink + step:
            raise ValueError(f"need step >= 1 and budget >= sink + step, got budget={budget}, step={step}, sink={sink}")
        if obs_queries > budget + step:
            raise ValueError(f"obs_queries={obs_queries} exceeds the {budget + step} entries of a step")
        shortest = int(lengths.min())
        if num_stream_steps(shortest, budget, step) < 1:
            raise ValueError(
                f"budget={budget}, step={step}: the shortest trace has {shortest} tokens, fewer than the "
                f"budget + 2 * step = {budget + 2 * step} a streaming episode needs"
            )
        self.budget, self.step_size = budget, step
        self.protected = Protected(sink, recent=0)  # the appended chunk is never a candidate, not "recent"
        self.size = budget + step
        self.layer, self.kv_head = layer, kv_head
        self.obs_queries, self.obs_future = obs_queries, obs_future
        self.num_rows, self.group_size = num_rows, group_size
        self.steps_of = torch.tensor([num_stream_steps(int(length), budget, step) for length in lengths])
        self.observation_space = observation_space(
            spec, self.size, int(lengths.max()), obs_queries, obs_attention, obs_future
        )
        self.cache = self._layer_cache(agg, horizon, bool(obs_queries), obs_attention, cache_gb)
        self.state = start_state(budget, *(torch.zeros(num_rows, dtype=torch.long) for _ in range(3)))
        self._obs = None

    def _layer_cache(self, agg: str, horizon: int | None, queries: bool, attention: bool, cache_gb: float) -> LayerCache:
        """Per (trace, layer): keys/values [Hkv, T, d], I at every chunk end, the golden masses."""
        source, spec, budget, step = self.source, self.source.spec, self.budget, self.step_size
        width = int(source.lengths.max())
        chunk_ends = budget + (torch.arange(int(self.steps_of.max()) + 1) + 1) * step
        layout = layer_layout(spec, len(chunk_ends), width, queries, attention)
        layout["golden_mass"] = ((spec.num_kv_heads, len(chunk_ends)), torch.float32)

        def build(trace: int, layer: int) -> dict[str, torch.Tensor]:
            tensors = layer_tensors(source.traces[trace], layer, chunk_ends, width, agg, horizon, queries, attention)
            schedule = golden_eviction_schedule(source.traces[trace], layer, budget, step)
            tensors["golden_mass"] = golden_masses(tensors["importance"], schedule.evicted)
            return tensors

        key = ("KVEvictStream", source.key, budget, step, agg, horizon, queries, attention)
        return shared_layer_cache(
            key, lambda: LayerCache(build, layout, len(source), spec.num_layers, cache_gb * 2**30)
        )

    def reset(self, rng: np.random.Generator, rows: torch.Tensor | None = None,
              options: dict[str, Any] | None = None) -> None:
        """Start new episodes on ``rows`` [E] (bool; None = all). Groups always end together."""
        rows = torch.ones(self.num_rows, dtype=torch.bool) if rows is None else rows
        count = int(rows.sum()) // self.group_size
        episode = sample_episodes(rng, count, len(self.source), self.source.spec, self.layer, self.kv_head)
        episode.update(episode_options(options, episode_ranges(len(self.source), self.source.spec), count))
        fresh = start_state(self.budget, *(grouped(episode[key], self.group_size) for key in ("trace", "layer", "kv_head")))
        for name, value in fresh.items():
            self.state[name][rows] = value
        self._obs = None

    @property
    def ranked(self) -> torch.Tensor:
        """[E, N] the evictable entries: the B older ones, minus the sinks."""
        self.observation()
        return self._ranked

    def observation(self) -> dict[str, torch.Tensor]:
        """The B cached entries then the L appended ones, at their true positions (built once per state)."""
        if self._obs is None:
            state = self.state
            chunk_start = self.budget + state["step"] * self.step_size
            positions = torch.cat([state["cached"], chunk_start[:, None] + torch.arange(self.step_size)], dim=1)
            older = torch.arange(self.size) < self.budget
            self._ranked = self.protected.ranked(older.expand_as(positions))
            slot = self.cache.lookup(state["trace"], state["layer"])
            self._obs, self._importance = gather_observation(
                self.cache, slot, state["layer"], state["kv_head"], state["step"], positions,
                torch.ones_like(positions, dtype=torch.bool), ~self._ranked, chunk_start + self.step_size,
                self.obs_queries, self.obs_future,
            )
            self._golden = self.cache.slabs["golden_mass"][slot, state["kv_head"], state["step"]].double()
        return self._obs

    def identity(self) -> dict[str, torch.Tensor]:
        return {name: self.state[name].clone() for name in ("trace", "layer", "kv_head", "step")}

    def step(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Evict the L lowest-scored evictable entries of each row; reward [E] = -their future attention."""
        positions = self.observation()["positions"]
        evictable = self.budget - self.protected.sink  # the sinks never leave the cache
        order = ranking_order(scores, self._ranked)
        evicted = order[:, evictable - self.step_size : evictable]
        mass = self._importance.gather(1, evicted).double().sum(1)
        keep = torch.ones_like(positions, dtype=torch.bool).scatter_(1, evicted, False)
        info = self.identity()
        state = self.state
        state["cached"] = positions[keep].view(len(positions), self.budget)
        state["episode_return"] -= mass
        state["golden_return"] -= self._golden
        state["step"] += 1
        self._obs = None
        info.update(
            evicted=positions.gather(1, evicted).sort(dim=1).values,
            evicted_mass=mass,
            golden_evicted_mass=self._golden,
            episode_return=state["episode_return"].clone(),
            golden_return=state["golden_return"].clone(),
        )
        return -mass, state["step"] >= self.steps_of[state["trace"]], info


class KVEvictStreamEnv(CoreEnv):
    """KVEvictStream-v0: evict L of the B older entries each step; reward = -evicted future attention.

    Arguments (all optional):
      traces, layer, kv_head, model, cache_gb, obs_queries, obs_attention, obs_future: as KVEvictEnv
      budget          B, the entries kept between steps (default 256)
      step            L, tokens appended (and evicted) per step (default 64); N = B + L entries shown
      sink            first tokens never evicted (default 4)
      agg             "mean" (ForesightKV, default) or "max" over the query heads of the group
      horizon         future queries counted in the importance (None: the rest of the trace)

    Observation: KVEvictEnv's layout with N = B + L: the B cached entries (ascending true positions,
    no longer contiguous after evictions) then the L appended ones; mask is all 1; protected marks
    the sinks and the appended entries. obs_queries = w gives the last w queries of the appended
    chunk; obs_attention the attention received from every query before the chunk's end.
    Action: [N] float32 scores, higher = keep. Reset info: trace, layer, kv_head, step (0).
    Step info: trace, layer, kv_head, step (the step just taken), evicted [L] (positions),
    evicted_mass, golden_evicted_mass, episode_return and golden_return (running totals, the
    episode's totals at the last step). The golden schedule is utility.golden_eviction_schedule
    on the same trace and head; it may evict sinks, which this env protects (use sink=0 to replay it).
    """

    def __init__(self, traces: Any = None, **kwargs: Any) -> None:
        super().__init__(StreamCore(traces, **kwargs))


class KVEvictStreamVectorEnv(CoreVectorEnv):
    """KVEvictStream-v0 as a native vector env; episodes end per env (traces may differ in length),
    with SAME_STEP autoreset. ``group_size=G``: G consecutive envs start each episode together
    (GRPO: G rollouts of one trace). ``as_torch``: torch in and out. Other arguments: KVEvictStreamEnv's.
    """

    def __init__(self, num_envs: int = 1, traces: Any = None, *, group_size: int = 1, as_torch: bool = False,
                 **kwargs: Any) -> None:
        check_vector(num_envs, group_size, as_torch)
        super().__init__(StreamCore(traces, num_rows=num_envs, group_size=group_size, **kwargs), num_envs, as_torch)
