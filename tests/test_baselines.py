"""Tests of the heuristic zoo in ``baselines/``: hand-computed cases, the registry, missing inputs,
config validation, padding invariance, batching, and straightforward reference implementations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines import H2O, TOVA, KeyDiff, KNorm, LagKV, Oracle, RandomScorer, SnapKV, StreamingLLM
from baselines._attention import window_attention
from kvp_gym import scorers
from kvp_gym.scorers import MissingInputError, Scorer, ScoringView

CLASSES = {
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "tova": TOVA,
    "knorm": KNorm,
    "keydiff": KeyDiff,
    "lagkv": LagKV,
    "random": RandomScorer,
    "oracle": Oracle,
}

# Deterministic scorers with configs small enough to exercise every branch on a dozen entries.
DETERMINISTIC = [
    StreamingLLM(),
    StreamingLLM(n_sink=2),
    H2O(),
    H2O(recent_window=3),
    SnapKV(),
    SnapKV(window_size=3, kernel_size=3),
    TOVA(),
    KNorm(),
    KeyDiff(),
    LagKV(),
    LagKV(n_sink=1, lag_size=2),
    LagKV(n_sink=2, lag_size=3, cross_scoring=True),
    Oracle(),
]


# ----------------------------------------------------------------------------- view builders


def make_view(keys, values=None, positions=None, mask=None, **optional) -> ScoringView:
    """A ScoringView around keys [B, H, N, d]; defaults: values = keys, positions 0..N-1, no padding."""
    b, h, n, _ = keys.shape
    return ScoringView(
        keys=keys,
        values=keys if values is None else values,
        positions=torch.arange(n).repeat(b, 1) if positions is None else positions,
        mask=torch.ones(b, n, dtype=torch.bool) if mask is None else mask,
        layer=torch.zeros(b, dtype=torch.long),
        kv_heads=torch.arange(h).repeat(b, 1),
        num_layers=1,
        num_kv_heads=h,
        **optional,
    )


def random_view(seed: int, b: int, h: int, g: int, n: int, d: int, w: int) -> ScoringView:
    """Random float64 view: distinct shuffled positions, queries at the w largest positions."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(3 * n, generator=gen)[:n] for _ in range(b)])
    w = min(w, n)
    return ScoringView(
        keys=torch.randn(b, h, n, d, generator=gen, dtype=torch.float64),
        values=torch.randn(b, h, n, d, generator=gen, dtype=torch.float64),
        positions=positions,
        mask=torch.ones(b, n, dtype=torch.bool),
        layer=torch.randint(0, 30, (b,), generator=gen),
        kv_heads=torch.arange(h).repeat(b, 1),
        num_layers=30,
        num_kv_heads=h,
        queries=torch.randn(b, h, g, w, d, generator=gen, dtype=torch.float64),
        query_positions=positions.topk(w, dim=-1).values.flip(-1),
        attention=torch.rand(b, h, g, n, generator=gen, dtype=torch.float64) * n,
        future_importance=torch.rand(b, h, n, generator=gen, dtype=torch.float64),
    )


def pad_view(view: ScoringView, n_pad: int, seed: int) -> tuple[ScoringView, torch.Tensor]:
    """Scatter ``n_pad`` padded slots (NaN states, random positions) among each row's entries.

    Returns the padded view and slots [B, N]: real entry i of row b sits at slots[b, i].
    """
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = view.keys.shape
    total = n + n_pad
    slots = torch.stack([torch.randperm(total, generator=gen)[:n] for _ in range(b)])

    def spread(x: torch.Tensor | None, axis: int) -> torch.Tensor | None:
        """Place x (real entries on ``axis``) into a NaN tensor with N + n_pad entries there."""
        if x is None:
            return None
        shape = list(x.shape)
        shape[axis] = total
        index = slots.view(b, *([1] * (axis - 1)), n, *([1] * (x.dim() - axis - 1))).expand(x.shape)
        return torch.full(shape, math.nan, dtype=x.dtype).scatter(axis, index, x)

    padded_positions = torch.randint(0, 3 * n + 1, (b, total), generator=gen)
    return (
        dataclasses.replace(
            view,
            keys=spread(view.keys, 2),
            values=spread(view.values, 2),
            positions=padded_positions.scatter(1, slots, view.positions),
            mask=torch.zeros(b, total, dtype=torch.bool).scatter(1, slots, True),
            attention=spread(view.attention, 3),
            future_importance=spread(view.future_importance, 2),
        ),
        slots,
    )


def rows(view: ScoringView, index: slice) -> ScoringView:
    """The batch rows ``index`` of a view."""
    return dataclasses.replace(
        view,
        **{
            f.name: getattr(view, f.name)[index]
            for f in dataclasses.fields(view)
            if isinstance(getattr(view, f.name), torch.Tensor)
        },
    )


# ----------------------------------------------------------------------------- hand-computed cases


def test_streamingllm_hand():
    view = make_view(torch.zeros(1, 1, 5, 2))
    assert torch.equal(StreamingLLM(n_sink=2).score(view), torch.tensor([[[5.0, 5.0, 2.0, 3.0, 4.0]]]))
    # after earlier evictions, in arbitrary cache order: sinks are true positions < n_sink
    view = make_view(torch.zeros(1, 1, 4, 2), positions=torch.tensor([[9, 0, 7, 1]]))
    assert torch.equal(StreamingLLM(n_sink=2).score(view), torch.tensor([[[9.0, 10.0, 7.0, 10.0]]]))


def test_h2o_hand():
    attention = torch.tensor([[[[3.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.5, 0.5]]]])  # [1, 1, G=2, 4]
    view = make_view(torch.zeros(1, 1, 4, 2), attention=attention)
    assert torch.equal(H2O().score(view), torch.tensor([[[2.0, 1.0, 1.0, 0.5]]]))
    # the 2 most recent entries are pinned above the best heavy hitter (2 + 1)
    assert torch.equal(H2O(recent_window=2).score(view), torch.tensor([[[2.0, 1.0, 3.0, 3.0]]]))


def test_snapkv_hand_pooling():
    # d = 1, q = 1: logits are the keys, so exp(logits) = 1, 2, 3, 2 and A = [1, 2, 3, 2] / 8.
    keys = torch.tensor([0.0, math.log(2), math.log(3), math.log(2)]).view(1, 1, 4, 1)
    view = make_view(keys, queries=torch.ones(1, 1, 1, 1, 1), query_positions=torch.tensor([[3]]))
    # window = 1 query -> key 3 is the window; keys 0..2 pooled with kernel 3 and zero padding:
    # [(0 + 1/8 + 2/8) / 3, (1/8 + 2/8 + 3/8) / 3, (2/8 + 3/8 + 0) / 3]; window = max + 1
    expected = torch.tensor([[[1 / 8, 1 / 4, 5 / 24, 5 / 4]]])
    torch.testing.assert_close(SnapKV(window_size=3, kernel_size=3).score(view), expected)


def test_snapkv_hand_causal_window():
    # two queries at positions 1 and 2; the one at 1 cannot see key 2.
    keys = torch.tensor([0.0, math.log(3), 0.0]).view(1, 1, 3, 1)
    view = make_view(keys, queries=torch.ones(1, 1, 1, 2, 1), query_positions=torch.tensor([[1, 2]]))
    # A(q@1) = [1, 3] / 4 on keys 0, 1; A(q@2) = [1, 3, 1] / 5; key 0: (1/4 + 1/5) / 2 = 9/40
    expected = torch.tensor([[[9 / 40, 49 / 40, 49 / 40]]])
    torch.testing.assert_close(SnapKV(window_size=2, kernel_size=1).score(view), expected)


def test_window_attention_hand():
    # d = 1, keys log(1), log(3), log(2): a padding query (position -1) sees no key and attends to nothing; the one
    # at 1 sees keys 0, 1 (A = [1, 3] / 4); the one at 2 all three (A = [1, 3, 2] / 6). Exact zeros where unseen.
    keys = torch.tensor([0.0, math.log(3), math.log(2)]).view(1, 1, 3, 1)
    view = make_view(keys, queries=torch.ones(1, 1, 1, 3, 1), query_positions=torch.tensor([[-1, 1, 2]]))
    expected = torch.tensor([[0.0, 0.0, 0.0], [1 / 4, 3 / 4, 0.0], [1 / 6, 3 / 6, 2 / 6]]).view(1, 1, 1, 3, 3)
    attention = window_attention(view, 3)
    torch.testing.assert_close(attention, expected)
    assert bool((attention[..., 0, :] == 0).all()) and attention[..., 1, 2].item() == 0.0
    torch.testing.assert_close(window_attention(view, 2), expected[..., 1:, :])


def test_tova_hand():
    # two KV heads, G = 1, d = 1, q = 1: head 0 attends [1, 2, 1] / 4, head 1 [1, 1, 2] / 4.
    keys = torch.tensor([[0.0, math.log(2), 0.0], [0.0, 0.0, math.log(2)]]).view(1, 2, 3, 1)
    view = make_view(keys, queries=torch.ones(1, 2, 1, 1, 1), query_positions=torch.tensor([[2]]))
    # mean over heads [1/4, 3/8, 3/8], copied to both heads; the query's own key pinned to 3/8 + 1
    expected = torch.tensor([[[1 / 4, 3 / 8, 11 / 8], [1 / 4, 3 / 8, 11 / 8]]])
    torch.testing.assert_close(TOVA().score(view), expected)


def test_knorm_hand():
    view = make_view(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]).view(1, 1, 3, 2))
    assert torch.equal(KNorm().score(view), torch.tensor([[[-5.0, -1.0, 0.0]]]))


def test_keydiff_hand():
    # unit keys [1, 0], [0, 1], [1, 0] -> anchor [2/3, 1/3]; cos = 2/sqrt5, 1/sqrt5, 2/sqrt5
    view = make_view(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]).view(1, 1, 3, 2))
    r5 = math.sqrt(5)
    torch.testing.assert_close(KeyDiff().score(view), torch.tensor([[[-2 / r5, -1 / r5, -2 / r5]]]))


def test_lagkv_hand():
    # n_sink = 1, lag = 2: sink [0], partition [1, 2] scored against reference [3, 4], tail [3, 4].
    keys = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0]]).view(1, 1, 5, 2)
    view = make_view(keys)
    # reference min [0, 0], max [1, 1]: normalised [1, 0] (std sqrt(1/2)) and [.5, .5] (std 0)
    assert torch.equal(LagKV(n_sink=1, lag_size=2).score(view), torch.tensor([[[1.0, 0.5, 0.0, 1.0, 1.0]]]))
    p = 1 / (1 + math.exp(-math.sqrt(0.5)))  # softmax([sqrt(1/2), 0])
    expected = torch.tensor([[[1.0, p, 1 - p, 1.0, 1.0]]])
    torch.testing.assert_close(LagKV(n_sink=1, lag_size=2, cross_scoring=True).score(view), expected)
    # fewer than n_sink + 2 * lag entries: sinks 1, the rest by recency j / (n - n_sink)
    short = make_view(keys[:, :, :4])
    expected = torch.tensor([[[1.0, 0.0, 1 / 3, 2 / 3]]])
    torch.testing.assert_close(LagKV(n_sink=1, lag_size=2).score(short), expected)


def test_oracle_returns_future_importance():
    future = torch.tensor([[[0.5, 2.0, 0.0]]])
    assert torch.equal(Oracle().score(make_view(torch.zeros(1, 1, 3, 2), future_importance=future)), future)


def test_random_is_seeded_and_fresh_per_call():
    view = make_view(torch.zeros(2, 3, 7, 2))
    a, b, other = RandomScorer(seed=3), RandomScorer(seed=3), RandomScorer(seed=4)
    first = a.score(view)
    assert first.shape == (2, 3, 7) and ((first >= 0) & (first < 1)).all()
    assert torch.equal(first, b.score(view))
    assert torch.equal(a.score(view), b.score(view))
    assert not torch.equal(first, a.score(view))
    assert not torch.equal(first, other.score(view))


# ----------------------------------------------------------------------------- contract and registry


def test_registry_round_trip():
    assert set(CLASSES) <= set(scorers.available())
    for name, cls in CLASSES.items():
        scorer = scorers.get(name)
        assert type(scorer) is cls
        assert isinstance(scorer, Scorer)
        assert scorer.needs <= set(scorers.OPTIONAL_INPUTS)
    assert scorers.get("SnapKV", window_size=8, kernel_size=3) == SnapKV(window_size=8, kernel_size=3)
    assert scorers.get("lagkv", lag_size=16).lag_size == 16


def test_unknown_scorer_lists_known_names():
    with pytest.raises(KeyError) as error:
        scorers.get("no-such-scorer")
    assert all(name in str(error.value) for name in CLASSES)


def test_needs():
    needs = {name: cls.needs for name, cls in CLASSES.items()}
    assert needs == {
        "streamingllm": set(),
        "h2o": {"attention"},
        "snapkv": {"queries"},
        "tova": {"queries"},
        "knorm": set(),
        "keydiff": set(),
        "lagkv": set(),
        "random": set(),
        "oracle": {"future_importance"},
    }


@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "oracle"])
def test_missing_inputs(name):
    scorer = scorers.get(name)
    with pytest.raises(MissingInputError, match=name):
        scorer.score(make_view(torch.zeros(1, 1, 3, 2)))


@pytest.mark.parametrize("name", ["snapkv", "tova"])
def test_queries_without_positions(name):
    view = make_view(torch.zeros(1, 1, 3, 2), queries=torch.zeros(1, 1, 1, 1, 2))
    with pytest.raises(MissingInputError, match="query_positions"):
        scorers.get(name).score(view)


@pytest.mark.parametrize(
    ("name", "config", "field"),
    [
        ("streamingllm", {"n_sink": -1}, "n_sink"),
        ("h2o", {"recent_window": -1}, "recent_window"),
        ("snapkv", {"window_size": 0}, "window_size"),
        ("snapkv", {"kernel_size": 4}, "kernel_size"),
        ("snapkv", {"kernel_size": 0}, "kernel_size"),
        ("snapkv", {"window_size": 3, "kernel_size": 5}, "kernel_size"),
        ("lagkv", {"n_sink": -1}, "n_sink"),
        ("lagkv", {"lag_size": 0}, "lag_size"),
    ],
)
def test_config_validation(name, config, field):
    with pytest.raises(ValueError, match=field):
        scorers.get(name, **config)


# ----------------------------------------------------------------------------- padding and batching


@pytest.mark.parametrize("scorer", DETERMINISTIC, ids=repr)
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    g=st.integers(1, 3),
    n=st.integers(1, 12),
    d=st.integers(2, 5),
    w=st.integers(1, 4),
    n_pad=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_padding_invariance(scorer, b, h, g, n, d, w, n_pad, seed):
    view = random_view(seed, b, h, g, n, d, w)
    padded, slots = pad_view(view, n_pad, seed + 1)
    expected = scorer.score(view)
    got = scorer.score(padded).gather(-1, slots[:, None, :].expand(b, h, n))
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("scorer", DETERMINISTIC, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_batching_equals_rows(scorer, seed):
    view, _ = pad_view(random_view(seed, 3, 2, 3, 11, 4, 3), n_pad=4, seed=seed)
    batched = scorer.score(view)
    for row in range(3):
        real = view.mask[row]
        alone = scorer.score(rows(view, slice(row, row + 1)))[0]
        torch.testing.assert_close(batched[row][:, real], alone[:, real])


# ----------------------------------------------------------------------------- reference implementations


def ref_attention(q, keys, positions, mask, query_position) -> list[float]:
    """softmax(q.k / sqrt(d)) of one query over one head's keys, causal by position, with loops."""
    visible = [i for i in range(len(keys)) if mask[i] and positions[i] <= query_position]
    logits = {i: float(q @ keys[i]) / math.sqrt(len(q)) for i in visible}
    top = max(logits.values(), default=0.0)
    total = sum(math.exp(x - top) for x in logits.values())
    return [math.exp(logits[i] - top) / total if i in logits else 0.0 for i in range(len(keys))]


def ref_pin(scores: list[float], keep: list[int], real: list[int]) -> list[float]:
    others = [scores[i] for i in real if i not in keep]
    top = max(others) + 1 if others else 1.0
    return [top if i in keep else s for i, s in enumerate(scores)]


def ref_snapkv(view: ScoringView, window_size: int, kernel_size: int) -> torch.Tensor:
    b, h, n = view.shape
    g, w_avail = view.queries.shape[2:4]
    w = min(window_size, w_avail)
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        pos, mask = view.positions[bi].tolist(), view.mask[bi].tolist()
        qpos = view.query_positions[bi, -w:].tolist()
        real = [i for i in range(n) if mask[i]]
        window = [i for i in real if pos[i] >= min(qpos)]
        candidates = sorted((i for i in real if i not in window), key=lambda i: pos[i])
        for hi in range(h):
            votes = [0.0] * n
            for gi in range(g):
                for t in range(w):
                    q = view.queries[bi, hi, gi, w_avail - w + t]
                    attention = ref_attention(q, view.keys[bi, hi], pos, mask, qpos[t])
                    for i in range(n):
                        votes[i] += attention[i] / (g * w)
            scores = [0.0] * n
            for rank, i in enumerate(candidates):
                span = range(rank - kernel_size // 2, rank + kernel_size // 2 + 1)
                scores[i] = sum(votes[candidates[j]] for j in span if 0 <= j < len(candidates)) / kernel_size
            out[bi, hi] = torch.tensor(ref_pin(scores, window, real))
    return out


def ref_tova(view: ScoringView) -> torch.Tensor:
    b, h, n = view.shape
    g = view.queries.shape[2]
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        pos, mask = view.positions[bi].tolist(), view.mask[bi].tolist()
        qpos = view.query_positions[bi, -1].item()
        mean = [0.0] * n
        for hi in range(h):
            for gi in range(g):
                attention = ref_attention(view.queries[bi, hi, gi, -1], view.keys[bi, hi], pos, mask, qpos)
                for i in range(n):
                    mean[i] += attention[i] / (h * g)
        real = [i for i in range(n) if mask[i]]
        out[bi, :] = torch.tensor(ref_pin(mean, [i for i in real if pos[i] >= qpos], real))
    return out


def ref_h2o(view: ScoringView, recent_window: int) -> torch.Tensor:
    b, h, n = view.shape
    g = view.attention.shape[2]
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        pos, mask = view.positions[bi].tolist(), view.mask[bi].tolist()
        real = [i for i in range(n) if mask[i]]
        recent = sorted(real, key=lambda i: -pos[i])[:recent_window]
        for hi in range(h):
            heavy = [sum(view.attention[bi, hi, gi, i].item() for gi in range(g)) / g for i in range(n)]
            out[bi, hi] = torch.tensor(ref_pin(heavy, recent, real) if recent_window else heavy)
    return out


def ref_lagkv(view: ScoringView, n_sink: int, lag: int) -> torch.Tensor:
    """kvpress LagKVPress written out per head and per partition, on the position-sorted entries."""
    b, h, n = view.shape
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        order = sorted((i for i in range(n) if view.mask[bi, i]), key=lambda i: view.positions[bi, i].item())
        m = len(order)
        for hi in range(h):
            if m < n_sink + 2 * lag:
                sorted_scores = [1.0] * min(m, n_sink) + [j / (m - n_sink) for j in range(m - n_sink)]
            else:
                sorted_scores = [1.0] * m
                n_parts = (m - n_sink) // lag
                for p in range(n_parts - 1):
                    start = n_sink + p * lag
                    total = torch.zeros(lag, dtype=torch.float64)
                    for states in (view.keys, view.values):
                        x = states[bi, hi, order]
                        part, reference = x[start : start + lag], x[start + lag : start + 2 * lag]
                        low, high = reference.amin(dim=0), reference.amax(dim=0)
                        total += torch.softmax(((part - low) / (high - low)).std(dim=1), dim=0) / 2
                    for j in range(lag):
                        sorted_scores[start + j] = sum(float(total[k] < total[j]) for k in range(lag)) / lag
            for j, i in enumerate(order):
                out[bi, hi, i] = sorted_scores[j]
    return out


REFERENCES = [
    (SnapKV(), lambda v: ref_snapkv(v, 64, 5)),
    (SnapKV(window_size=3, kernel_size=3), lambda v: ref_snapkv(v, 3, 3)),
    (SnapKV(window_size=2, kernel_size=1), lambda v: ref_snapkv(v, 2, 1)),
    (TOVA(), ref_tova),
    (H2O(), lambda v: ref_h2o(v, 0)),
    (H2O(recent_window=4), lambda v: ref_h2o(v, 4)),
    (LagKV(n_sink=2, lag_size=3), lambda v: ref_lagkv(v, 2, 3)),
    (LagKV(n_sink=1, lag_size=2), lambda v: ref_lagkv(v, 1, 2)),
]


@pytest.mark.parametrize(("scorer", "reference"), REFERENCES, ids=[repr(s) for s, _ in REFERENCES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_reference(scorer, reference, seed):
    view, _ = pad_view(random_view(seed, 2, 2, 3, 13, 4, 5), n_pad=3, seed=seed)
    real = view.mask[:, None, :].expand(view.shape)
    torch.testing.assert_close(scorer.score(view)[real], reference(view)[real])
