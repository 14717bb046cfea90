"""Tensor helpers shared by the heuristics: window attention over a ScoringView, pooling in
position order, and pinning always-kept entries to the top of the ranking.

Every helper treats padded entries (``view.mask`` False) as absent: they never enter a softmax, a
mean or a pooling window, so adding padding does not change the scores of real entries, whatever
values (even NaN) and positions the padded slots hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvp_gym.scorers import ScoringView


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32 precision (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def window_attention(view: ScoringView, window: int) -> torch.Tensor:
    """Softmax attention of the view's last ``window`` queries over the view's keys.

    A_{t,i} = softmax_i(q_t . k_i / sqrt(d)) over the real keys visible to query t, where the query
    at position p sees the keys with position <= p (causal by true positions, so it also holds after
    earlier evictions). Invisible and padded keys get exactly 0.

    Needs ``view.queries [B, H, G, w, d]`` and ``view.query_positions [B, w]``.
    Returns [B, H, G, window, N].
    """
    queries = view.queries[..., -window:, :]
    query_positions = view.query_positions[:, -window:]
    dtype = torch.promote_types(as_float(queries).dtype, as_float(view.keys).dtype)
    # the w queries scaled rather than the w x N logits, and the mask applied in place: two passes over the logits
    # fewer (a third of kvp's scoring time went here), the same numbers (exactly, for a power-of-two d)
    scaled = queries.to(dtype) / math.sqrt(queries.shape[-1])
    logits = torch.einsum("bhgwd,bhnd->bhgwn", scaled, view.keys.to(dtype))
    visible = view.mask[:, None, :] & (view.positions[:, None, :] <= query_positions[:, :, None])  # [B, w, N]
    hidden = ~visible[:, None, None]
    probs = torch.softmax(logits.masked_fill_(hidden, -math.inf), dim=-1)
    if not bool(visible.any(-1).all()):  # a query that sees no real key has a NaN row: it attends to nothing
        probs.masked_fill_(hidden, 0.0)
    return probs


def position_order(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices [B, N] that sort each row's real entries by true position, padding last."""
    sort_key = positions.masked_fill(~mask, torch.iinfo(positions.dtype).max)
    return torch.argsort(sort_key, dim=-1, stable=True)


def avg_pool_in_position_order(
    scores: torch.Tensor, include: torch.Tensor, positions: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """1-D average pooling of ``scores [B, H, N]`` over the included entries in position order.

    The included entries (``include [B, N]``) are lined up by true position, as they sit in a
    KV cache, and smoothed with ``avg_pool1d(kernel_size, stride=1, padding=kernel_size // 2)``,
    zero padding counted in the average (PyTorch's ``count_include_pad=True``, as kvpress uses).
    Neighbours are the adjacent included entries, not adjacent positions: after an eviction the
    survivors on either side of a gap are neighbours, as in a compacted cache. Entries left out of
    ``include`` count as zeros beyond the sequence's end; their own output is meaningless.
    """
    b, h, n = scores.shape
    order = position_order(positions, include)[:, None, :].expand(b, h, n)
    lined_up = torch.where(include[:, None, :], scores, 0.0).gather(-1, order)
    pooled = F.avg_pool1d(lined_up.reshape(b * h, 1, n), kernel_size, stride=1, padding=kernel_size // 2)
    return torch.empty_like(scores).scatter(-1, order, pooled.reshape(b, h, n))


def pin_top(scores: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give the ``keep`` entries one common score strictly above every other real entry of the row.

    scores [B, H, N]; keep, mask [B, N]. The pinned score is (row max over the real entries not
    kept) + 1, a finite number, so consumers that normalise or exponentiate scores stay finite.
    """
    others = (mask & ~keep)[:, None, :]
    top = scores.masked_fill(~others, -math.inf).amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top + 1.0, 1.0)
    return torch.where(keep[:, None, :], top, scores)
