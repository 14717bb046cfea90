"""What the agents share: Plackett-Luce ranking (Gumbel-sort sampling and log-probabilities),
group baselines, the learning-rate schedule, and seeded RNG streams.

Shapes: B = rows (episodes), N = entries per row. ``ranked [B, N]`` marks the entries that take part
in the ranking: real (not padding) and not protected. Protected entries are kept by every policy
(the env ranks them first whatever the scores), so they carry no decision and no log-probability.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Scores given to unranked entries when building an action: finite, far below any real score.
UNRANKED_SCORE = -1e9


def gumbel_sort(scores: torch.Tensor, ranked: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a Plackett-Luce ranking of the ranked entries by Gumbel-sort (KVP Eq. 3.3).

    scores [B, N], ranked [B, N] -> (keys [B, N], order [B, N]). ``keys = scores + Gumbel(0, 1)``
    noise (``UNRANKED_SCORE`` on unranked entries) is the action to send to the env: its descending
    order is the sampled ranking. ``order`` holds the entry indices by descending key, ranked first.
    """
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0 - 1e-7)
    keys = scores.detach() - torch.log(-torch.log(uniform))
    keys = keys.masked_fill(~ranked, UNRANKED_SCORE)
    return keys, keys.argsort(dim=-1, descending=True, stable=True)


def plackett_luce_terms(scores: torch.Tensor, order: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Per-rank log-probabilities of a ranking: scores [B, N], order [B, N], ranked [B, N] -> [B, N].

    term_i = f(sigma_i) - logsumexp_{k >= i} f(sigma_k) for the i-th ranked entry in the order (a
    reverse cumulative logsumexp over the sampled order), 0 for the unranked positions. ``order`` must
    list the ranked entries first (as ``gumbel_sort`` does). Their sum is log pi(sigma).
    """
    in_order = scores.gather(-1, order)
    ranked_in_order = ranked.gather(-1, order)
    # unranked entries sit after the ranked ones; a very low finite score removes them from every
    # suffix logsumexp without producing inf - inf
    in_order = torch.where(ranked_in_order, in_order, torch.full_like(in_order, UNRANKED_SCORE))
    suffix_lse = in_order.flip(-1).logcumsumexp(dim=-1).flip(-1)
    return torch.where(ranked_in_order, in_order - suffix_lse, torch.zeros_like(in_order))


def plackett_luce_log_prob(scores: torch.Tensor, order: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """log pi(sigma) = sum_i [f(sigma_i) - logsumexp_{k >= i} f(sigma_k)] over the ranked entries: [B]."""
    return plackett_luce_terms(scores, order, ranked).sum(dim=-1)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (KVP Eq. 3.6): rewards [B, K] (K samples of one state per row) -> A [B, K].

    A_k = R_k - (1 / (K - 1)) sum_{k' != k} R_k'.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs at least 2 samples per state, got {k}")
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """GRPO: rewards [B, G] -> (R - mean_G) / (std_G + eps), population std (as ForesightKV's code)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over all elements (KVP's advantage normalisation)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, lr_min: float) -> float:
    """KVP's schedule: linear warm-up from 0.01 lr over ``warmup`` steps, then cosine decay to ``lr_min``."""
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def seed_for(seed: int, step: int) -> int:
    """A distinct, reproducible 63-bit seed for (run seed, step): the RNG streams restart from it at checkpoints."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (1 << 63)


class ScheduledOptimizer:
    """Adam (ForesightKV) or AdamW (KVP) on ``warmup_cosine``, with gradient-norm clipping.

    ``step(loss)`` back-propagates and takes one optimiser step (returns the gradient norm before
    clipping); ``advance()`` moves the schedule on by one update (an update may take several steps).
    """

    def __init__(self, parameters: Any, *, lr: float, lr_min: float, warmup: int, total_steps: int,
                 max_grad_norm: float, weight_decay: float = 0.0, adamw: bool = True) -> None:
        self.parameters = list(parameters)
        self.max_grad_norm = max_grad_norm
        if adamw:
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.parameters, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, total_steps, warmup, lr, lr_min) / lr
        )

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        return grad_norm.item()

    def advance(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
