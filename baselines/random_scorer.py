"""Random eviction: uniform scores, the floor every policy must beat (kvpress RandomPress)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvp_gym.scorers import ScoringView


@dataclass
class RandomScorer:
    """score_i ~ U(0, 1), i.i.d., shape [B, H, N].

    The scorer owns a ``torch.Generator`` seeded with ``seed`` at construction: every call draws
    fresh scores (so episodes get independent rankings), and two scorers built with the same seed
    produce the same sequence of scores. kvpress instead re-seeds the global RNG on every call,
    which would give every equally-shaped view the very same ranking.
    """

    seed: int = 0
    needs: ClassVar[frozenset[str]] = frozenset()
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, view: ScoringView) -> torch.Tensor:
        dtype = torch.promote_types(view.keys.dtype, torch.float32)
        return torch.rand(view.shape, generator=self._generator, dtype=dtype).to(view.keys.device)
