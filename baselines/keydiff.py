"""KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keep the keys
least similar to the average key direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from baselines._attention import as_float
from kvp_gym.scorers import ScoringView


@dataclass
class KeyDiff:
    """score_i = -cos(k_i, anchor), anchor = mean of the L2-normalised real keys of the head.

    This is kvpress's one-shot KeyDiffPress; the paper's block-wise variant scores the sequence
    block by block (an eviction schedule, not a different score). Keys [B, H, N, d] -> [B, H, N].
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: ScoringView) -> torch.Tensor:
        keys = as_float(view.keys)
        real = view.mask[:, None, :, None]
        unit = torch.where(real, F.normalize(keys, dim=-1), 0.0)
        count = view.mask.sum(dim=-1).clamp_min(1)[:, None, None, None]
        anchor = unit.sum(dim=2, keepdim=True) / count
        return -F.cosine_similarity(keys, anchor, dim=-1)
