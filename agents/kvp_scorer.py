"""KVP's agent: a per-head network over key, value and position, all heads batched as one bmm.

The released KVP agent (apple/ml-learning-to-evict) has, per (layer, KV head):

    h_i = LN(W_k k_i) + LN(W_v v_i) + E_rel[bucket(newest - pos_i)] + E_abs[bucket(pos_i)]
    s_i = w_3 . SiLU(W_2 LN(SiLU(W_1 LN(h_i)))) + b_3

with W_k, W_v: d -> W, LayerNorm LN (no affine), learned position embeddings E (32 log-spaced buckets,
two per octave, of the entry's recency and of its absolute position), a 2-hidden-layer MLP of width
W with SiLU. KVP uses W = 256, about 0.18M parameters per head at d = 64 (16M for SmolLM2's 90 heads).

``inputs="kv+attention"`` adds what the cache already has at compression time, the attention each
entry received so far, as two features per entry, projected to W and LayerNorm-ed like k and v:

    log(mean_g A_sum_g(i) / (newest + 1 - pos_i) + 1e-6) / 5     normalised H2O (kvpress ObservedAttention)
    log(mean_g sum_{last w queries t} A_g[t, i] + 1e-6) / 5      the attention of the recent window (SnapKV's vote)

``inputs="kv+attention+last"`` adds a third, the attention of the last query alone (TOVA's vote):

    log(mean_g A_g[newest, i] + 1e-6) / 5

The first makes the scorer read the ``attention`` input, the others the ``queries`` input, so it
declares both in ``needs``. They also enter the score directly, s_i += c . a_i with c [S, A] learned
and initialised to (5, 0, ...): an untrained scorer ranks exactly as normalised H2O, the strongest heuristic
downstream, and training learns per head where keys, values and positions correct it.
``inputs="kv+attention+last+pool"`` adds a fourth, the window's vote averaged over each entry's neighbours
in position order (kernel 5, SnapKV's pooling, which keeps whole spans such as a multi-token number):

    log(avg_pool_5(mean_g sum_{last w queries t} A_g[t, .])(i) + 1e-6) / 5

``inputs="kv+window+last"`` reads the window's and the last query's votes only: no ``attention`` input,
so the cache skips the attention sum over every query (since round 19 summed in the attention's own pass, nearly
free on a CPU: benchmarks/cache_overhead.py); untrained, it ranks by the window's vote.
``inputs="kv"`` is KVP's own agent (no optional input).

``h2o_layers`` lists layers whose agents ``score`` does not use: there the score is the first attention feature
alone, 5 a_i = log(normalised H2O + 1e-6), which ranks exactly as ``h2o-norm``. Training still fits every agent
(it calls ``network``). The shipped policy defers in layer 0, where its own ranking cost more perplexity on
validation texts than any heuristic's, even a random one (round 18, docs/learned-eviction.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from agents.mlp_scorer import PerHeadModule
from baselines._attention import avg_pool_in_position_order, window_attention
from kvp_gym.scorers import ScoringView

# the attention features per entry, in order, by ``inputs`` (their importance-store statistic names)
ATTENTION_STATISTICS = {
    "kv": (), "kv+attention": ("h2o", "window"), "kv+attention+last": ("h2o", "window", "last"),
    "kv+window+last": ("window", "last"), "kv+attention+last+pool": ("h2o", "window", "last", "window_pool"),
}
INPUTS = tuple(ATTENTION_STATISTICS)
POSITION_BUCKETS = 32
POOL_KERNEL = 5  # the pooled window vote's neighbourhood (SnapKV's kernel_size in kvpress)


def log_bucket(distance: torch.Tensor) -> torch.Tensor:
    """Non-negative distances (any shape) -> bucket index in [0, 32): two buckets per octave, long."""
    return (torch.log2(1.0 + distance.float().clamp_min(0.0)) * 2.0).long().clamp_max(POSITION_BUCKETS - 1)


def attention_features(*statistics: torch.Tensor) -> torch.Tensor:
    """The attention inputs (the statistics of ``ATTENTION_STATISTICS``), [..., N] each -> [..., N, A]
    (see the module docstring)."""
    return torch.stack([torch.log(statistic.float() + 1e-6) for statistic in statistics], -1) / 5.0


def view_attention_features(view: ScoringView, window: int, names: Sequence[str]) -> torch.Tensor:
    """The attention_features ``names`` (of "h2o", "window", "last", "window_pool") of a view that carries
    ``queries`` (and ``attention`` for "h2o"): [B, H, N, len(names)]. "window_pool" pools the window's vote
    in position order over the view's real entries."""
    recent = window_attention(view, window)  # [B, H, G, w, N]
    vote = recent.sum(3).mean(2)  # the window's vote [B, H, N]: every input with attention features reads it
    statistics = {"window": lambda: vote, "last": lambda: recent[:, :, :, -1].mean(2), "h2o": lambda: (
        view.attention.float().mean(2) / _seen_by(view)[:, None]), "window_pool": lambda: avg_pool_in_position_order(
        vote, view.mask, view.positions, POOL_KERNEL)}
    return attention_features(*(statistics[name]() for name in names))


def _seen_by(view: ScoringView) -> torch.Tensor:
    """[B, N]: how many queries attended to each entry (the newest real position + 1 - its own)."""
    newest = view.positions.masked_fill(~view.mask, -1).amax(-1, keepdim=True)
    return (newest + 1 - view.positions).clamp_min(1).float()


class PerHeadKVPScorer(PerHeadModule):
    """KVP's per-head network (module docstring); ``score(view) -> [B, H, N]``, higher = keep.

    Parameters (S agents, d head_dim, W width, A = len(ATTENTION_STATISTICS[inputs]) when > 0):
        key_w / value_w [S, d, W], key_b / value_b [S, 1, W], relative / absolute [S, 32, W],
        (attention_w [S, A, W], attention_b [S, 1, W], attention_skip [S, 1, A]), hidden1_w / hidden2_w [S, W, W],
        hidden1_b / hidden2_b [S, 1, W], out_w [S, W, 1], out_b [S, 1, 1]
    """

    trainable: ClassVar[bool] = True
    registry_name: ClassVar[str] = "kvp-net"

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        width: int = 256,
        inputs: str = "kv",
        window: int = 64,
        heads: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        h2o_layers: Sequence[int] = (),
    ) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, heads)
        if width < 1 or window < 1:
            raise ValueError(f"PerHeadKVPScorer needs width >= 1 and window >= 1, got width={width}, window={window}")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        self.width, self.inputs, self.window, self.seed = width, inputs, window, seed
        self.statistics = ATTENTION_STATISTICS[inputs]
        self.features = len(self.statistics)
        self.h2o_layers = sorted(set(int(layer) for layer in h2o_layers))
        if self.h2o_layers and self.statistics[:1] != ("h2o",):
            reading = [name for name, statistics in ATTENTION_STATISTICS.items() if statistics[:1] == ("h2o",)]
            raise ValueError(f"h2o_layers needs inputs that read normalised H2O first ({', '.join(reading)}), got {inputs!r}")
        if any(not 0 <= layer < num_layers for layer in self.h2o_layers):
            raise ValueError(f"h2o_layers must be layers of the model (0..{num_layers - 1}), got {list(h2o_layers)}")
        needs = {"queries"} if self.statistics else set()  # the window's and the last query's votes
        self.needs = frozenset(needs | {"attention"} if "h2o" in self.statistics else needs)
        slots, generator = len(self.heads), torch.Generator().manual_seed(seed)

        def linear(fan_in: int, fan_out: int, gain: float = 1.0) -> tuple[nn.Parameter, nn.Parameter]:
            weight = gain * torch.randn(slots, fan_in, fan_out, generator=generator) / math.sqrt(fan_in)
            return nn.Parameter(weight), nn.Parameter(torch.zeros(slots, 1, fan_out))

        self.key_w, self.key_b = linear(head_dim, width)
        self.value_w, self.value_b = linear(head_dim, width)
        self.relative = nn.Parameter(0.1 * torch.randn(slots, POSITION_BUCKETS, width, generator=generator))
        self.absolute = nn.Parameter(0.1 * torch.randn(slots, POSITION_BUCKETS, width, generator=generator))
        if self.features:
            self.attention_w, self.attention_b = linear(self.features, width)
            skip = torch.zeros(slots, 1, self.features)
            skip[..., 0] = 5.0  # undoes the / 5: the score starts as the first feature's log (H2O or the window)
            self.attention_skip = nn.Parameter(skip)
        self.hidden1_w, self.hidden1_b = linear(width, width)
        self.hidden2_w, self.hidden2_b = linear(width, width)
        # a small output layer: the initial policy is close to uniform
        self.out_w, self.out_b = linear(width, 1, gain=0.1)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``PerHeadKVPScorer(**scorer.config())`` rebuilds it."""
        return {**self.head_config(), "width": self.width, "inputs": self.inputs, "window": self.window, "seed": self.seed,
                "h2o_layers": self.h2o_layers}

    def with_h2o_layers(self, layers: Sequence[int]) -> PerHeadKVPScorer:
        """A copy with these weights that ranks ``layers`` by normalised H2O (``[]``: by its agents in every layer)."""
        copy = PerHeadKVPScorer(**{**self.config(), "h2o_layers": layers})
        copy.load_state_dict(self.state_dict())
        return copy.train(self.training)

    def score(self, view: ScoringView) -> torch.Tensor:
        """Scores [B, H, N] (float32)."""
        b, h, n, d = view.keys.shape
        if d != self.head_dim:
            raise ValueError(f"view has head_dim {d}, this scorer was built for {self.head_dim}")
        slots = self.slots(view.layer, view.kv_heads).reshape(-1)
        positions = view.positions.masked_fill(~view.mask, 0)
        newest = positions.amax(-1, keepdim=True)
        extra = None
        if self.features:
            extra = view_attention_features(view, self.window, self.statistics).reshape(b * h, n, self.features)
        deferred = torch.isin(view.layer, torch.tensor(self.h2o_layers, dtype=torch.long, device=view.layer.device))
        if self.h2o_layers and bool(deferred.all()):  # the cache scores one layer at a time: no agent runs in a deferred layer
            return 5.0 * extra[..., 0].view(b, h, n)
        scores = self.network(
            slots,
            view.keys.reshape(b * h, n, d).float(),
            view.values.reshape(b * h, n, d).float(),
            (newest - positions)[:, None].expand(b, h, n).reshape(b * h, n),
            positions[:, None].expand(b, h, n).reshape(b * h, n),
            extra,
        ).view(b, h, n)
        if bool(deferred.any()):
            scores = torch.where(deferred[:, None, None], 5.0 * extra[..., 0].view(b, h, n), scores)
        return scores

    def forward(self, view: ScoringView) -> torch.Tensor:
        return self.score(view)

    def network(
        self,
        slots: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        recency: torch.Tensor,
        positions: torch.Tensor,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-row network: slots [R], keys / values [R, N, d], recency / positions [R, N] (long),
        attention [R, N, A] or None -> scores [R, N]. Row r runs agent ``slots[r]``."""
        width = self.width

        def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(bias[slots], x, weight[slots])

        def embed(table: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:  # row r's own table: rows of r's block
            offsets = torch.arange(len(slots), device=distance.device)[:, None] * POSITION_BUCKETS
            return F.embedding(log_bucket(distance) + offsets, table[slots].reshape(-1, width))

        def norm(x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, (width,))

        # summed in place: each term is a fresh [R, N, W] tensor that no backward reads (LayerNorm keeps its input)
        x = norm(project(keys, self.key_w, self.key_b))
        x += norm(project(values, self.value_w, self.value_b))
        x += embed(self.relative, recency)
        x += embed(self.absolute, positions)
        if attention is not None:
            x += norm(project(attention, self.attention_w, self.attention_b))
        x = F.silu(project(norm(x), self.hidden1_w, self.hidden1_b))
        x = F.silu(project(norm(x), self.hidden2_w, self.hidden2_b))
        scores = project(x, self.out_w, self.out_b)[..., 0]
        if attention is not None:
            scores = scores + (attention * self.attention_skip[slots]).sum(-1)
        return scores
