"""K-Norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keys with a low L2 norm tend to receive high attention, so keep them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float
from kvp_gym.scorers import ScoringView


@dataclass
class KNorm:
    """score_i = -||k_i||_2 over the head dim (kvpress KnormPress). Keys [B, H, N, d] -> [B, H, N]."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: ScoringView) -> torch.Tensor:
        return -torch.linalg.vector_norm(as_float(view.keys), dim=-1)
