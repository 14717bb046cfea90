"""StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first ``n_sink`` "attention sink" tokens plus the most recent ones; evict the middle.
As a ranking: the sinks first, then every other entry by recency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float, pin_top
from kvp_gym.scorers import ScoringView


@dataclass
class StreamingLLM:
    """Sinks + recency, from true positions (so it stays right after earlier evictions).

    score_i = position_i, and the sinks (entries with position < n_sink) get one score above all
    others. kvpress's StreamingLLMPress gives the sinks and the kept window the same score 1; the
    two agree on which entries survive at every budget. Scores: [B, H, N].
    """

    n_sink: int = 4
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"StreamingLLM.n_sink must be >= 0, got {self.n_sink}")

    def score(self, view: ScoringView) -> torch.Tensor:
        b, h, n = view.shape
        recency = as_float(view.positions)[:, None, :].expand(b, h, n)
        sinks = view.mask & (view.positions < self.n_sink)
        return pin_top(recency, sinks, view.mask)
