"""Ranking quality: every policy on the same grid of KVEvict-v0 episodes of the suite's test traces.

The grid is every (trace, layer, KV head, prefix n) with n at the suite's prefix fractions of the
trace length; every policy scores the very same observations (one reset of the batched env core per
trace, then one step per policy, which leaves the episodes untouched).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvp_gym.envs.kv_evict import KVEvictCore
from kvp_gym.envs.adapters import obs_to_view
from kvp_gym.envs.reward import kept_fraction_at
from kvp_gym.eval.suite import Suite
from kvp_gym.scorers import Scorer
from kvp_gym.traces import TraceDataset

CURVE_FRACTIONS = tuple(float(f) for f in np.linspace(0.05, 1.0, 20))


def prefix_lengths(suite: Suite, dataset: TraceDataset) -> list[int]:
    """The prefix lengths n of the grid: the suite's fractions of the set's shortest trace."""
    return [int(round(fraction * min(dataset.lengths))) for fraction in suite.prefix_fractions]


def episode_grid(suite: Suite, dataset: TraceDataset, trace: int) -> dict[str, np.ndarray]:
    """Every (layer, kv_head, n) of one trace as reset options: arrays of equal length E."""
    spec = dataset.spec
    layers, heads, ns = np.meshgrid(
        np.arange(spec.num_layers), np.arange(spec.num_kv_heads), prefix_lengths(suite, dataset), indexing="ij"
    )
    count = layers.size
    return {"trace": np.full(count, trace), "layer": layers.ravel(), "kv_head": heads.ravel(), "n": ns.ravel()}


def make_core(suite: Suite, dataset: TraceDataset, num_rows: int) -> KVEvictCore:
    """The env core that holds a whole trace's grid; it gives every scorer every optional input."""
    ns = prefix_lengths(suite, dataset)
    return KVEvictCore(
        dataset,
        prefix=(min(ns), max(ns)),
        max_tokens=max(ns),
        sink=suite.sink,
        recent=suite.recent,
        agg=suite.agg,
        obs_queries=suite.query_window,
        obs_attention=True,
        obs_future=True,
        curve=True,
        num_rows=num_rows,
    )


class RankingEvaluator:
    """Scores policies on the episode grid of one suite's trace set, one trace at a time."""

    def __init__(self, suite: Suite, source: str, dataset: TraceDataset) -> None:
        self.suite, self.source, self.dataset = suite, source, dataset
        self.core = make_core(suite, dataset, len(episode_grid(suite, dataset, 0)["n"]))
        self.rng = np.random.default_rng(suite.seed)

    @torch.no_grad()
    def evaluate(self, trace: int, policies: Mapping[str, Scorer]) -> list[dict[str, Any]]:
        """One record per policy: per-episode cost ratios and kept fractions, and the mean kept curve."""
        grid = episode_grid(self.suite, self.dataset, trace)
        self.core.reset(self.rng, options=grid)
        view = obs_to_view(self.core.observation(), self.dataset.spec)
        records = []
        for name, scorer in policies.items():
            _, _, info = self.core.step(scorer.score(view)[:, 0].float())
            curve = kept_fraction_at(info["curve"], self.core.ranked, CURVE_FRACTIONS)
            records.append({
                "policy": name,
                "source": self.source,
                "trace": trace,
                "layer": grid["layer"].tolist(),
                "kv_head": grid["kv_head"].tolist(),
                "n": grid["n"].tolist(),
                "cost_ratio": info["cost_ratio"].tolist(),
                **{f"kept_fraction_{p}": info[f"kept_fraction_{p}"].tolist() for p in (10, 25, 50)},
                "curve": curve.mean(0).tolist(),
            })
        return records
