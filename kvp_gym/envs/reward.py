"""KVP's budget-agnostic ranking reward, as pure batched torch functions.

A ranking sigma of the valid (unprotected, real) entries orders them from "keep first" to "evict
first". With I the true future attention of each entry (kvp_gym.utility), the cost of sigma over all
budgets b = 1..n-1 at once is

    cost(sigma) = sum_b sum_{p > b} I(sigma_p) = sum_p (p - 1) I(sigma_p)

sigma* sorts by I descending (the minimum cost), and the reward is -cost(sigma) / cost(sigma*) <= -1.

Shapes: B = batch, N = entries (padded). ``scores``, ``importance`` [B, N] float (importance >= 0);
``valid`` [B, N] bool.
Entries with valid = False (padding, protected tokens) are ranked last and count for nothing.
Ties between equal scores are broken by index (lower index ranks first), so every function is
deterministic and the oracle (scores = importance) gets a cost ratio of exactly 1.
"""

from __future__ import annotations

import torch

BUDGET_FRACTIONS = (0.10, 0.25, 0.50)


def ranking_order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indices [B, N] of the ranking: valid entries by descending score (ties by index), then the rest.

    NaN ranks lowest among valid entries and +-inf are clamped to the largest finite values, so a
    valid entry always ranks before an invalid one (the env rejects non-finite scores anyway).
    """
    finite = torch.finfo(scores.dtype)
    keys = torch.nan_to_num(scores, nan=finite.min, posinf=finite.max, neginf=finite.min)
    keys = keys.masked_fill(~valid, float("-inf"))
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


def sorted_importance(scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Importance [B, N] in ranking order; invalid entries contribute 0 (they come last)."""
    masked = importance.masked_fill(~valid, 0.0)
    return masked.gather(-1, ranking_order(scores, valid))


def cost_of_sorted(sorted_imp: torch.Tensor) -> torch.Tensor:
    """cost = sum_p (p - 1) I(sigma_p) for importance already in ranking order: [B, N] -> [B] (float64)."""
    ranks = torch.arange(sorted_imp.shape[-1], dtype=torch.float64, device=sorted_imp.device)
    return (sorted_imp.double() * ranks).sum(-1)


def ranking_cost(scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cost(sigma) of the ranking induced by ``scores``: [B] (float64)."""
    return cost_of_sorted(sorted_importance(scores, importance, valid))


def optimal_sorted(importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Importance [B, N] in the ideal order sigma* (descending), zeros after the valid entries.

    Elementwise equal to ``sorted_importance(importance, importance, valid)`` (importance >= 0), so
    the oracle's cost equals cost* bit for bit; one values-only sort.
    """
    return importance.masked_fill(~valid, 0.0).sort(dim=-1, descending=True).values


def optimal_cost(importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cost(sigma*) of the ranking by importance itself: [B] (float64)."""
    return cost_of_sorted(optimal_sorted(importance, valid))


def normalized_cost(cost: torch.Tensor, optimal: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """cost / cost* (>= 1), guarded: where cost* == 0 (at most one valid entry has any future
    attention) it is 1 + cost / total, with total = sum of I over valid entries (1 when cost == 0)."""
    degenerate = optimal <= 0
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(degenerate, 1.0 + cost / safe_total, cost / torch.where(degenerate, 1.0, optimal))


def cost_ratio(scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cost(sigma) / cost(sigma*) >= 1 (exactly 1 for the oracle): [B] (float64). The reward is minus this."""
    ranked = sorted_importance(scores, importance, valid)
    best = optimal_sorted(importance, valid)
    return normalized_cost(cost_of_sorted(ranked), cost_of_sorted(best), best.double().sum(-1))


def curve_of_sorted(sorted_imp: torch.Tensor) -> torch.Tensor:
    """Kept fraction of the total future attention at every budget: [B, N] -> [B, N] (float32).

    Entry b - 1 is the share kept by the top-b entries; 1 from b = |valid| on (and where the total is 0).
    """
    kept = sorted_imp.double().cumsum(-1)
    total = kept[..., -1:]
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0).float()


def kept_fraction_curve(scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Kept future-attention fraction at budgets b = 1..N of the ranking induced by ``scores``: [B, N]."""
    return curve_of_sorted(sorted_importance(scores, importance, valid))


def kept_fraction_at(
    curve: torch.Tensor, valid: torch.Tensor, fractions: tuple[float, ...] = BUDGET_FRACTIONS
) -> torch.Tensor:
    """The curve read at budgets b = max(1, round(f |U|)) for each fraction f: [B, N] -> [B, len(fractions)]."""
    count = valid.sum(-1, keepdim=True).double()
    wanted = torch.tensor(fractions, dtype=torch.float64, device=curve.device)
    budgets = (count * wanted).round().long().clamp(min=1)
    return curve.gather(-1, budgets - 1)
