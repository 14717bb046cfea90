"""Future importance and the golden schedule against brute force and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from hand_traces import HandTrace
from kvp_gym.utility import (
    attention_received,
    block_future_scores,
    future_importance,
    golden_eviction_schedule,
    importance_from_table,
    importance_table,
    num_stream_steps,
)


def brute_force_importance(trace, layer: int, kv_head: int, n: int, agg: str, horizon: int | None) -> torch.Tensor:
    """I_n(i) written out: loop over future queries and the group's heads, softmax over the causal prefix."""
    q, k = trace.q(layer).double(), trace.k(layer).double()
    group = q.shape[0] // k.shape[0]
    end = trace.length if horizon is None else min(n + horizon, trace.length)
    importance = torch.zeros(n, dtype=torch.float64)
    for j in range(n, end):
        per_head = []
        for g in range(kv_head * group, (kv_head + 1) * group):
            logits = torch.stack([q[g, j] @ k[kv_head, i] / math.sqrt(q.shape[2]) for i in range(j + 1)])
            per_head.append(torch.softmax(logits, 0)[:n])
        stacked = torch.stack(per_head)
        importance += stacked.max(0).values if agg == "max" else stacked.mean(0)
    return importance.float()


@pytest.mark.parametrize("agg", ["max", "mean"])
@pytest.mark.parametrize("horizon", [None, 5])
def test_future_importance_matches_brute_force(tiny_traces, agg, horizon):
    trace = tiny_traces[1]
    table = importance_table(trace, 1, agg=agg, chunk=16)
    for kv_head in range(2):
        for n in (1, 37, 95):
            expected = brute_force_importance(trace, 1, kv_head, n, agg, horizon)
            direct = future_importance(trace, 1, kv_head, n, agg=agg, horizon=horizon)
            from_table = importance_from_table(table, n, horizon)[kv_head]
            torch.testing.assert_close(direct, expected, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(from_table, expected, atol=2e-5, rtol=1e-4)


def test_uniform_attention_by_hand():
    # All queries zero: query j attends 1/(j+1) to each of its j+1 keys.
    trace = HandTrace(torch.zeros(2, 4, 2), torch.randn(1, 4, 2))
    importance = future_importance(trace, 0, 0, n=2, agg="max")
    torch.testing.assert_close(importance, torch.tensor([1 / 3 + 1 / 4, 1 / 3 + 1 / 4]))
    received = attention_received(trace, 0, n=3)
    torch.testing.assert_close(received[0, 0], torch.tensor([1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]))


def test_attention_received_rows_sum_to_query_count(tiny_traces):
    received = attention_received(tiny_traces[0], 0, n=50)
    torch.testing.assert_close(received.sum(-1), torch.full((2, 2), 50.0))


def peaked_trace(key_values: list[float]) -> HandTrace:
    """d = 1, every query = 1: A[j, i] is proportional to exp(k_i) over i <= j, so keys rank by k_i."""
    keys = torch.tensor(key_values, dtype=torch.float32)[None, :, None]
    return HandTrace(torch.ones(1, len(key_values), 1), keys)


def test_golden_schedule_by_hand():
    # B = 4, L = 2, T = 10: step 0 appends tokens 4, 5 and evicts the 2 lowest-k of tokens 0..3 (k = 5, 1, 4, 0).
    trace = peaked_trace([5, 1, 4, 0, 3, 2, 6, 7, 8, 9])
    assert num_stream_steps(10, 4, 2) == 2
    schedule = golden_eviction_schedule(trace, 0, budget=4, step=2)
    assert schedule.chunk_ends == [6, 8]
    assert schedule.evicted[0, 0].tolist() == [1, 3]
    # cache is now {0, 2, 4, 5} (k = 5, 4, 3, 2); step 1 appends 6, 7 and evicts the two lowest: 4 and 5.
    assert schedule.evicted[1, 0].tolist() == [4, 5]


def test_block_future_scores_is_suffix_max_of_block_means():
    trace = peaked_trace([0.0, 1.0, 2.0, 3.0])
    scores = block_future_scores(trace, 0, step=2)
    weights = torch.exp(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    block0 = (torch.tensor([1.0, 0, 0, 0]) + torch.cat([weights[:2] / weights[:2].sum(), torch.zeros(2)])) / 2
    block1 = (torch.cat([weights[:3] / weights[:3].sum(), torch.zeros(1)]) + weights / weights.sum()) / 2
    torch.testing.assert_close(scores[0, 1], block1)
    torch.testing.assert_close(scores[0, 0], torch.maximum(block0, block1))
    torch.testing.assert_close(scores[0, 2], torch.zeros(4))


def test_bad_arguments_are_named(tiny_traces):
    trace = tiny_traces[0]
    with pytest.raises(ValueError, match="n must be in"):
        future_importance(trace, 0, 0, n=0)
    with pytest.raises(ValueError, match="n must be in"):
        future_importance(trace, 0, 0, n=trace.length)
    with pytest.raises(IndexError, match="kv_head 2"):
        future_importance(trace, 0, 2, n=10)
    with pytest.raises(IndexError, match="layer 5"):
        future_importance(trace, 5, 0, n=10)
    with pytest.raises(ValueError, match="agg"):
        future_importance(trace, 0, 0, n=10, agg="sum")
    with pytest.raises(ValueError, match="horizon"):
        future_importance(trace, 0, 0, n=10, horizon=0)
    with pytest.raises(ValueError, match="too short"):
        golden_eviction_schedule(trace, 0, budget=64, step=32)
