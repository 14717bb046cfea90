"""Ranking quality: policies scored on the very same KVEvict-v0 episodes.

``RankingEvaluator`` resets a batched env core on fixed episodes (same seed, pinned options) and
steps it once per policy, which leaves the episodes untouched: training runs use it on sampled
episodes. ``SuiteRanking`` is the leaderboard's: the grid of every (trace, layer, KV head, prefix n)
with n at the suite's prefix fractions of the trace length, one trace at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvp_gym.envs.adapters import obs_to_view
from kvp_gym.envs.kv_evict import KVEvictCore
from kvp_gym.envs.reward import kept_fraction_at
from kvp_gym.eval.suite import Suite
from kvp_gym.scorers import Scorer, score_one_head
from kvp_gym.traces import TraceDataset

CURVE_FRACTIONS = tuple(float(f) for f in np.linspace(0.05, 1.0, 20))
SUMMARY_KEYS = ("cost_ratio", "kept_fraction_10", "kept_fraction_25", "kept_fraction_50")


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
    """The env core that holds a whole trace's grid. It computes every optional input once; each scorer
    sees only the ones it declares (``score_one_head`` passes the view through ``declared_view``), so
    only future-only scorers (upper bounds) read ``future_importance``."""
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
    """Policies on the fixed episodes of one KVEvict-v0 core: every call resets it from ``seed``."""

    def __init__(self, core: KVEvictCore, seed: int) -> None:
        self.core, self.seed = core, seed
        self.spec = core.source.spec

    @torch.no_grad()
    def step_infos(self, policies: Mapping[str, Scorer], options: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The step info (cost_ratio [E], kept fractions [E], ...) of each policy on the same E episodes."""
        self.core.reset(np.random.default_rng(self.seed), options=options)
        view = obs_to_view(self.core.observation(), self.spec)
        return {name: self.core.step(score_one_head(scorer, view).float())[2] for name, scorer in policies.items()}

    def summary(self, scorer: Scorer, options: dict[str, Any] | None = None) -> dict[str, float]:
        """Mean cost ratio and kept attention at 10/25/50 % budgets; ``options`` pins e.g. one (layer, kv_head)."""
        info = self.step_infos({"policy": scorer}, options)["policy"]
        return {key: info[key].double().mean().item() for key in SUMMARY_KEYS}

    def per_head(self, scorer: Scorer, heads: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, float]]:
        """The summary with every episode pinned to one head, for each of ``heads``."""
        return {(layer, head): self.summary(scorer, {"layer": layer, "kv_head": head}) for layer, head in heads}


class SuiteRanking(RankingEvaluator):
    """Scores policies on the episode grid of one suite's trace set, one trace at a time, one layer's episodes
    per step: the env core holds one layer's tensors at a time (at 4k tokens, a whole trace's ~10 GB)."""

    def __init__(self, suite: Suite, source: str, dataset: TraceDataset) -> None:
        rows_per_layer = dataset.spec.num_kv_heads * len(suite.prefix_fractions)
        super().__init__(make_core(suite, dataset, rows_per_layer), suite.seed)
        self.suite, self.source, self.dataset = suite, source, dataset

    def evaluate(self, trace: int, policies: Mapping[str, Scorer]) -> list[dict[str, Any]]:
        """One record per policy: per-episode cost ratios and kept fractions, and the mean kept curve."""
        grid = episode_grid(self.suite, self.dataset, trace)
        rows = self.core.num_rows
        chunks = [{key: values[start : start + rows] for key, values in grid.items()} for start in range(0, len(grid["n"]), rows)]
        infos: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in policies}
        for chunk in chunks:  # grid order is layer-major: one chunk is one layer's (kv_head, n) episodes
            for name, info in self.step_infos(policies, chunk).items():
                curve = kept_fraction_at(info["curve"], self.core.ranked, CURVE_FRACTIONS)
                infos[name].append({**{key: info[key] for key in SUMMARY_KEYS}, "curve": curve})
        records = []
        for name, chunk_infos in infos.items():
            info = {key: torch.cat([chunk[key] for chunk in chunk_infos]) for key in (*SUMMARY_KEYS, "curve")}
            records.append({
                "policy": name,
                "source": self.source,
                "trace": trace,
                "layer": grid["layer"].tolist(),
                "kv_head": grid["kv_head"].tolist(),
                "n": grid["n"].tolist(),
                "cost_ratio": info["cost_ratio"].tolist(),
                **{f"kept_fraction_{p}": info[f"kept_fraction_{p}"].tolist() for p in (10, 25, 50)},
                "curve": info["curve"].mean(0).tolist(),
            })
        return records
