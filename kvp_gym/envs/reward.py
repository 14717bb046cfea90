"""KVP's budget-agnostic ranking reward, as pure batched torch functions.

A ranking sigma of the ranked (unprotected, real) entries orders them from "keep first" to "evict
first". With I the true future attention of each entry (kvp_gym.utility), the cost of sigma over all
budgets b = 1..n-1 at once is

    cost(sigma) = sum_b sum_{p > b} I(sigma_p) = sum_p (p - 1) I(sigma_p)

sigma* sorts by I descending (the minimum cost), and the reward is -cost(sigma) / cost(sigma*) <= -1.

Shapes: B = batch, N = entries (padded). ``scores``, ``importance`` [B, N] float (importance >= 0);
``ranked`` [B, N] bool.
Entries with ranked = False (padding, protected tokens) come last and count for nothing.
The order is ``kvp_gym.ranking.ranking_order`` (ties by position), so every function is
deterministic and the oracle (scores = importance) gets a cost ratio of exactly 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvp_gym.ranking import ranking_order

BUDGET_FRACTIONS = (0.10, 0.25, 0.50)


def sorted_importance(scores: torch.Tensor, importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Importance [B, N] in ranking order; unranked entries contribute 0 (they come last)."""
    masked = importance.masked_fill(~ranked, 0.0)
    return masked.gather(-1, ranking_order(scores, ranked))


def cost_of_sorted(sorted_imp: torch.Tensor) -> torch.Tensor:
    """cost = sum_p (p - 1) I(sigma_p) for importance already in ranking order: [B, N] -> [B] (float64)."""
    ranks = torch.arange(sorted_imp.shape[-1], dtype=torch.float64, device=sorted_imp.device)
    return (sorted_imp.double() * ranks).sum(-1)


def ranking_cost(scores: torch.Tensor, importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """cost(sigma) of the ranking induced by ``scores``: [B] (float64)."""
    return cost_of_sorted(sorted_importance(scores, importance, ranked))


def optimal_sorted(importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Importance [B, N] in the ideal order sigma* (descending), zeros after the ranked entries.

    Elementwise equal to ``sorted_importance(importance, importance, ranked)`` (importance >= 0), so
    the oracle's cost equals cost* bit for bit; one values-only sort.
    """
    return importance.masked_fill(~ranked, 0.0).sort(dim=-1, descending=True).values


def optimal_cost(importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """cost(sigma*) of the ranking by importance itself: [B] (float64)."""
    return cost_of_sorted(optimal_sorted(importance, ranked))


def normalized_cost(cost: torch.Tensor, optimal: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """cost / cost* (>= 1), guarded: where cost* == 0 (at most one ranked entry has any future
    attention) it is 1 + cost / total, with total = sum of I over ranked entries (1 when cost == 0)."""
    degenerate = optimal <= 0
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(degenerate, 1.0 + cost / safe_total, cost / torch.where(degenerate, 1.0, optimal))


class RankingCosts(NamedTuple):
    """The costs of one batch of rankings: importance in ranking order [B, N]; cost, cost* and their ratio [B] (float64)."""

    in_order: torch.Tensor
    cost: torch.Tensor
    optimal: torch.Tensor
    ratio: torch.Tensor


def ranking_costs(scores: torch.Tensor, importance: torch.Tensor, ranked: torch.Tensor) -> RankingCosts:
    """cost(sigma), cost(sigma*) and cost(sigma) / cost(sigma*) of the rankings induced by ``scores``."""
    in_order = sorted_importance(scores, importance, ranked)
    best = optimal_sorted(importance, ranked)
    cost, optimal = cost_of_sorted(in_order), cost_of_sorted(best)
    return RankingCosts(in_order, cost, optimal, normalized_cost(cost, optimal, best.double().sum(-1)))


def cost_ratio(scores: torch.Tensor, importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """cost(sigma) / cost(sigma*) >= 1 (exactly 1 for the oracle): [B] (float64). The reward is minus this."""
    return ranking_costs(scores, importance, ranked).ratio


def curve_of_sorted(sorted_imp: torch.Tensor) -> torch.Tensor:
    """Kept fraction of the total future attention at every budget: [B, N] -> [B, N] (float32).

    Entry b - 1 is the share kept by the top-b entries; 1 from b = |ranked| on (and where the total is 0).
    """
    kept = sorted_imp.double().cumsum(-1)
    total = kept[..., -1:]
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0).float()


def kept_fraction_curve(scores: torch.Tensor, importance: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Kept future-attention fraction at budgets b = 1..N of the ranking induced by ``scores``: [B, N]."""
    return curve_of_sorted(sorted_importance(scores, importance, ranked))


def kept_fraction_at(
    curve: torch.Tensor, ranked: torch.Tensor, fractions: tuple[float, ...] = BUDGET_FRACTIONS
) -> torch.Tensor:
    """The curve read at budgets b = max(1, round(f |U|)) for each fraction f: [B, N] -> [B, len(fractions)]."""
    count = ranked.sum(-1, keepdim=True).double()
    wanted = torch.tensor(fractions, dtype=torch.float64, device=curve.device)
    budgets = (count * wanted).round().long().clamp(min=1)
    return curve.gather(-1, budgets - 1)
