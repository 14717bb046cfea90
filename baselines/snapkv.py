"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

The last ``window_size`` queries (the observation window) vote for the earlier keys they attend
to; the votes are smoothed over neighbouring tokens, and the window itself is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import avg_pool_in_position_order, pin_top, window_attention
from kvp_gym.scorers import ScoringView


@dataclass
class SnapKV:
    """kvpress SnapKVPress, defaults window_size=64, kernel_size=5 (average pooling).

    With w = min(window_size, queries in the view) and A = causal softmax(q.k / sqrt(d)) of the
    last w queries over the view's keys (``view.queries [B, H, G, w, d]``):

        s_i = avg_pool1d_i( mean over window queries t and group heads g of A^g_{t,i} )

    for keys before the window, pooled over those keys in position order (kernel k, stride 1,
    zero padding k // 2 counted in the average). The window keys (positions >= the first window
    query's) are pinned above every other entry: the SnapKV paper keeps the window outright;
    kvpress pads it with the maximum score, which can tie. Scores: [B, H, N].
    """

    window_size: int = 64
    kernel_size: int = 5
    needs: ClassVar[frozenset[str]] = frozenset({"queries"})

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"SnapKV.window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SnapKV.kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.kernel_size > self.window_size:
            raise ValueError(
                f"SnapKV.kernel_size ({self.kernel_size}) must not exceed window_size ({self.window_size})"
            )

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("snapkv", "queries")
        window = min(self.window_size, view.queries.shape[-2])
        votes = window_attention(view, window).mean(dim=(2, 3))
        first_query = view.query_positions[:, -window:].amin(dim=-1, keepdim=True)
        in_window = view.mask & (view.positions >= first_query)
        pooled = avg_pool_in_position_order(votes, view.mask & ~in_window, view.positions, self.kernel_size)
        return pin_top(pooled, in_window, view.mask)
