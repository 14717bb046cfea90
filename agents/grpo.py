"""GRPO (group-relative policy optimisation) for eviction, on both envs.

Common to both envs: G rollouts start from the same state (the vector env's ``group_size``); the
advantage of rollout g is group-relative, A_g = (R_g - mean_G R) / (std_G R + 1e-8) (population std,
as ForesightKV's code); the objective is PPO's clipped surrogate with eps = 0.2 plus a KL penalty to a
frozen reference policy (k3 estimator, KL ~ exp(x) - x - 1 with x = log pi_ref - log pi), run for
``epochs`` passes over each batch (the first pass has ratio 1). The reference is the policy the run
starts from: the initial weights, or a supervised checkpoint given with ``kvp-gym train --init``
(ForesightKV starts RL from its pairwise-ranking model and uses it as the reference).
ForesightKV's KL weight is 0.05 for the first 100 of 250 steps, then 0: ``kl_fraction`` = 0.4.

KVEvict-v0 (one step): the action is a full ranking sampled by Gumbel-sort, as in KVP. Ratios and KL
are taken per rank of the Plackett-Luce factorisation (log pi(sigma) = sum_i log pi_i), like GRPO's
per-token ratios for LLMs, and averaged over the ranks of each episode; a single ratio of a whole
permutation of hundreds of entries would almost always sit outside the clip range.

KVEvictStream-v0 (multi-step, ForesightKV's setting): every step evicts L of the evictable entries.
Eviction scores are minus the keep scores; the action takes the top 2L candidates and samples L of
them without replacement with probabilities softmax(eviction scores over the candidates)
(Gumbel-top-L; ForesightKV's ``topk_prob_sample(top_k=2L, sample_k=L)``). As in ForesightKV's code,
the log-probability is approximated per evicted index, as log_softmax of the eviction scores over all
evictable entries, each evicted index treated as an independent action; the exact probability of the
top-2L-then-without-replacement draw is not used. The trajectory's advantage, from its return (minus
the future attention it evicted in total), is shared by all its steps and evicted indices.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import gymnasium as gym
import torch

from agents.common import (
    UNRANKED_SCORE,
    ScheduledOptimizer,
    group_normalized_advantages,
    gumbel_sort,
    plackett_luce_terms,
)
from agents.mlp_scorer import PerHeadMLPScorer
from kvp_gym.envs.adapters import obs_to_view, ranked_entries
from kvp_gym.scorers import score_one_head


@dataclasses.dataclass
class GRPOConfig:
    """Hyperparameters (ForesightKV's where it states them: eps 0.2, beta 0.05, Adam, clip-norm 1)."""

    stream: bool = False
    states: int = 16
    group: int = 4
    epochs: int = 2
    lr: float = 3e-3
    lr_min: float = 1e-6
    warmup_fraction: float = 0.1
    clip: float = 0.2
    kl_coef: float = 0.05
    kl_fraction: float = 0.4
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class Batch:
    """One step of rollouts. D = decisions per row: N ranks (one-step) or L evictions (stream).

    obs [E, ...]; chosen: ranking order [E, N] or evicted indices [E, L]; ranked [E, N];
    decided [E, D] (the decisions that count); old / ref log-probabilities [E, D]; weight [E]
    (0 for rows whose episode already ended).
    """

    obs: dict[str, torch.Tensor]
    chosen: torch.Tensor
    ranked: torch.Tensor
    decided: torch.Tensor
    old_log_prob: torch.Tensor
    ref_log_prob: torch.Tensor
    weight: torch.Tensor


class GRPOAgent:
    """GRPO on KVEvict-v0 (``stream=False``) or KVEvictStream-v0 (``stream=True``)."""

    def __init__(
        self, scorer: PerHeadMLPScorer, traces: Any, env_kwargs: dict[str, Any], config: GRPOConfig, total_steps: int
    ) -> None:
        self.scorer, self.config, self.total_steps = scorer, config, total_steps
        self.env_id = "KVEvictStream-v0" if config.stream else "KVEvict-v0"
        self.env = gym.make_vec(
            self.env_id, num_envs=config.states * config.group, vectorization_mode="vector_entry_point",
            group_size=config.group, as_torch=True, traces=traces, **env_kwargs,
        )
        self.spec = self.env.unwrapped.model_spec
        self.protected = self.env.unwrapped.protected  # what the checkpoint records as always kept
        self.reference = copy.deepcopy(scorer).requires_grad_(False)
        self.optimizer = ScheduledOptimizer(
            scorer.parameters(), lr=config.lr, lr_min=config.lr_min, warmup=int(config.warmup_fraction * total_steps),
            total_steps=total_steps, max_grad_norm=config.max_grad_norm, adamw=False,
        )
        self.generator = torch.Generator()
        self.obs: dict[str, torch.Tensor] = {}
        self.steps_done = 0

    def reseed(self, seed: int) -> None:
        """Restart the env's episode sampling and the action noise from ``seed``."""
        self.obs, _ = self.env.reset(seed=seed)
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ the two action models

    def _log_probs(self, scores: torch.Tensor, chosen: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
        """Log-probability of each decision [E, D] under keep scores [E, N]: Plackett-Luce rank terms
        (one-step), or log_softmax of the eviction scores over the evictable entries (stream)."""
        if not self.config.stream:
            return plackett_luce_terms(scores, chosen, ranked)
        eviction = (-scores).masked_fill(~ranked, UNRANKED_SCORE)
        return eviction.log_softmax(dim=-1).gather(-1, chosen)

    def _act(self, scores: torch.Tensor, ranked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample an action from keep scores [E, N]: (env scores [E, N], chosen = ranking order [E, N] or evicted [E, L])."""
        if not self.config.stream:
            return gumbel_sort(scores, ranked, self.generator)
        evict = self.env.unwrapped.step_size
        eviction = (-scores).masked_fill(~ranked, UNRANKED_SCORE)
        top = min(2 * evict, int(ranked.sum(-1).min()))
        candidates = eviction.topk(top, dim=-1).indices  # [E, 2L]
        # Gumbel-top-L over the candidates = L draws without replacement from their softmax
        uniform = torch.rand(candidates.shape, generator=self.generator).clamp_(1e-20, 1.0 - 1e-7)
        perturbed = eviction.gather(-1, candidates) - torch.log(-torch.log(uniform))
        evicted = candidates.gather(-1, perturbed.topk(evict, dim=-1).indices)  # [E, L]
        action = scores.scatter(-1, evicted, UNRANKED_SCORE)  # the env evicts the L lowest keep scores
        return action, evicted

    # ------------------------------------------------------------------ rollouts

    def _rollout(self) -> tuple[list[Batch], torch.Tensor]:
        """Collect one episode per env (a single step on KVEvict-v0): the steps' batches and returns [E]."""
        if self.config.stream:
            self.obs, _ = self.env.reset()  # every update starts fresh episodes (no seed: same RNG stream)
        rows = self.config.states * self.config.group
        alive = torch.ones(rows, dtype=torch.bool)
        returns = torch.zeros(rows)
        batches = []
        while alive.any():
            ranked = ranked_entries(self.obs)
            view = obs_to_view(self.obs, self.spec)
            with torch.no_grad():
                scores = score_one_head(self.scorer, view)
                action, chosen = self._act(scores, ranked)
                old_log_prob = self._log_probs(scores, chosen, ranked)
                ref_log_prob = self._log_probs(score_one_head(self.reference, view), chosen, ranked)
            decided = torch.ones_like(chosen, dtype=torch.bool) if self.config.stream else ranked.gather(-1, chosen)
            batches.append(Batch(self.obs, chosen, ranked, decided, old_log_prob, ref_log_prob, alive.float()))
            self.obs, reward, terminated, truncated, _ = self.env.step(action)
            returns += reward * alive
            alive &= ~(terminated | truncated)
        return batches, returns

    # ------------------------------------------------------------------ the update

    def update(self) -> dict[str, float]:
        """Collect a group of rollouts per state and take ``epochs`` clipped gradient steps on them."""
        config = self.config
        batches, returns = self._rollout()
        advantages = group_normalized_advantages(returns.view(-1, config.group)).flatten()  # [E]
        kl_coef = config.kl_coef if self.steps_done < config.kl_fraction * self.total_steps else 0.0
        for _ in range(config.epochs):
            surrogate_total, kl_total, weight_total = 0.0, 0.0, 0.0
            for batch in batches:
                scores = score_one_head(self.scorer, obs_to_view(batch.obs, self.spec))
                log_prob = self._log_probs(scores, batch.chosen, batch.ranked)  # [E, D]
                decided = batch.decided
                ratio = torch.exp((log_prob - batch.old_log_prob).clamp(-10, 10))
                a = advantages[:, None]
                surrogate = torch.minimum(ratio * a, ratio.clamp(1 - config.clip, 1 + config.clip) * a)
                x = batch.ref_log_prob - log_prob
                kl = torch.exp(x) - x - 1
                count = decided.sum(-1).clamp_min(1)
                surrogate_total = surrogate_total + ((surrogate * decided).sum(-1) / count * batch.weight).sum()
                kl_total = kl_total + ((kl * decided).sum(-1) / count * batch.weight).sum()
                weight_total += batch.weight.sum().item()
            loss = -(surrogate_total - kl_coef * kl_total) / weight_total
            grad_norm = self.optimizer.step(loss)
        self.optimizer.advance()
        self.steps_done += 1
        metric = "train/cost_ratio" if not config.stream else "train/episode_return"
        value = -returns.mean().item() if not config.stream else returns.mean().item()
        return {
            metric: value,
            "train/loss": loss.item(),
            "train/kl": (kl_total / weight_total).item(),
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.lr,
            "env_steps": float(sum(batch.weight.sum().item() for batch in batches)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.optimizer.state_dict(),
            "reference": self.reference.state_dict(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        self.reference.load_state_dict(state["reference"])
        self.steps_done = state["steps_done"]
