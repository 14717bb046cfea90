"""Fixed per-head shares of each layer's budget, fitted on training texts.

AdaKV (``kvp_gym.ranking.shared_head_budgets``) splits a layer's budget across its KV heads by comparing their
scores, which needs scores comparable across heads; a learned policy's compare only within a head. A
``HeadShares`` holds instead, per budget fraction it was fitted at, the share of a layer's ranked budget each KV
head keeps: the future-attention oracle's AdaKV split averaged over training texts. The heads' shares vary little
from text to text (std / mean 0.11-0.15 on prose, round 26), so a fixed split carries part of what the oracle's own
split is worth.

An ``EvictingCache`` given shares keeps every head's protected tokens plus ``counts(layer, kept, ranked)`` ranked
entries per head, H * kept in all: the memory of equal budgets, stored as ragged heads.

Shapes: F = fitted fractions, L = layers, H = KV heads, M = ranked entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvp_gym.ranking import shared_head_budgets, split_budget

DEFAULT_FILE = Path(__file__).parent / "smollm2-135m-head-shares.safetensors"


@dataclasses.dataclass(frozen=True)
class HeadShares:
    """fractions [F] (ascending, in (0, 1)): the kept shares of the ranked entries fitted at; shares [F, L, H]: each
    layer's split of its ranked budget at that fraction (non-negative, summing to 1 over H)."""

    fractions: torch.Tensor
    shares: torch.Tensor

    def __post_init__(self) -> None:
        fractions, shares = self.fractions, self.shares
        if fractions.dim() != 1 or shares.dim() != 3 or shares.shape[0] != fractions.shape[0] or not len(fractions):
            raise ValueError(f"HeadShares needs fractions [F] and shares [F, L, H], got {tuple(fractions.shape)} and "
                             f"{tuple(shares.shape)}")
        if not bool(((fractions > 0) & (fractions < 1)).all()) or not bool((fractions.diff() > 0).all()):
            raise ValueError(f"HeadShares fractions must ascend within (0, 1), got {fractions.tolist()}")
        if bool((shares < 0).any()) or not torch.allclose(shares.sum(-1), torch.ones(shares.shape[:2], dtype=shares.dtype),
                                                            atol=1e-4):
            raise ValueError("HeadShares shares must be >= 0 and sum to 1 over each layer's heads")

    @property
    def num_layers(self) -> int:
        return self.shares.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.shares.shape[2]

    def counts(self, layer: int, kept: int, ranked: int) -> torch.Tensor:
        """counts [H] (long, summing to H * kept, none above ``ranked``): ranked entries each head of ``layer``
        keeps when the heads hold ``ranked`` each and keep ``kept`` on average. The split is the one fitted at the
        fraction nearest ``kept / ranked`` (on a log scale)."""
        if not 0 <= kept <= ranked:
            raise ValueError(f"kept must lie in [0, ranked={ranked}], got {kept}")
        if kept == 0:
            return torch.zeros(self.num_kv_heads, dtype=torch.long)
        distance = (self.fractions.log() - math.log(kept / ranked)).abs()
        return split_budget(self.shares[int(distance.argmin()), layer], kept, ranked)

    @classmethod
    def fit(cls, importances: Iterable[torch.Tensor], fractions: Sequence[float], safeguard: float = 0.2) -> HeadShares:
        """The mean over texts of the oracle's AdaKV split. importances: per text, [L, H, M] the future attention each
        ranked entry receives (``kvp_gym.eval.oracle.trace_importance`` without the protected entries)."""
        fitted = torch.tensor(sorted(fractions), dtype=torch.float64)
        totals, texts = None, 0
        for importance in importances:
            ranked = importance.shape[-1]
            split = torch.stack([
                torch.stack([shared_head_budgets(layer, max(1, int(fraction * ranked)), safeguard) for layer in importance])
                for fraction in fitted.tolist()
            ]).double()  # [F, L, H]
            split = split / split.sum(-1, keepdim=True)
            totals = split if totals is None else totals + split
            texts += 1
        if not texts:
            raise ValueError("HeadShares.fit needs at least one text's importance")
        return cls(fitted.float(), (totals / texts).float())

    def save(self, path: str | Path) -> Path:
        save_file({"fractions": self.fractions.contiguous(), "shares": self.shares.contiguous()}, str(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> HeadShares:
        tensors = load_file(str(path))
        missing = {"fractions", "shares"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a HeadShares file: it lacks {sorted(missing)}")
        return cls(tensors["fractions"], tensors["shares"])


@functools.cache
def default_head_shares() -> HeadShares:
    """The shares fitted for the default model, SmolLM2-135M (``python -m agents.head_shares``; how: the README)."""
    return HeadShares.load(DEFAULT_FILE)
