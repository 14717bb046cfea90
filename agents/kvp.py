"""KVP (Moschella et al. 2026, "Learning to Evict from Key-Value Cache"): REINFORCE over Plackett-Luce rankings.

One update (KVP Alg. 1, batched):
  1. take ``states`` cache states from KVEvict-v0 (trace, layer, KV head, prefix n sampled by the env),
     each shown to ``samples`` = K consecutive envs (the vector env's ``group_size``);
  2. score every entry with the per-head MLP, f = scorer(k, v, pos), and sample K rankings per
     state by Gumbel-sort: sigma = argsort_desc(f + g), g ~ Gumbel(0, 1) i.i.d.;
  3. the env returns R(sigma) = -cost(sigma) / cost(sigma*);
  4. leave-one-out baseline A_k = R_k - mean_{k' != k} R_k', then A normalised by its mean and std
     over the batch; loss = -mean(A * log pi(sigma)), with the exact Plackett-Luce log-probability
     over the unprotected real entries (agents.common.plackett_luce_log_prob);
  5. AdamW, linear warm-up then cosine decay, gradient clipping at max-norm 5.

KVP trains 4000 steps per head at lr 5e-5 on 8xH100. On a CPU budget of a few hundred steps that
lr barely moves the scores; the default here is 3e-3 with a 10 % warm-up (on SmolLM2 prose, one head
goes from cost ratio 46 at initialisation to 1.12 in 200 steps of 16 states x 4 rankings).
Weight decay defaults to 0: KVP does not state one, and with one agent per head a decay would also
shrink the weights of heads absent from a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import torch

from agents.common import (
    ScheduledOptimizer,
    gumbel_sort,
    leave_one_out_advantages,
    normalize,
    plackett_luce_log_prob,
)
from agents.mlp_scorer import PerHeadMLPScorer
from kvp_gym.envs.adapters import obs_to_view, ranked_entries
from kvp_gym.scorers import score_one_head


@dataclasses.dataclass
class KVPConfig:
    """Hyperparameters of one KVP update (defaults sized for a few hundred CPU steps)."""

    states: int = 16
    samples: int = 4
    lr: float = 3e-3
    lr_min: float = 1e-6
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0


class KVPAgent:
    """KVP on KVEvict-v0: ``update()`` runs one batch of ``states`` x ``samples`` episodes and one gradient step."""

    env_id = "KVEvict-v0"

    def __init__(
        self, scorer: PerHeadMLPScorer, traces: Any, env_kwargs: dict[str, Any], config: KVPConfig, total_steps: int
    ) -> None:
        self.scorer, self.config = scorer, config
        self.env = gym.make_vec(
            self.env_id, num_envs=config.states * config.samples, vectorization_mode="vector_entry_point",
            group_size=config.samples, as_torch=True, traces=traces, **env_kwargs,
        )
        self.spec = self.env.unwrapped.model_spec
        self.protected = self.env.unwrapped.protected  # what the checkpoint records as always kept
        self.optimizer = ScheduledOptimizer(
            scorer.parameters(), lr=config.lr, lr_min=config.lr_min, warmup=int(config.warmup_fraction * total_steps),
            total_steps=total_steps, max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay,
        )
        self.generator = torch.Generator()
        self.obs: dict[str, torch.Tensor] = {}

    def reseed(self, seed: int) -> None:
        """Restart the env's episode sampling and the Gumbel noise from ``seed``."""
        self.obs, _ = self.env.reset(seed=seed)
        self.generator.manual_seed(seed)

    def update(self) -> dict[str, float]:
        """One KVP step; returns the batch's metrics."""
        view = obs_to_view(self.obs, self.spec)
        ranked = ranked_entries(self.obs)  # [E, N] the entries the ranking decides
        scores = score_one_head(self.scorer, view)  # [E, N]
        keys, order = gumbel_sort(scores, ranked, self.generator)
        self.obs, reward, _, _, _ = self.env.step(keys)

        advantages = leave_one_out_advantages(reward.view(-1, self.config.samples)).flatten()
        advantages = normalize(advantages)
        log_prob = plackett_luce_log_prob(scores, order, ranked)  # [E]
        loss = -(advantages * log_prob).mean()

        grad_norm = self.optimizer.step(loss)
        self.optimizer.advance()
        return {
            "train/cost_ratio": -reward.mean().item(),
            "train/loss": loss.item(),
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.lr,
            "env_steps": float(len(reward)),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
