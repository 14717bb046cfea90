"""Fixed shares of the budget across KV heads, fitted on training texts.

AdaKV (``kvp_gym.ranking.shared_head_budgets``) splits a layer's budget across its KV heads by comparing their
scores, which needs scores comparable across heads; a learned policy's compare only within a head. A
``HeadShares`` holds instead, per budget fraction it was fitted at, the share of the ranked budget each KV head
keeps: the future-attention oracle's AdaKV split averaged over training texts. The heads' shares vary little
from text to text (std / mean 0.11-0.15 on prose, round 26), so a fixed split carries part of what the oracle's own
split is worth. The split is within each layer (``scope="layer"``: every layer keeps H * kept, its heads share it)
or across the whole model (``scope="model"``: all L * H heads share L * H * kept, so a layer whose future attention
spreads wider keeps more; round 27).

Shares can also be tuned for one ranking through the model (``agents.share_tuning``, round 28): starting from the
fitted ones, gradient descent on the continuation's loss with each head's ranking softly cut at its count. Those
for the default model ship per policy in ``tuned_shares/`` (``tuned_head_shares(policy)``).

An ``EvictingCache`` given shares keeps every head's protected tokens plus ``counts(layer, kept, ranked)`` ranked
entries per head: L * H * kept in all, the memory of equal budgets, stored as ragged heads.

Shapes: F = fitted fractions, L = layers, H = KV heads, M = ranked entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvp_gym.ranking import shared_head_budgets, split_budget

SCOPES = ("layer", "model")
DEFAULT_FILE = Path(__file__).parent / "smollm2-135m-head-shares.safetensors"
TUNED_MODEL = "smollm2-135m"  # the model the shipped tuned shares were tuned through
TUNED_DIR = Path(__file__).parent / "tuned_shares"  # <TUNED_MODEL>-<policy>.safetensors


@dataclasses.dataclass(frozen=True)
class HeadShares:
    """fractions [F] (ascending, in (0, 1)): the kept shares of the ranked entries fitted at; shares [F, L, H]: the
    split of the ranked budget at that fraction (non-negative), summing to 1 over each layer's H heads
    (``scope="layer"``) or over all L * H heads (``scope="model"``)."""

    fractions: torch.Tensor
    shares: torch.Tensor
    scope: str = "layer"

    def __post_init__(self) -> None:
        fractions, shares = self.fractions, self.shares
        if fractions.dim() != 1 or shares.dim() != 3 or shares.shape[0] != fractions.shape[0] or not len(fractions):
            raise ValueError(f"HeadShares needs fractions [F] and shares [F, L, H], got {tuple(fractions.shape)} and "
                             f"{tuple(shares.shape)}")
        if not bool(((fractions > 0) & (fractions < 1)).all()) or not bool((fractions.diff() > 0).all()):
            raise ValueError(f"HeadShares fractions must ascend within (0, 1), got {fractions.tolist()}")
        if self.scope not in SCOPES:
            raise ValueError(f"HeadShares scope must be one of {SCOPES}, got {self.scope!r}")
        totals = shares.sum(-1) if self.scope == "layer" else shares.sum((-2, -1))
        if bool((shares < 0).any()) or not torch.allclose(totals, torch.ones_like(totals), atol=1e-4):
            over = "each layer's heads" if self.scope == "layer" else "all the model's heads"
            raise ValueError(f"HeadShares shares (scope {self.scope!r}) must be >= 0 and sum to 1 over {over}")

    @property
    def num_layers(self) -> int:
        return self.shares.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.shares.shape[2]

    def nearest_fraction(self, kept: int, ranked: int) -> int:
        """The index of the fitted fraction nearest ``kept / ranked`` on a log scale (0 < kept <= ranked)."""
        return int((self.fractions.log() - math.log(kept / ranked)).abs().argmin())

    def counts(self, layer: int, kept: int, ranked: int) -> torch.Tensor:
        """counts [H] (long, none above ``ranked``): ranked entries each head of ``layer`` keeps when every head
        holds ``ranked`` and they keep ``kept`` on average, H * kept in the layer (scope "layer") or L * H * kept in
        the model (scope "model"). The split is the one fitted at the fraction nearest ``kept / ranked`` (on a log
        scale)."""
        if not 0 <= kept <= ranked:
            raise ValueError(f"kept must lie in [0, ranked={ranked}], got {kept}")
        if kept == 0:
            return torch.zeros(self.num_kv_heads, dtype=torch.long)
        shares = self.shares[self.nearest_fraction(kept, ranked)]
        if self.scope == "layer":
            return split_budget(shares[layer], kept, ranked)
        return split_budget(shares.flatten(), kept, ranked).view(self.num_layers, self.num_kv_heads)[layer]

    @classmethod
    def fit(cls, importances: Iterable[torch.Tensor], fractions: Sequence[float], safeguard: float = 0.2,
            scope: str = "layer") -> HeadShares:
        """The mean over texts of the oracle's AdaKV split, within each layer or across the model (``scope``).
        importances: per text, [L, H, M] the future attention each ranked entry receives
        (``kvp_gym.eval.oracle.trace_importance`` without the protected entries)."""
        if scope not in SCOPES:
            raise ValueError(f"HeadShares scope must be one of {SCOPES}, got {scope!r}")
        fitted = torch.tensor(sorted(fractions), dtype=torch.float64)
        totals, texts = None, 0
        for importance in importances:
            ranked = importance.shape[-1]
            split = torch.stack([
                _oracle_split(importance, max(1, int(fraction * ranked)), safeguard, scope) for fraction in fitted.tolist()
            ]).double()  # [F, L, H]
            split = split / (split.sum(-1, keepdim=True) if scope == "layer" else split.sum((-2, -1), keepdim=True))
            totals = split if totals is None else totals + split
            texts += 1
        if not texts:
            raise ValueError("HeadShares.fit needs at least one text's importance")
        return cls(fitted.float(), (totals / texts).float(), scope)

    def save(self, path: str | Path) -> Path:
        save_file({"fractions": self.fractions.contiguous(), "shares": self.shares.contiguous()}, str(path),
                  metadata={"scope": self.scope})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> HeadShares:
        tensors = load_file(str(path))
        missing = {"fractions", "shares"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a HeadShares file: it lacks {sorted(missing)}")
        with safe_open(str(path), "pt") as file:
            scope = (file.metadata() or {}).get("scope", "layer")  # files before round 27 split within layers
        return cls(tensors["fractions"], tensors["shares"], scope)


def _oracle_split(importance: torch.Tensor, kept: int, safeguard: float, scope: str) -> torch.Tensor:
    """counts [L, H]: AdaKV's split of importance [L, H, M] within each layer (H * kept each) or across the model
    (L * H * kept)."""
    if scope == "layer":
        return torch.stack([shared_head_budgets(layer, kept, safeguard) for layer in importance])
    layers, heads, ranked = importance.shape
    return shared_head_budgets(importance.reshape(layers * heads, ranked), kept, safeguard).view(layers, heads)


@functools.cache
def default_head_shares() -> HeadShares:
    """The shares fitted for the default model, SmolLM2-135M (``python -m agents.head_shares``; how: the README)."""
    return HeadShares.load(DEFAULT_FILE)


def tuned_policies() -> list[str]:
    """The policies with shares tuned for their ranking on the default model."""
    return sorted(path.stem.removeprefix(f"{TUNED_MODEL}-") for path in TUNED_DIR.glob(f"{TUNED_MODEL}-*.safetensors"))


@functools.cache
def tuned_head_shares(policy: str) -> HeadShares:
    """The shares tuned through SmolLM2-135M for ``policy``'s ranking (``python -m agents.share_tuning``)."""
    path = TUNED_DIR / f"{TUNED_MODEL}-{policy}.safetensors"
    if not path.is_file():
        raise KeyError(f"no head shares are tuned for {policy!r}; tuned for: {', '.join(tuned_policies())}")
    return HeadShares.load(path)
