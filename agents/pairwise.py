"""ForesightKV's supervised stage: a pairwise hinge loss that teaches the scorer the oracle's order.

For every pair (i, j) of entries whose target says i should be kept before j, the loss is

    max(0, m - (s_i - s_j)),   m = 0.01 (ForesightKV's ``PairwiseRankHingeLoss``)

averaged over the pairs of each row, then over rows. Only unprotected real entries take part.

- KVEvict-v0 (``stream=False``): the target is the true future importance I of each entry, which
  the env adds to the observation with ``obs_future=True`` (oracle information: training only). Every
  ordered pair with I_i > I_j counts.
- KVEvictStream-v0 (``stream=True``): the target is ForesightKV's golden eviction schedule, with the
  states teacher-forced along it (the env steps with the golden action,
  ``kvp_gym.envs.adapters.GoldenPolicy``). Pairs are (golden-kept, golden-evicted) among the evictable
  entries. The schedule may evict a sink that the env protects; such an entry has no pair, and the
  env then evicts one other entry by tie-break, so the forced states follow the schedule closely but
  not exactly unless the env is made with ``sink=0``.

ForesightKV: Adam, lr 1e-2, cosine schedule with 10 warm-up steps, gradient clipping at 1.0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import torch

from agents.common import ScheduledOptimizer
from agents.mlp_scorer import PerHeadMLPScorer
from kvp_gym.envs.adapters import GoldenPolicy, obs_to_view, ranked_entries
from kvp_gym.scorers import score_one_head


@dataclasses.dataclass
class PairwiseConfig:
    """Hyperparameters (ForesightKV's defaults)."""

    stream: bool = False
    states: int = 16
    margin: float = 0.01
    lr: float = 1e-2
    lr_min: float = 1e-6
    warmup: int = 10
    max_grad_norm: float = 1.0


def pairwise_hinge(scores: torch.Tensor, better: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge loss over ordered pairs: scores [B, N], better [B, N, N] (i should outrank j) -> scalar.

    Each row's loss is the mean over its pairs; rows without pairs are left out of the mean over rows.
    """
    hinge = (margin - (scores[:, :, None] - scores[:, None, :])).clamp_min(0.0)  # [B, i, j]
    pairs = better.sum(dim=(1, 2))
    per_row = (hinge * better).sum(dim=(1, 2)) / pairs.clamp_min(1)
    has_pairs = pairs > 0
    return per_row[has_pairs].mean() if has_pairs.any() else scores.sum() * 0.0


class PairwiseAgent:
    """Supervised pairwise ranking on KVEvict-v0 (``stream=False``) or KVEvictStream-v0 (``stream=True``)."""

    def __init__(
        self, scorer: PerHeadMLPScorer, traces: Any, env_kwargs: dict[str, Any], config: PairwiseConfig, total_steps: int
    ) -> None:
        self.scorer, self.config = scorer, config
        self.env_id = "KVEvictStream-v0" if config.stream else "KVEvict-v0"
        extra = {} if config.stream else {"obs_future": True}
        self.env = gym.make_vec(
            self.env_id, num_envs=config.states, vectorization_mode="vector_entry_point",
            as_torch=True, traces=traces, **env_kwargs, **extra,
        )
        self.spec = self.env.unwrapped.model_spec
        self.protected = self.env.unwrapped.protected  # what the checkpoint records as always kept
        self.golden = GoldenPolicy.from_env(self.env) if config.stream else None
        self.optimizer = ScheduledOptimizer(
            scorer.parameters(), lr=config.lr, lr_min=config.lr_min, warmup=config.warmup, total_steps=total_steps,
            max_grad_norm=config.max_grad_norm, adamw=False,
        )
        self.obs: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}

    def reseed(self, seed: int) -> None:
        """Restart the env's episode sampling from ``seed``."""
        self.obs, self.info = self.env.reset(seed=seed)

    def update(self) -> dict[str, float]:
        """One supervised step on ``states`` fresh observations; the env then moves on (golden action if streaming)."""
        ranked = ranked_entries(self.obs)  # [B, N]
        both = ranked[:, :, None] & ranked[:, None, :]
        if self.golden is None:
            importance = self.obs["future_importance"]
            better = both & (importance[:, :, None] > importance[:, None, :])
            action = importance  # any action: the next episodes do not depend on it
        else:
            action = torch.as_tensor(self.golden.act(self.obs, self.info))
            kept = action > 0.5
            better = both & kept[:, :, None] & ~kept[:, None, :]
        scores = score_one_head(self.scorer, obs_to_view(self.obs, self.spec))
        loss = pairwise_hinge(scores, better, self.config.margin)

        grad_norm = self.optimizer.step(loss)
        self.optimizer.advance()
        self.obs, _, _, _, self.info = self.env.step(action)
        return {
            "train/hinge_loss": loss.item(),
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.lr,
            "env_steps": float(len(scores)),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
