"""The future-attention oracle: the upper bound every eviction policy is measured against.

It ranks entries by the attention they will truly receive from the rest of the sequence (KVP's
importance I(i); ForesightKV's golden scores), which only an offline trace can provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float
from kvp_gym.scorers import ScoringView


@dataclass
class Oracle:
    """score_i = view.future_importance [B, H, N], as given by the caller (env, leaderboard)."""

    needs: ClassVar[frozenset[str]] = frozenset({"future_importance"})

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("oracle", "future_importance")
        return as_float(view.future_importance)
