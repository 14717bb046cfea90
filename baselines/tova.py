"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the entries the current
(last) query attends to most, one decision per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import pin_top, window_attention
from kvp_gym.scorers import ScoringView


@dataclass
class TOVA:
    """kvpress TOVAPress: s_i = attention of the last query on key i, averaged over heads.

    The last query of ``view.queries [B, H, G, w, d]`` attends causally over the view's keys; its
    attention is averaged over all H * G query heads of the view and the same score is copied to
    every KV head. When the view holds every KV head of the layer this is kvpress's mean over all
    heads of the layer; with one KV head per view (the per-head env) it is that head's group mean.
    The key(s) at or after the last query's position (its own token) are pinned above every other
    entry; kvpress pads them with the maximum score (a possible tie) and the paper pins nothing,
    noting that this weight is almost always high anyway. Scores: [B, H, N].
    """

    needs: ClassVar[frozenset[str]] = frozenset({"queries"})

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("tova", "queries")
        b, h, n = view.shape
        attention = window_attention(view, 1).mean(dim=(1, 2, 3))
        current = view.mask & (view.positions >= view.query_positions[:, -1:])
        return pin_top(attention[:, None, :].expand(b, h, n), current, view.mask)
