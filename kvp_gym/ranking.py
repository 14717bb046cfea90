"""The two rules every consumer of scores shares: which entries are protected, and how scores rank.

Protected entries (the first ``sink`` and the last ``recent`` real entries, in position order) are
kept by every policy and never ranked; an entry that is both a sink and recent counts once, and
padding is never protected. The other real entries are *ranked*: by descending score, ties broken
by position (the earlier entry ranks first), so every ranking is deterministic. The env's reward,
the leaderboard and the evicting cache's top-b selection all go through ``ranking_order``.

By default every KV head keeps the same number of entries. ``shared_head_budgets`` is AdaKV's alternative, a layer's
budget shared across its heads by comparing their scores (``examples/head_budgets.py`` measures it with masks);
``split_budget`` shares it by fixed per-head shares (``kvp_gym.cache.HeadShares``, which the cache runs).

Shapes: [..., N] over N entries held in position order (ascending positions, padding anywhere).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Protected:
    """The always-kept tokens: the first ``sink`` and the last ``recent`` real entries."""

    sink: int = 4
    recent: int = 16

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"sink and recent must be >= 0, got sink={self.sink}, recent={self.recent}")

    def mask(self, real: torch.Tensor) -> torch.Tensor:
        """real [..., N] (True = real entry, entries in position order) -> protected [..., N]."""
        from_start = real.cumsum(-1)
        from_end = real.flip(-1).cumsum(-1).flip(-1)
        return real & ((from_start <= self.sink) | (from_end <= self.recent))

    def ranked(self, real: torch.Tensor) -> torch.Tensor:
        """real [..., N] -> ranked [..., N]: the real entries that are not protected."""
        return real & ~self.mask(real)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Protected:
        """From a checkpoint header's ``protected`` (missing keys take the defaults)."""
        return cls(**{field.name: int(values[field.name]) for field in dataclasses.fields(cls) if field.name in values})


DEFAULT_PROTECTED = Protected()


def ranking_order(scores: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Indices [..., N]: the ranked entries by descending score, ties by position, then the others by position.

    scores [..., N] float, ranked [..., N] bool. NaN and -inf rank lowest among ranked entries and
    +inf highest, so a ranked entry always comes before an unranked one.
    """
    lowest = torch.finfo(scores.dtype).min
    keys = torch.where(scores.isnan() | (scores == float("-inf")), lowest, scores)
    keys = keys.masked_fill(~ranked, float("-inf"))
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


def shared_head_budgets(scores: torch.Tensor, kept: int, safeguard: float = 0.2) -> torch.Tensor:
    """AdaKV's allocation (kvpress ``AdaKVPress``): how many entries each of a layer's H KV heads keeps when the
    heads share one budget of H * kept instead of keeping kept each.

    scores [H, M] (each head's ranked entries) -> counts [H] (long, summing to H * kept): every head keeps its top
    floor(safeguard * kept); the other H * (kept - floor(safeguard * kept)) are the highest of all the heads'
    remaining entries (ties: the earlier head, then the earlier entry). The scores must be comparable across heads
    (an attention share, the future importance), not only within one.
    """
    heads, entries = scores.shape
    if not 0 <= kept <= entries or not 0.0 <= safeguard <= 1.0:
        raise ValueError(f"kept must lie in [0, {entries}] and safeguard in [0, 1], got {kept} and {safeguard}")
    floor = int(safeguard * kept)
    reserved = top_entries(scores, torch.full((heads,), floor, device=scores.device))
    rest = ranking_order(scores.flatten(), ~reserved.flatten())[: heads * (kept - floor)]
    return floor + torch.bincount(rest // entries, minlength=heads)


def split_budget(shares: torch.Tensor, kept: int, capacity: int) -> torch.Tensor:
    """counts [H] (long, summing to H * kept): H * kept entries split across H heads in proportion to ``shares`` [H]
    (non-negative), the remainders to the largest fractional parts (ties: the earlier head), no head above
    ``capacity`` (its excess goes to the others, again by their shares)."""
    heads = shares.shape[0]
    if not 0 <= kept <= capacity or bool((shares < 0).any()) or not bool(shares.isfinite().all()):
        raise ValueError(f"kept must lie in [0, capacity={capacity}] and shares be finite and >= 0, got kept={kept}, "
                         f"shares={shares.tolist()}")
    counts = torch.zeros(heads, dtype=torch.long)
    open_heads = torch.ones(heads, dtype=torch.bool)
    while True:
        remaining = heads * kept - int(counts[~open_heads].sum())
        weights = torch.where(open_heads, shares.double().cpu(), 0.0)
        weights = weights if float(weights.sum()) > 0 else open_heads.double()
        raw = weights / weights.sum() * remaining
        share = raw.floor().long()
        remainder = torch.where(open_heads, raw - share, -1.0)
        share[torch.argsort(remainder, descending=True, stable=True)[: remaining - int(share.sum())]] += 1
        over = open_heads & (share > capacity)
        if not bool(over.any()):
            counts[open_heads] = share[open_heads]
            return counts.to(shares.device)
        counts[over] = capacity
        open_heads &= ~over


def top_entries(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """keep [H, M] bool: each head's top ``counts[h]`` entries by ``ranking_order``. scores [H, M], counts [H]."""
    order = ranking_order(scores, torch.ones_like(scores, dtype=torch.bool))
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, places)
    return rank < counts[:, None]
