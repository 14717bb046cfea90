"""The two rules every consumer of scores shares: which entries are protected, and how scores rank.

Protected entries (the first ``sink`` and the last ``recent`` real entries, in position order) are
kept by every policy and never ranked; an entry that is both a sink and recent counts once, and
padding is never protected. The other real entries are *ranked*: by descending score, ties broken
by position (the earlier entry ranks first), so every ranking is deterministic. The env's reward,
the leaderboard and the evicting cache's top-b selection all go through ``ranking_order``.

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
