"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models"): keep the heavy hitters, the entries that have received the most attention so
far, plus the most recent entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float, pin_top
from kvp_gym.scorers import ScoringView


@dataclass
class H2O:
    """score_i = mean over the group's query heads of s_i = sum over all past queries t of A_{t,i}.

    ``view.attention [B, H, G, N]`` holds the per-query-head sums; the group mean is the
    ForesightKV / kvpress convention for GQA. Scores: [B, H, N].

    ``recent_window`` pins that many most recent real entries (by true position) to the top,
    H2O's "heavy hitters + recent" split. The default 0 gives pure heavy hitters, because every
    consumer already protects the last 16 tokens (the env, the cache); kvpress's H2O-like
    ObservedAttentionPress has no recent window either. Unlike ObservedAttentionPress, the sum is
    not divided by the number of queries that saw entry i: H2O's paper accumulates plain sums.
    """

    recent_window: int = 0
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})

    def __post_init__(self) -> None:
        if self.recent_window < 0:
            raise ValueError(f"H2O.recent_window must be >= 0, got {self.recent_window}")

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("h2o", "attention")
        heavy = as_float(view.attention).mean(dim=2)
        if self.recent_window == 0:
            return heavy
        return pin_top(heavy, _most_recent(view.positions, view.mask, self.recent_window), view.mask)


def _most_recent(positions: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, N] True for the ``count`` real entries with the largest positions (all if fewer)."""
    ranked = positions.masked_fill(~mask, torch.iinfo(positions.dtype).min)
    threshold = ranked.topk(min(count, positions.shape[-1]), dim=-1).values[:, -1:]
    return mask & (positions >= threshold)
