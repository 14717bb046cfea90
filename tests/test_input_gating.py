"""Inputs by declaration: every consumer (env adapter, leaderboard ranking, inference cache) hands a
scorer exactly the optional inputs it declares in ``needs``, and nothing more."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvp_gym.cache import EvictingCache
from kvp_gym.envs.adapters import ScorerPolicy, obs_to_view
from kvp_gym.envs.kv_evict import KVEvictEnv
from kvp_gym.eval.ranking import SuiteRanking
from kvp_gym.eval.suite import Suite
from kvp_gym.scorers import OPTIONAL_INPUTS, LayerMix, declared_view
from kvp_gym.traces import TraceDataset

from conftest import tiny_llama

SEEN = ("queries", "query_positions", "attention", "future_importance")


class Cheater:
    """Reads every optional input whatever it declares, and records what it saw (None or a tensor)."""

    def __init__(self, needs: frozenset[str] = frozenset()) -> None:
        self.needs = needs
        self.seen: list[dict[str, bool]] = []

    def score(self, view):
        self.seen.append({name: getattr(view, name) is not None for name in SEEN})
        return view.keys.float().norm(dim=-1)  # [B, H, N]


def assert_saw_exactly(cheater: Cheater, declared: set[str]) -> None:
    assert cheater.seen, "the scorer was never called"
    expected = {name: name in declared for name in OPTIONAL_INPUTS}
    expected["query_positions"] = "queries" in declared
    for seen in cheater.seen:
        assert seen == expected


DECLARATIONS = [set(), {"queries"}, {"attention"}, {"queries", "attention", "future_importance"}]


@pytest.mark.parametrize("declared", DECLARATIONS, ids=str)
def test_env_adapter_hands_only_declared_inputs(tiny_traces, declared):
    env = KVEvictEnv(str(tiny_traces.directory), max_tokens=64, obs_queries=4, obs_attention=True, obs_future=True)
    obs, _ = env.reset(seed=0)
    full = obs_to_view(obs, env.model_spec)
    assert all(getattr(full, name) is not None for name in SEEN)  # the env computed everything
    cheater = Cheater(frozenset(declared))
    action = ScorerPolicy(cheater, env.model_spec).act(obs)
    assert action.shape == obs["mask"].shape
    assert_saw_exactly(cheater, declared)
    assert full.future_importance is not None  # gating copies; the observation's view is unchanged


def test_declared_view_blanks_and_keeps(tiny_traces):
    env = KVEvictEnv(str(tiny_traces.directory), max_tokens=64, obs_queries=4, obs_attention=True, obs_future=True)
    obs, _ = env.reset(seed=1)
    view = obs_to_view(obs, env.model_spec)
    everything = Cheater(frozenset(OPTIONAL_INPUTS))
    assert declared_view(everything, view) is view
    blank = declared_view(Cheater(), view)
    assert all(getattr(blank, name) is None for name in SEEN)
    assert torch.equal(blank.keys, view.keys) and blank.rope_theta == view.rope_theta


@pytest.mark.parametrize("declared", DECLARATIONS, ids=str)
def test_leaderboard_ranking_hands_only_declared_inputs(tiny_traces, declared):
    suite = Suite(name="gating", version=1, model="tiny", sources=("random-tokens",), traces_per_source=1, length=96,
                  prefix_fractions=(0.5, 0.75), budgets=(32,), ppl_prefix=48, ppl_sources=(), query_window=8)
    ranking = SuiteRanking(suite, "random-tokens", TraceDataset(tiny_traces.directory))
    cheater = Cheater(frozenset(declared))
    records = ranking.evaluate(0, {"cheater": cheater})
    assert np.isfinite(records[0]["cost_ratio"]).all()
    assert_saw_exactly(cheater, declared)


@pytest.mark.parametrize("declared", [set(), {"queries"}, {"attention"}, {"queries", "attention"}], ids=str)
def test_cache_hands_only_declared_inputs(declared):
    model = tiny_llama()
    cheater = Cheater(frozenset(declared))
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = EvictingCache(cheater, 24, config=model.config, every=4)
        model(ids, cache=cache, use_cache=True)
        for _ in range(5):
            model(ids[:, :1], cache=cache, use_cache=True)
    assert cache.report().compressions >= 2  # the per-head (H = 1) views after divergent eviction too
    assert_saw_exactly(cheater, declared)
    assert cache.settings.rope_theta == model.config.rope_parameters["rope_theta"]


def test_cache_refuses_a_future_scorer():
    with pytest.raises(ValueError, match="future"):
        EvictingCache(Cheater(frozenset({"future_importance"})), 24, config=tiny_llama().config)


def test_layer_mix_takes_each_part_in_its_layers_and_gates_both(tiny_traces):
    """Rows of a view stacked over two layers: the mix scores layer 1 as ``other`` and layer 0 as ``base``, each
    part seeing only what it declares; a view of one part's layers alone never calls the other."""
    env = KVEvictEnv(str(tiny_traces.directory), max_tokens=64, obs_queries=4, obs_attention=True, obs_future=True)
    obs, _ = env.reset(seed=2)
    view = obs_to_view(obs, env.model_spec)
    stacked = dataclasses.replace(
        view, **{name: torch.cat([getattr(view, name)] * 2) for name in ("keys", "values", "positions", "mask", "kv_heads",
                                                                          "queries", "query_positions", "attention",
                                                                          "future_importance")},
        layer=torch.tensor([0, 1]))
    base, other = Cheater(frozenset({"attention"})), Cheater(frozenset({"queries"}))
    other.window_size = 8
    mix = LayerMix(base, other, layers=[1])
    assert mix.needs == {"attention", "queries"} and mix.window_size == 8
    scores = mix.score(stacked)
    expected = stacked.keys.float().norm(dim=-1)
    assert torch.equal(scores, expected)
    assert_saw_exactly(base, {"attention"}) and assert_saw_exactly(other, {"queries"})
    other.score = lambda view: torch.zeros(view.shape)  # now distinguishable: layer 1's rows come from it
    assert torch.equal(mix.score(stacked)[1], torch.zeros_like(expected[1])) and torch.equal(mix.score(stacked)[0], expected[0])
    calls = len(base.seen)
    only_other = dataclasses.replace(stacked, layer=torch.tensor([1, 1]))
    assert torch.equal(mix.score(only_other), torch.zeros_like(expected)) and len(base.seen) == calls
