"""Traces with chosen queries and keys, for results computable by hand (imported by the tests)."""

from __future__ import annotations

import dataclasses

import torch

from kvp_gym.models import ModelSpec


@dataclasses.dataclass
class HandTrace:
    """One layer with chosen q/k: q [Hq, T, d], k [Hkv, T, d]; values are -k."""

    queries: torch.Tensor
    keys: torch.Tensor

    @property
    def length(self) -> int:
        return self.queries.shape[1]

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("hand", 1, self.queries.shape[0], self.keys.shape[0], self.queries.shape[2], 1e4)

    def q(self, layer: int) -> torch.Tensor:
        return self.queries

    def k(self, layer: int) -> torch.Tensor:
        return self.keys

    def v(self, layer: int) -> torch.Tensor:
        return -self.keys
