"""kvpress's ObservedAttentionPress, the normalised H2O: the attention an entry has received so far,
divided by the number of queries that could attend to it, so old entries are not favoured merely
for having been seen by more queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float
from kvp_gym.scorers import ScoringView


@dataclass
class ObservedAttention:
    """kvpress ObservedAttentionPress (registered as ``h2o-norm``):

        s_i = mean over the group's query heads g of  (sum over past queries t of A^g_{t,i}) / c_i
        c_i = p_new + 1 - p_i

    ``view.attention [B, H, G, N]`` is the sum over every past query (the env: every query j < n of
    the trace, or < the chunk end in the stream env; the cache: every query since the prefill, its
    padding queries adding nothing). A query at position p sees the keys at positions <= p, and
    entries are only ever removed, never re-added, so entry i has been seen by exactly the real
    queries at positions p_i .. p_new, where p_new is the newest real entry of the row (the current
    token, which every consumer holds: protected as recent, or the stream env's appended chunk).
    This is kvpress's ``T - i`` on a prefill of T tokens, and it stays right after earlier
    compressions and with left padding (true positions, not slots). Scores: [B, H, N].
    """

    needs: ClassVar[frozenset[str]] = frozenset({"attention"})

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("h2o-norm", "attention")
        received = as_float(view.attention).mean(dim=2)  # [B, H, N]
        newest = view.positions.masked_fill(~view.mask, torch.iinfo(view.positions.dtype).min).amax(-1, keepdim=True)
        seen_by = (newest + 1 - view.positions).clamp(min=1)  # [B, N]; padding clamped, ignored anyway
        return received / seen_by[:, None, :].to(received.dtype)
