"""kvpress's ExpectedAttentionPress (Devoto et al. 2025, arXiv 2510.00636): the attention the
*future* queries are expected to pay each key, from a Gaussian model of the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._attention import as_float, pin_top
from kvp_gym.scorers import MissingInputError, ScoringView


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., d] of plain RoPE at ``positions [...]`` (transformers' layout: the d/2
    frequencies theta^(-2k/d) repeated for both halves)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (transformers' RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def average_rope_matrix(start: torch.Tensor, count: int, head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """R [B, d, d] = mean over t in start .. start + count - 1 of the RoPE rotation R_t (kvpress's
    ``apply_avg_rope``): R_t x = cos_t * x + sin_t * rotate_half(x), so R = diag(C) + diag(S) P over
    rows, with C, S the mean cos and sin and P x = rotate_half(x). ``start [B]``."""
    positions = start[:, None] + torch.arange(count, device=start.device)  # [B, count]
    cos, sin = rope_cos_sin(positions, head_dim, theta, dtype)
    c, s = cos.mean(1), sin.mean(1)  # [B, d]
    eye = torch.eye(head_dim, dtype=dtype, device=start.device)
    p = rotate_half(eye).T  # P @ x == rotate_half(x)
    return c[:, :, None] * eye + s[:, :, None] * p


@dataclass
class ExpectedAttention:
    """kvpress ExpectedAttentionPress (registered as ``expected-attention``), defaults as kvpress.

    With the view's queries un-rotated to their pre-RoPE states qbar_t = R_{p_t}^T q_t (positions
    ``view.query_positions``, base ``view.rope_theta``), over the real queries at positions >=
    ``n_sink`` among the last ``window_size`` (kvpress: every prefill query after the sinks):

        mu    = mean_t qbar_t                                   [B, H, G, d]
        Sigma = mean_t (qbar_t - mu)(qbar_t - mu)^T             [B, H, G, d, d]  (divided by the count)
        R     = mean of R_t over t = p_last + 1 .. p_last + n_future_positions (the average rotation)
        z_i   = k_i^T R mu / sqrt(d) + 1/2 k_i^T R Sigma R^T k_i / d       (covariance term optional)
        s_i   = (mean_g softmax_i(z^g)_i + epsilon) * ||v_i||               (value norm optional)

    The softmax runs over the real entries at positions >= ``n_sink``; the sink entries (positions
    < ``n_sink``) are pinned to the top (kvpress pads them with the maximum score; the consumer
    protects them anyway). ``window_size`` is how many recent queries the consumer keeps (the cache
    keeps that many; the env shows its ``obs_queries``): the default covers a whole prefill of up to
    4096 tokens, as kvpress uses. Plain RoPE only (``view.rope_theta`` is None for scaled RoPE).
    Scores: [B, H, N].
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    window_size: int = 4096
    needs: ClassVar[frozenset[str]] = frozenset({"queries"})

    def __post_init__(self) -> None:
        if self.n_future_positions < 1 or self.n_sink < 0 or self.window_size < 1 or self.epsilon < 0:
            raise ValueError(
                "ExpectedAttention needs n_future_positions >= 1, n_sink >= 0, window_size >= 1, epsilon >= 0; "
                f"got {self.n_future_positions}, {self.n_sink}, {self.window_size}, {self.epsilon}"
            )

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("expected-attention", "queries")
        if view.rope_theta is None:
            raise MissingInputError(
                "scorer 'expected-attention' needs the model's RoPE base (ScoringView.rope_theta) to recover "
                "pre-RoPE queries; the caller did not give it (or the model's RoPE is scaled)"
            )
        queries = as_float(view.queries[..., -self.window_size :, :])  # [B, H, G, w, d]
        positions = view.query_positions[:, -self.window_size :]  # [B, w]
        dtype, d = queries.dtype, queries.shape[-1]
        cos, sin = rope_cos_sin(positions.clamp(min=0), d, view.rope_theta, dtype)  # [B, w, d]
        cos, sin = cos[:, None, None], sin[:, None, None]
        pre_rope = queries * cos - rotate_half(queries) * sin  # the inverse rotation
        used = (positions >= self.n_sink).to(dtype)[:, None, None, :, None]  # [B, 1, 1, w, 1]
        count = used.sum(dim=-2, keepdim=True).clamp(min=1.0)
        mu = (pre_rope * used).sum(dim=-2, keepdim=True) / count  # [B, H, G, 1, d]
        rotation = average_rope_matrix(positions.amax(-1) + 1, self.n_future_positions, d, view.rope_theta, dtype)
        rotation = rotation[:, None, None]  # [B, 1, 1, d, d]
        mean = (rotation @ mu.transpose(-1, -2)).squeeze(-1)  # R mu [B, H, G, d]
        keys = as_float(view.keys).to(dtype)  # [B, H, N, d]
        logits = torch.einsum("bhnd,bhgd->bhgn", keys, mean) / math.sqrt(d)
        if self.use_covariance:
            centered = (pre_rope - mu) * used
            sigma = centered.transpose(-1, -2) @ centered / count  # [B, H, G, d, d]
            sigma = rotation @ sigma @ rotation.transpose(-1, -2)
            logits = logits + torch.einsum("bhnd,bhgde,bhne->bhgn", keys, sigma, keys) / d / 2
        sink = view.positions < self.n_sink  # [B, N]
        candidates = (view.mask & ~sink)[:, None, None, :]
        probs = torch.softmax(logits.masked_fill(~candidates, -math.inf), dim=-1)
        scores = torch.where(candidates, probs, 0.0).mean(dim=2)  # [B, H, N]
        if self.use_vnorm:
            scores = (scores + self.epsilon) * as_float(view.values).to(dtype).norm(dim=-1)
        return pin_top(scores, view.mask & sink, view.mask)
