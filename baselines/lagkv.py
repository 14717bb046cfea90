"""LagKV (Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens
Are Important"): attention-free scores from how much a token's key and value stand out against
the token range of the partition that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from baselines._attention import as_float, position_order
from kvp_gym.scorers import ScoringView


@dataclass
class LagKV:
    """kvpress LagKVPress, defaults n_sink=4, lag_size=128.

    The real entries, in position order (the cache order), are split into ``n_sink`` sinks and
    then partitions of ``lag_size`` entries. Each partition is scored against the next one (its
    reference): every key is min-max normalised per channel with the reference's min and max,
    its std over channels is taken and softmaxed within the partition; the same for values, and
    the two are averaged. Unless ``cross_scoring``, a score is then replaced by its rank within
    the partition divided by lag_size (in [0, 1)), so every partition loses the same share.
    The sinks and the tail (the last full partition, which has no reference, plus the remainder)
    score 1. A row with fewer than n_sink + 2 * lag_size real entries has no scored partition:
    its sinks score 1 and the rest rank by recency, (j - n_sink) / (n - n_sink) for the j-th entry.

    Channels whose reference range is 0 (kvpress divides by 0 there) are divided by the dtype's
    epsilon instead, to keep scores finite. Keys and values [B, H, N, d] -> scores [B, H, N].
    """

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"LagKV.n_sink must be >= 0, got {self.n_sink}")
        if self.lag_size < 1:
            raise ValueError(f"LagKV.lag_size must be >= 1, got {self.lag_size}")

    def score(self, view: ScoringView) -> torch.Tensor:
        b, h, n = view.shape
        sink, lag = self.n_sink, self.lag_size
        order = position_order(view.positions, view.mask)
        n_real = view.mask.sum(dim=-1, keepdim=True)  # [B, 1]

        # Line every row up in position order, padding last, and cut it into partitions.
        n_parts = max(-(-(n - sink) // lag), 0)
        length = sink + n_parts * lag
        keys = _line_up(as_float(view.keys), order, length)
        values = _line_up(as_float(view.values), order, length)
        part_scores = torch.zeros(b, h, length, dtype=keys.dtype, device=keys.device)
        if n_parts >= 2:
            scores = (self._states_score(keys[:, :, sink:]) + self._states_score(values[:, :, sink:])) / 2
            if not self.cross_scoring:
                scores = scores.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(keys.dtype) / lag
            part_scores[:, :, sink : length - lag] = scores.flatten(2)

        # j = index in position order; partition p is scored when its reference p + 1 is full.
        j = torch.arange(length, device=keys.device)[None, :]
        part = torch.div(j - sink, lag, rounding_mode="floor")
        full_parts = torch.div(n_real - sink, lag, rounding_mode="floor")
        scored = (j >= sink) & (part <= full_parts - 2)
        compressed = n_real >= sink + 2 * lag
        recency = (j - sink).to(keys.dtype) / (n_real - sink).clamp_min(1).to(keys.dtype)
        fallback = torch.where(compressed | (j < sink), 1.0, recency)
        lined_up = torch.where(scored[:, None, :], part_scores, fallback[:, None, :])

        scatter_index = order[:, None, :].expand(b, h, n)
        return torch.empty_like(lined_up[..., :n]).scatter(-1, scatter_index, lined_up[..., :n])

    def _states_score(self, states: torch.Tensor) -> torch.Tensor:
        """[B, H, P * lag, d] partitioned states -> softmaxed lag-relative std [B, H, P - 1, lag]."""
        b, h, length, d = states.shape
        parts = states.reshape(b, h, length // self.lag_size, self.lag_size, d)
        target, reference = parts[:, :, :-1], parts[:, :, 1:]
        low = reference.amin(dim=-2, keepdim=True)
        spread = (reference.amax(dim=-2, keepdim=True) - low).clamp_min(torch.finfo(states.dtype).eps)
        return ((target - low) / spread).std(dim=-1).softmax(dim=-1)


def _line_up(states: torch.Tensor, order: torch.Tensor, length: int) -> torch.Tensor:
    """Gather states [B, H, N, d] into position order and zero-pad the entry axis to ``length``."""
    b, h, n, d = states.shape
    lined_up = states.gather(2, order[:, None, :, None].expand(b, h, n, d))
    return F.pad(lined_up, (0, 0, 0, length - n))
