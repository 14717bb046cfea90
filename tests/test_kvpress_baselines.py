"""kvpress's normalised H2O (``h2o-norm``) and ExpectedAttention (``expected-attention``) against
written-out implementations of kvpress's formulas: a hand-made tiny case with loops, and for
``h2o-norm`` a real prefill in the cache against attention computed explicitly.

(kvpress itself cannot be installed offline, so its perplexity is not compared here.)
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from baselines import ExpectedAttention, ObservedAttention
from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.models import capture_qkv
from kvp_gym.scorers import MissingInputError, ScoringView

from conftest import tiny_llama

THETA = 100.0


def rope(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own Llama RoPE cos, sin [T, d] (float64) at ``positions``."""
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA})
    emb = LlamaRotaryEmbedding(config)
    cos, sin = emb(torch.zeros(1, dtype=torch.float64), positions[None])
    return cos[0].double(), sin[0].double()


def hand_case(seed: int = 0, h: int = 2, g: int = 2, t: int = 10, d: int = 4):
    """Pre-RoPE queries [H, G, T, d] at positions 0..T-1, their post-RoPE view, keys and values."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(h, g, t, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(h, t, d, generator=gen, dtype=torch.float64)
    values = torch.randn(h, t, d, generator=gen, dtype=torch.float64)
    cos, sin = rope(d, torch.arange(t))
    post, _ = apply_rotary_pos_emb(pre, pre, cos, sin, unsqueeze_dim=0)  # each query by its own position
    view = ScoringView(
        keys=keys[None], values=values[None], positions=torch.arange(t)[None], mask=torch.ones(1, t, dtype=torch.bool),
        layer=torch.zeros(1, dtype=torch.long), kv_heads=torch.arange(h)[None], num_layers=1, num_kv_heads=h,
        queries=post[None], query_positions=torch.arange(t)[None], rope_theta=THETA,
    )
    return pre, keys, values, view


def kvpress_expected_attention(pre, keys, values, n_sink=4, n_future=512, epsilon=0.0, use_covariance=True):
    """kvpress ExpectedAttentionPress.score on a prefill of T tokens, written out loop by loop.

    pre [H, G, T, d] pre-RoPE queries; keys, values [H, T, d]. Returns scores [H, T - n_sink] of the
    non-sink keys.
    """
    h, g, t, d = pre.shape
    cos, sin = rope(d, torch.arange(t, t + n_future))
    # R = mean_t (cos_t * I + sin_t * P), P[d/2:, :d/2] = I, P[:d/2, d/2:] = -I  (kvpress apply_avg_rope)
    p = [[0.0] * d for _ in range(d)]
    for i in range(d // 2):
        p[d // 2 + i][i] = 1.0
        p[i][d // 2 + i] = -1.0
    r = [[sum(cos[s][j].item() * (i == j) + sin[s][j].item() * p[i][j] for s in range(n_future)) / n_future
          for j in range(d)] for i in range(d)]
    out = torch.zeros(h, t - n_sink, dtype=torch.float64)
    for head in range(h):
        probs_sum = [0.0] * (t - n_sink)
        for q_head in range(g):
            rows = [pre[head, q_head, s].tolist() for s in range(n_sink, t)]
            count = len(rows)
            mu = [sum(row[i] for row in rows) / count for i in range(d)]
            cov = [[sum((row[i] - mu[i]) * (row[j] - mu[j]) for row in rows) / count for j in range(d)] for i in range(d)]
            rmu = [sum(r[i][k] * mu[k] for k in range(d)) for i in range(d)]
            rcov = [[sum(r[i][a] * cov[a][b] * r[j][b] for a in range(d) for b in range(d)) for j in range(d)] for i in range(d)]
            z = []
            for key in range(n_sink, t):
                k = keys[head, key].tolist()
                value = sum(k[i] * rmu[i] for i in range(d)) / math.sqrt(d)
                if use_covariance:
                    value += sum(k[i] * rcov[i][j] * k[j] for i in range(d) for j in range(d)) / d / 2
                z.append(value)
            top = max(z)
            total = sum(math.exp(x - top) for x in z)
            for i, x in enumerate(z):
                probs_sum[i] += math.exp(x - top) / total
        for i in range(t - n_sink):
            norm = math.sqrt(sum(x * x for x in values[head, n_sink + i].tolist()))
            out[head, i] = (probs_sum[i] / g + epsilon) * norm
    return out


@pytest.mark.parametrize(("config", "seed"), [({}, 0), ({"epsilon": 1e-2}, 1), ({"use_covariance": False}, 2),
                                              ({"n_sink": 2, "n_future_positions": 64}, 3)])
def test_expected_attention_matches_kvpress_loops(config, seed):
    pre, keys, values, view = hand_case(seed)
    scorer = ExpectedAttention(**config)
    scores = scorer.score(view)[0]
    n_sink = scorer.n_sink
    expected = kvpress_expected_attention(pre, keys, values, n_sink, scorer.n_future_positions, scorer.epsilon,
                                          scorer.use_covariance)
    torch.testing.assert_close(scores[:, n_sink:], expected, rtol=1e-6, atol=1e-9)  # transformers makes inv_freq in float32
    assert (scores[:, :n_sink] > scores[:, n_sink:].amax(-1, keepdim=True)).all()  # sinks kept


def test_expected_attention_ignores_padding_queries_and_entries():
    pre, keys, values, view = hand_case(4)
    expected = ExpectedAttention().score(view)
    h, g, t, d = pre.shape
    pad_q = torch.full((1, h, g, 3, d), math.nan, dtype=torch.float64)
    padded = ScoringView(
        keys=torch.cat([torch.full((1, h, 2, d), math.nan, dtype=torch.float64), view.keys], 2),
        values=torch.cat([torch.full((1, h, 2, d), math.nan, dtype=torch.float64), view.values], 2),
        positions=torch.cat([torch.tensor([[0, 0]]), view.positions], 1),
        mask=torch.cat([torch.zeros(1, 2, dtype=torch.bool), view.mask], 1),
        layer=view.layer, kv_heads=view.kv_heads, num_layers=1, num_kv_heads=h,
        queries=torch.cat([pad_q.nan_to_num(0.0), view.queries], 3),
        query_positions=torch.cat([torch.full((1, 3), -1), view.query_positions], 1), rope_theta=THETA,
    )
    torch.testing.assert_close(ExpectedAttention().score(padded)[..., 2:], expected)


def test_expected_attention_needs_rope_theta():
    _, _, _, view = hand_case()
    view.rope_theta = None
    with pytest.raises(MissingInputError, match="rope_theta"):
        ExpectedAttention().score(view)


def test_h2o_norm_hand():
    # two query heads, 4 entries at positions 0..3: s_i = mean_g attention / (4 - i)
    attention = torch.tensor([[[[4.0, 3.0, 2.0, 1.0], [2.0, 3.0, 4.0, 1.0]]]])
    view = ScoringView(keys=torch.zeros(1, 1, 4, 2), values=torch.zeros(1, 1, 4, 2), positions=torch.arange(4)[None],
                       mask=torch.ones(1, 4, dtype=torch.bool), layer=torch.zeros(1, dtype=torch.long),
                       kv_heads=torch.zeros(1, 1, dtype=torch.long), num_layers=1, num_kv_heads=1, attention=attention)
    torch.testing.assert_close(ObservedAttention().score(view), torch.tensor([[[3 / 4, 3 / 3, 3 / 2, 1 / 1]]]))


def test_registered_names_and_default_policies():
    from kvp_gym.eval.leaderboard import default_policies

    assert isinstance(scorers.get("h2o-norm"), ObservedAttention)
    assert isinstance(scorers.get("expected-attention"), ExpectedAttention)
    assert {"h2o-norm", "expected-attention"} <= set(default_policies())


class Recording:
    """Wraps a scorer; keeps the scores of each compression."""

    def __init__(self, scorer) -> None:
        self.scorer, self.needs, self.scores = scorer, scorer.needs, []

    def score(self, view):
        scores = self.scorer.score(view)
        self.scores.append(scores.clone())
        return scores


def explicit_h2o_norm(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [Hkv, T]: kvpress ObservedAttention from the prefill's attention computed explicitly."""
    _, captured = capture_qkv(model, ids, dtype=torch.float32)
    out = []
    for layer in range(model.config.num_hidden_layers):
        q, k = captured.q[layer].double(), captured.k[layer].double()  # [Hq, T, d], [Hkv, T, d]
        hq, t, d = q.shape
        hkv = k.shape[0]
        k = k.repeat_interleave(hq // hkv, dim=0)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
        received = logits.softmax(-1).sum(1)  # [Hq, T]: sum over queries
        normalised = received / torch.arange(t, 0, -1, dtype=torch.float64)  # T - i queries saw entry i
        out.append(normalised.view(hkv, hq // hkv, t).mean(1))
    return out


def test_h2o_norm_on_a_real_prefill_matches_explicit_attention():
    model = tiny_llama()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    expected = explicit_h2o_norm(model, ids)
    recorder = Recording(ObservedAttention())
    with torch.no_grad():
        cache = EvictingCache(recorder, 24, config=model.config)
        model(ids, cache=cache, use_cache=True)
        cache.flush()
    assert len(recorder.scores) == 2
    for got, want in zip(recorder.scores, expected):
        torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-6)


def test_h2o_norm_with_left_padding_equals_the_row_alone():
    model = tiny_llama()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    expected = explicit_h2o_norm(model, ids[:, :34])  # the padded row's real tokens, alone
    batch = torch.cat([ids, torch.cat([torch.zeros(1, 6, dtype=torch.long), ids[:, :34]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    recorder = Recording(ObservedAttention())
    with torch.no_grad():
        cache = EvictingCache(recorder, 24, config=model.config)
        model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache, use_cache=True)
        cache.flush()
    for got, want in zip(recorder.scores, expected):
        torch.testing.assert_close(got[1, :, 6:].double(), want, rtol=1e-4, atol=1e-6)


def test_expected_attention_runs_in_the_cache_and_sees_the_whole_prefill():
    model = tiny_llama()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    _, captured = capture_qkv(model, ids, dtype=torch.float32)
    recorder = Recording(ExpectedAttention())
    with torch.no_grad():
        cache = EvictingCache(recorder, 24, config=model.config)
        model(ids, cache=cache, use_cache=True)
        cache.flush()
    # the same scores as a view built by hand from the captured post-RoPE queries and keys
    for layer, got in enumerate(recorder.scores):
        q, k, v = captured.q[layer], captured.k[layer], captured.v[layer]
        view = ScoringView(keys=k[None], values=v[None], positions=torch.arange(40)[None],
                           mask=torch.ones(1, 40, dtype=torch.bool), layer=torch.tensor([layer]),
                           kv_heads=torch.arange(2)[None], num_layers=2, num_kv_heads=2,
                           queries=q.view(2, 2, 40, 16)[None], query_positions=torch.arange(40)[None],
                           rope_theta=float(model.config.rope_parameters["rope_theta"]))
        torch.testing.assert_close(got, ExpectedAttention().score(view), rtol=1e-4, atol=1e-6)
