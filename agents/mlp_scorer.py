"""The learned scorer: one small MLP per (layer, KV head), all heads evaluated as one batched einsum.

KVP (Moschella et al. 2026) scores each cached token with a per-KV-head MLP over its key, value and
position; ForesightKV uses the same per-head layout (a "HeadWiseLinear" einsum). This module is that
scorer, behind the ``kvp_gym.scorers.Scorer`` contract, so a trained agent drops into the envs, the
leaderboard and the inference cache exactly like a heuristic (registry name ``"mlp"``).

Input features of entry i on head (l, h), F = 2 d + 7:

    x_i = [ (k_i - mu_k) / sigma_k,  (v_i - mu_v) / sigma_v,  phi(pos_i) ]

- keys and values are standardised per (layer, head, dimension) with a mean and standard deviation
  measured once on training traces (``fit_normalization``; identity until fitted). Post-RoPE keys of
  real models have a few dimensions with norms tens of times larger than the rest; without this
  the first layer would see almost nothing else. The statistics are buffers: they are saved with
  the weights and never trained.
- phi(pos) (KVP does not specify its position encoding): with r = newest_pos - pos the recency of
  the entry relative to the newest real entry of the row (the token being generated next sits at
  newest_pos + 1),
      log(1 + pos) / 8,  log(1 + r) / 8,  pos / (newest_pos + 1),
      sin(2 pi r / 8), cos(2 pi r / 8), sin(2 pi r / 64), cos(2 pi r / 64).
  The log features are O(1) up to a few thousand tokens (log 3000 ~ 8); the relative position lets
  a head prefer the start or the end of any length of context; the sinusoids let it pick up periodic
  local patterns (e.g. every other token) that a monotone recency feature cannot express.

Network per head: Linear(F -> hidden) -> activation (gelu, relu or silu) -> Linear(hidden -> 1). KVP reports 2-layer MLPs
with 256 hidden units; the default here is hidden = 64 so that all 90 heads of SmolLM2 train in
minutes on a 2-core CPU (about 8.8K parameters per head at d = 64, 0.79M for the whole model; the
einsum cost is linear in ``hidden``). Pass ``hidden=256`` for KVP's width.

A scorer may hold agents for a subset of the model's heads (``heads``, a list of (layer, kv_head)
pairs; None = every head): training one head (``kvp-gym train --layer L --kv-head H``) gives a
checkpoint with one agent, and scoring a head without an agent raises a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from kvp_gym.kernels import ACTIVATIONS, mlp_scores
from kvp_gym.scorers import ScoringView

if TYPE_CHECKING:
    from kvp_gym.traces import Trace

POSITION_FEATURES = 7


def position_features(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """phi(pos) of the module docstring: positions [B, N] (long), mask [B, N] -> [B, N, 7] float32."""
    pos = positions.float()
    newest = pos.masked_fill(~mask, -1.0).amax(dim=-1, keepdim=True).clamp_min(0.0)
    recency = (newest - pos).clamp_min(0.0)
    features = [
        torch.log1p(pos.clamp_min(0.0)) / 8.0,
        torch.log1p(recency) / 8.0,
        pos / (newest + 1.0),
    ]
    for period in (8.0, 64.0):
        angle = recency * (2.0 * math.pi / period)
        features += [torch.sin(angle), torch.cos(angle)]
    return torch.stack(features, dim=-1)


class PerHeadModule(nn.Module):
    """The bookkeeping of a scorer with one agent per (layer, KV head), for a subset ``heads`` of them.

    Buffer: slot_of [L * Hkv], the agent index of each head (-1 where the scorer has no agent).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, heads: Sequence[Sequence[int]] | None) -> None:
        super().__init__()
        if min(num_layers, num_kv_heads, head_dim) < 1:
            raise ValueError(
                f"{type(self).__name__} needs positive sizes, got num_layers={num_layers}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        all_heads = [(layer, head) for layer in range(num_layers) for head in range(num_kv_heads)]
        self.heads: list[tuple[int, int]] = all_heads if heads is None else [(int(l), int(h)) for l, h in heads]
        for layer, head in self.heads:
            if not (0 <= layer < num_layers and 0 <= head < num_kv_heads):
                raise ValueError(f"head (layer={layer}, kv_head={head}) is outside a {num_layers}x{num_kv_heads} model")
        if len(set(self.heads)) != len(self.heads) or not self.heads:
            raise ValueError(f"heads must be a non-empty list of distinct (layer, kv_head) pairs, got {self.heads}")
        self._all_heads = heads is None
        slot_of = torch.full((num_layers * num_kv_heads,), -1, dtype=torch.long)
        for slot, (layer, head) in enumerate(self.heads):
            slot_of[layer * num_kv_heads + head] = slot
        self.register_buffer("slot_of", slot_of)

    def head_config(self) -> dict[str, Any]:
        """The constructor arguments this class owns (JSON-serialisable)."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "heads": None if self._all_heads else [list(pair) for pair in self.heads],
        }

    def slots(self, layer: torch.Tensor, kv_heads: torch.Tensor) -> torch.Tensor:
        """Agent index of each (row, head): layer [B], kv_heads [B, H] -> [B, H] long."""
        flat = layer.long()[:, None] * self.num_kv_heads + kv_heads.long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.slot_of.numel()):
            raise ValueError(
                f"view asks for (layer, kv_head) outside this scorer's {self.num_layers}x{self.num_kv_heads} model"
            )
        slots = self.slot_of[flat]
        if (slots < 0).any():
            missing = sorted({divmod(int(index), self.num_kv_heads) for index in flat[slots < 0].unique()})
            raise ValueError(
                f"this scorer has no agent for (layer, kv_head) {missing}; it was trained for {self.heads}"
            )
        return slots


class PerHeadMLPScorer(PerHeadModule):
    """One 2-layer MLP per (layer, KV head); ``score(view) -> [B, H, N]``, higher = keep.

    Parameters (S = number of agents, F = 2 head_dim + 7):
        w1 [S, F, hidden], b1 [S, hidden], w2 [S, hidden], b2 [S]
    Buffers: feature_shift / feature_scale [S, F] (input standardisation), slot_of [L * Hkv] (agent
    index of each head, -1 where the scorer has no agent).
    ``seed`` makes the initial weights independent of the global RNG.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    trainable: ClassVar[bool] = True
    registry_name: ClassVar[str] = "mlp"  # its kvp_gym.scorers entry point (pyproject.toml)

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden: int = 64,
        activation: str = "gelu",
        heads: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"PerHeadMLPScorer needs hidden >= 1, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_layers, num_kv_heads, head_dim, heads)
        self.hidden, self.activation, self.seed = hidden, activation, seed

        slots, features = len(self.heads), 2 * head_dim + POSITION_FEATURES
        generator = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(slots, features, hidden, generator=generator) / math.sqrt(features))
        self.b1 = nn.Parameter(torch.zeros(slots, hidden))
        # a small output layer: the initial policy is close to uniform (near-random rankings)
        self.w2 = nn.Parameter(0.1 * torch.randn(slots, hidden, generator=generator) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(slots))
        self.register_buffer("feature_shift", torch.zeros(slots, features))
        self.register_buffer("feature_scale", torch.ones(slots, features))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``PerHeadMLPScorer(**scorer.config())`` rebuilds it."""
        return {**self.head_config(), "hidden": self.hidden, "activation": self.activation, "seed": self.seed}

    def features(self, view: ScoringView, slots: torch.Tensor) -> torch.Tensor:
        """Standardised inputs [B, H, N, F] of each entry for the agent in ``slots [B, H]``."""
        b, h, n = view.shape
        if view.keys.shape[-1] != self.head_dim:
            raise ValueError(f"view has head_dim {view.keys.shape[-1]}, this scorer was built for {self.head_dim}")
        position = position_features(view.positions, view.mask).to(view.keys.device)
        x = torch.cat([view.keys.float(), view.values.float(), position[:, None].expand(b, h, n, -1)], dim=-1)
        return (x - self.feature_shift[slots][:, :, None]) / self.feature_scale[slots][:, :, None]

    def score(self, view: ScoringView) -> torch.Tensor:
        """Scores [B, H, N] (float32): each head's MLP applied to each of its entries."""
        slots = self.slots(view.layer, view.kv_heads)
        x = self.features(view, slots)
        return self.mlp(x, slots)

    def forward(self, view: ScoringView) -> torch.Tensor:
        return self.score(view)

    def mlp(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [B, H, N, F], slots [B, H] -> [B, H, N]: one batched einsum over all (row, head) pairs.

        Runs ``kvp_gym.kernels.mlp_scores``: the Triton kernel on CUDA when no gradient is needed
        (inference), the differentiable torch einsum otherwise.
        """
        b, h, n, f = x.shape
        scores = mlp_scores(
            x.reshape(b * h, n, f),
            self.w1[slots].flatten(0, 1),
            self.b1[slots].flatten(0, 1),
            self.w2[slots].flatten(0, 1),
            self.b2[slots].flatten(0, 1),
            self.activation,
            use_triton=False if torch.is_grad_enabled() else None,
        )
        return scores.view(b, h, n)

    @torch.no_grad()
    def fit_normalization(self, traces: Sequence[Trace], max_tokens: int = 65536) -> None:
        """Set the key/value standardisation of every agent from ``traces`` (deterministic).

        Mean and standard deviation per (layer, head, dimension) over the first ``max_tokens`` tokens
        of the traces, in order. Position features keep shift 0 and scale 1.
        """
        if not traces:
            raise ValueError("fit_normalization needs at least one trace")
        dim = self.head_dim
        for layer in sorted({layer for layer, _ in self.heads}):
            chunks, used = [], 0
            for trace in traces:
                if used >= max_tokens:
                    break
                take = min(trace.length, max_tokens - used)
                chunks.append(torch.cat([trace.k(layer)[:, :take], trace.v(layer)[:, :take]], dim=-1))
                used += take
            data = torch.cat(chunks, dim=1)  # [Hkv, tokens, 2d]
            if data.shape[0] != self.num_kv_heads or data.shape[-1] != 2 * dim:
                raise ValueError(
                    f"traces have {data.shape[0]} KV heads of dim {data.shape[-1] // 2}; "
                    f"this scorer was built for {self.num_kv_heads} of dim {dim}"
                )
            mean, std = data.mean(dim=1), data.std(dim=1).clamp_min(1e-4)
            for head in range(self.num_kv_heads):
                slot = int(self.slot_of[layer * self.num_kv_heads + head])
                if slot >= 0:
                    self.feature_shift[slot, : 2 * dim] = mean[head]
                    self.feature_scale[slot, : 2 * dim] = std[head]

