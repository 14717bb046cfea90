"""Every reward variant of KVEvict-v0 against its loop-by-loop definition on a tiny real trace.

The env's importance (shown with obs_future=True, the target the reward ranks against) must equal

    I_n(i) = sum_{n <= j < n + f} agg_{g in group(h)} softmax_j(q_gj . K[:j+1] / sqrt(d))[i]   (x ||v_i|| if value_weighted)

written out query by query here.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvp_gym.envs.kv_evict import KVEvictEnv


def loop_importance(trace, layer: int, head: int, n: int, agg: str, horizon: int | None, value_weighted: bool) -> torch.Tensor:
    q, k, v = trace.q(layer), trace.k(layer), trace.v(layer)
    group = q.shape[0] // k.shape[0]
    end = trace.length if horizon is None else min(n + horizon, trace.length)
    total = torch.zeros(n)
    for j in range(n, end):
        rows = [torch.softmax(q[g, j] @ k[head, : j + 1].T / math.sqrt(q.shape[-1]), -1)[:n]
                for g in range(head * group, (head + 1) * group)]
        stacked = torch.stack(rows)
        total += stacked.amax(0) if agg == "max" else stacked.mean(0)
    return total * v[head, :n].norm(dim=-1) if value_weighted else total


@pytest.mark.parametrize("agg, horizon, value_weighted", [
    ("max", None, False), ("mean", None, False), ("max", 8, False), ("max", None, True), ("mean", 16, True),
])
def test_env_importance_matches_its_definition(tiny_traces, agg: str, horizon: int | None, value_weighted: bool) -> None:
    env = KVEvictEnv(tiny_traces, agg=agg, horizon=horizon, value_weighted=value_weighted, obs_future=True,
                     max_tokens=96, prefix=(40, 70))
    for seed in range(3):
        obs, info = env.reset(seed=seed, options={"trace": seed % len(tiny_traces)})
        n = int(obs["mask"].sum())
        expected = loop_importance(tiny_traces[seed % len(tiny_traces)], int(obs["layer"]), int(obs["kv_head"]), n,
                                   agg, horizon, value_weighted)
        torch.testing.assert_close(torch.as_tensor(obs["future_importance"][:n]).float(), expected, rtol=1e-4, atol=1e-6)


def test_value_weighting_must_be_a_bool(tiny_traces) -> None:
    with pytest.raises(ValueError, match="value_weighted"):
        KVEvictEnv(tiny_traces, value_weighted=1)
