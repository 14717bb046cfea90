"""Plain torch reference paths of the kernels: the CPU path, and the ground truth of the Triton tests.

Shapes: R = rows of heads (any leading batch dims times H), H = KV heads, N = entries, F = features,
K = hidden units, d = head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvp_gym.ranking import ranking_order

ACTIVATIONS = ("relu", "gelu", "silu")


class Compacted(NamedTuple):
    """What ``select_and_compact`` keeps: keys/values [B, H, budget, d], indices [B, H, budget] ascending."""

    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


def activate(hidden: torch.Tensor, activation: str) -> torch.Tensor:
    """The scoring MLP's activation: relu, gelu (exact, erf) or silu."""
    if activation == "relu":
        return F.relu(hidden)
    if activation == "gelu":
        return F.gelu(hidden)
    if activation == "silu":
        return F.silu(hidden)
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def torch_mlp_scores(
    features: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "relu",
) -> torch.Tensor:
    """One 2-layer MLP per head, applied to every entry of that head; float32 math.

    features [..., H, N, F], w1 [H, F, K], b1 [H, K], w2 [H, K], b2 [H] -> scores [..., H, N]:
        s[h, n] = w2[h] . act(features[h, n] @ w1[h] + b1[h]) + b2[h]
    """
    x = features.float()
    hidden = torch.einsum("...hnf,hfk->...hnk", x, w1.float()) + b1.float()[:, None, :]
    return torch.einsum("...hnk,hk->...hn", activate(hidden, activation), w2.float()) + b2.float()[:, None]


def select_indices(
    scores: torch.Tensor, budget: int, protected_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [B, H, budget] of the top-``budget`` entries per head, sorted ascending (cache order kept).

    scores [B, H, N] (-inf = padding, never kept before a real entry); protected_mask [B, H, N] or
    [B, N] (True = always kept, ranked above every score). NaN scores are not allowed (the caller
    checks). The order is ``kvp_gym.ranking.ranking_order``: ties go to the earlier entry, and if more
    than ``budget`` entries are protected the earliest of them survive.
    """
    if not 0 < budget <= scores.shape[-1]:
        raise ValueError(f"budget must be in [1, {scores.shape[-1]}] (entries per head), got {budget}")
    priority = scores.float()
    if protected_mask is not None:
        if protected_mask.dim() == 2:
            protected_mask = protected_mask[:, None, :]
        priority = priority.masked_fill(protected_mask, float("inf"))
    order = ranking_order(priority, priority > float("-inf"))
    return order[..., :budget].sort(dim=-1).values


def torch_gather_entries(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys/values [B, H, N, d] gathered at indices [B, H, M] -> [B, H, M, d] each.

    Row selection on the flattened [B * H * N, d] tensors: whole rows are copied, much faster on CPU
    than ``gather`` with an index expanded over d.
    """
    b, h, n, d = keys.shape
    rows = (indices + torch.arange(b * h, device=indices.device).view(b, h, 1) * n).reshape(-1)
    shape = (*indices.shape, d)
    return keys.reshape(-1, d).index_select(0, rows).view(shape), values.reshape(-1, d).index_select(0, rows).view(shape)


def torch_select_and_compact(
    scores: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    budget: int,
    protected_mask: torch.Tensor | None = None,
) -> Compacted:
    """Keep the top-``budget`` entries of every head (protected first), in their original order."""
    indices = select_indices(scores, budget, protected_mask)
    kept_keys, kept_values = torch_gather_entries(keys, values, indices)
    return Compacted(kept_keys, kept_values, indices)
