"""Play the envs with any registered scorer, or replay ForesightKV's golden schedule.

``ScorerPolicy(get("knorm"), env.unwrapped.model_spec).act(obs)`` turns env observations into a
``ScoringView`` with one KV head (H = 1) and returns the scorer's scores as the action; the scorer
sees only the optional inputs it declares (``kvp_gym.scorers.declared_view``). The oracle scorer
needs ``future_importance``: make the env with ``obs_future=True`` (cheating, upper bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvp_gym.models.spec import ModelSpec
from kvp_gym.scorers import Scorer, ScoringView, get, score_one_head
from kvp_gym.traces.dataset import Trace
from kvp_gym.utility.golden import GoldenSchedule, golden_eviction_schedule


def _batched_tensors(obs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
    """Observation (single or batched, numpy or torch) -> batched tensors, and whether it was batched."""
    tensors = {key: torch.as_tensor(value) for key, value in obs.items()}
    batched = tensors["keys"].dim() == 3
    if not batched:
        tensors = {key: value.unsqueeze(0) for key, value in tensors.items()}
    return tensors, batched


def obs_to_view(obs: dict[str, Any], spec: ModelSpec) -> ScoringView:
    """Env observations [B, N, ...] (or one [N, ...]) -> a ScoringView with H = 1.

    keys/values [B, 1, N, d], positions [B, N], mask [B, N] (real entries, protected included),
    layer [B], kv_heads [B, 1], and when present queries [B, 1, G, w, d], query_positions [B, w],
    attention [B, 1, G, N], future_importance [B, 1, N]; rope_theta from ``spec``. The view holds every
    input the observation has: consumers score it through ``kvp_gym.scorers.score_one_head``, which
    hands each scorer only the inputs it declares (``declared_view``).
    """
    t, _ = _batched_tensors(obs)
    batch = t["keys"].shape[0]
    optional = {
        name: t[name].unsqueeze(1)
        for name in ("queries", "attention", "future_importance")
        if name in t
    }
    return ScoringView(
        keys=t["keys"].unsqueeze(1),
        values=t["values"].unsqueeze(1),
        positions=t["positions"].long(),
        mask=t["mask"].bool(),
        layer=t["layer"].long().reshape(batch),
        kv_heads=t["kv_head"].long().reshape(batch, 1),
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        query_positions=t["query_positions"].long() if "query_positions" in t else None,
        rope_theta=spec.rope_theta,
        **optional,
    )


def ranked_entries(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, N] (or [N]) the entries an action ranks: real and not protected."""
    return obs["mask"].bool() & ~obs["protected"].bool()


def _like(scores: torch.Tensor, obs: dict[str, Any], batched: bool) -> Any:
    """Scores [B, N] float32 in the observation's form: numpy or torch, batched or not."""
    scores = scores.detach().float()
    scores = scores if batched else scores[0]
    return scores if isinstance(obs["keys"], torch.Tensor) else scores.numpy()


class ScorerPolicy:
    """Any Scorer (or a registered scorer's name) as a policy of KVEvict-v0 / KVEvictStream-v0."""

    def __init__(self, scorer: Scorer | str, spec: ModelSpec, **config: Any) -> None:
        self.scorer = get(scorer, **config) if isinstance(scorer, str) else scorer
        self.spec = spec

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> Any:
        """Scores [N] (or [B, N] for a batch), higher = keep, as numpy or torch like ``obs``."""
        _, batched = _batched_tensors(obs)
        return _like(score_one_head(self.scorer, obs_to_view(obs, self.spec)), obs, batched)


class GoldenPolicy:
    """Replays ForesightKV's golden eviction schedule in KVEvictStream-v0.

    ``act(obs, info)`` scores 0 the entries the schedule evicts at this step and 1 the others; it
    reads the trace from ``info["trace"]`` and the layer, head and step from the observation.
    The schedule may evict sinks, which the env protects: make the env with sink=0 to replay it exactly.
    """

    def __init__(self, traces: Sequence[Trace], budget: int, step: int) -> None:
        self.traces, self.budget, self.step = traces, budget, step
        self._schedules: dict[tuple[int, int], GoldenSchedule] = {}

    @classmethod
    def from_env(cls, env: Any) -> GoldenPolicy:
        env = env.unwrapped
        return cls(env.traces, env.budget, env.step_size)

    def schedule(self, trace: int, layer: int) -> GoldenSchedule:
        if (trace, layer) not in self._schedules:
            self._schedules[trace, layer] = golden_eviction_schedule(self.traces[trace], layer, self.budget, self.step)
        return self._schedules[trace, layer]

    def act(self, obs: dict[str, Any], info: dict[str, Any]) -> Any:
        """Scores [N] (or [B, N]) as numpy or torch like ``obs``."""
        t, batched = _batched_tensors(obs)
        traces = torch.as_tensor(info["trace"]).reshape(-1).tolist()
        scores = torch.ones(t["positions"].shape, dtype=torch.float32)
        for row, trace in enumerate(traces):
            positions = t["positions"][row]
            step = (int(positions.max()) + 1 - self.budget) // self.step - 1
            evicted = self.schedule(trace, int(t["layer"][row])).evicted[step, int(t["kv_head"][row])]
            scores[row, torch.isin(positions, evicted)] = 0.0
        return _like(scores, obs, batched)
