"""KVEvict-v0: reward functions, observations, seeding, Gymnasium/SB3 API compliance, the native
vector env, the SB3 adapter, scorer policies and argument errors."""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kvp_gym  # noqa: F401  (registers the envs)
from kvp_gym.envs.kv_evict import KVEvictEnv
from kvp_gym.envs.kv_evict_vector import KVEvictVectorEnv
from kvp_gym.envs.adapters import ScorerPolicy, obs_to_view
from kvp_gym.envs.reward import (
    cost_ratio,
    kept_fraction_at,
    kept_fraction_curve,
    optimal_cost,
    ranking_cost,
)
from kvp_gym.envs.sb3 import SB3ObservationNames, SB3VecEnv
from kvp_gym.models import ModelSpec
from kvp_gym.utility import attention_received, future_importance

N = 64  # tiny traces have 96 tokens
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def tiny_dir(tiny_traces):
    return str(tiny_traces.directory)


def make(tiny_dir, **kwargs):
    return KVEvictEnv(tiny_dir, max_tokens=N, **kwargs)


# ----------------------------------------------------------------------------- reward functions


def brute_cost(scores, importance, valid):
    """sum over budgets b of the importance evicted when keeping the top-b (ties: lower index first)."""
    ranked = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-scores[i], i))
    order = [importance[i] for i in ranked]
    return sum(sum(order[b:]) for b in range(1, len(order)))


@FAST
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=st.floats(-3, 3)),
    arrays(np.float64, n, elements=st.floats(0, 1)),
    arrays(np.bool_, n),
)))
def test_ranking_cost_matches_brute_force(case):
    scores, importance, valid = case
    args = (torch.tensor(scores)[None], torch.tensor(importance)[None], torch.tensor(valid)[None])
    assert ranking_cost(*args).item() == pytest.approx(brute_cost(scores, importance, valid), abs=1e-9)
    assert optimal_cost(args[1], args[2]).item() <= ranking_cost(*args).item() + 1e-9
    assert cost_ratio(*args).item() >= 1 - 1e-9


def test_oracle_ratio_is_exactly_one_and_monotone_transforms_do_not_matter():
    generator = torch.Generator().manual_seed(0)
    importance = torch.rand(8, 50, generator=generator)
    valid = torch.rand(8, 50, generator=generator) > 0.2
    assert torch.equal(cost_ratio(importance, importance, valid), torch.ones(8, dtype=torch.float64))
    scores = torch.randn(8, 50, generator=generator)
    assert torch.equal(cost_ratio(scores, importance, valid), cost_ratio(torch.exp(3 * scores) - 7, importance, valid))
    # scores of invalid entries never matter
    assert torch.equal(cost_ratio(scores.masked_fill(~valid, float("nan")), importance, valid),
                       cost_ratio(scores, importance, valid))


def test_kept_fraction_curve_by_hand():
    importance = torch.tensor([[0.1, 0.4, 0.0, 0.5]])
    valid = torch.tensor([[True, True, False, True]])
    scores = torch.tensor([[3.0, 1.0, 9.0, 2.0]])  # ranking: 0, 3, 1 (entry 2 is invalid)
    curve = kept_fraction_curve(scores, importance, valid)
    assert torch.allclose(curve, torch.tensor([[0.1, 0.6, 1.0, 1.0]]))
    assert torch.allclose(kept_fraction_at(curve, valid, (0.1, 0.5, 1.0)), torch.tensor([[0.1, 0.6, 1.0]]))


def test_degenerate_optimal_cost_is_guarded():
    importance = torch.tensor([[0.0, 1.0, 0.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert cost_ratio(importance, importance, valid).item() == 1.0
    ratio = cost_ratio(torch.tensor([[1.0, 0.0, 0.5]]), importance, valid).item()
    assert np.isfinite(ratio) and ratio > 1


# ----------------------------------------------------------------------------- observations and rewards


def test_observation_matches_the_trace(tiny_traces, tiny_dir):
    env = make(tiny_dir, obs_queries=4, obs_attention=True, obs_future=True, sink=2, recent=3)
    obs, info = env.reset(seed=3)
    trace, layer, head, n = tiny_traces[info["trace"]], info["layer"], info["kv_head"], info["n"]
    assert obs in env.observation_space
    assert (obs["layer"], obs["kv_head"]) == (layer, head)
    assert np.array_equal(obs["keys"][:n], trace.k(layer)[head, :n].numpy())
    assert np.array_equal(obs["values"][:n], trace.v(layer)[head, :n].numpy())
    assert not obs["keys"][n:].any() and not obs["values"][n:].any()  # padding never shows the future
    assert np.array_equal(obs["positions"][:n], np.arange(n))
    assert np.array_equal(obs["mask"], (np.arange(N) < n).astype(np.int8))
    protected = (np.arange(N) < 2) | ((np.arange(N) >= n - 3) & (np.arange(N) < n))
    assert np.array_equal(obs["protected"], protected.astype(np.int8))
    group = tiny_traces.spec.group_size
    queries = trace.q(layer)[head * group : (head + 1) * group, n - 4 : n]
    assert np.array_equal(obs["queries"], queries.numpy())
    assert np.array_equal(obs["query_positions"], np.arange(n - 4, n))
    assert np.allclose(obs["attention"][:, :n], attention_received(trace, layer, n)[head].numpy(), atol=1e-5)
    expected = future_importance(trace, layer, head, n, agg="max")
    assert np.allclose(obs["future_importance"][:n], expected.numpy(), atol=1e-5)


def test_oracle_scores_minus_one_and_random_scores_worse(tiny_dir):
    env = make(tiny_dir, obs_future=True, curve=True)
    obs, _ = env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(obs["future_importance"])
    assert reward == -1.0 and terminated and not truncated
    assert info["cost_ratio"] == 1.0 and info["curve"].shape == (N,)
    assert info["kept_fraction_10"] <= info["kept_fraction_25"] <= info["kept_fraction_50"] <= 1
    obs, _ = env.reset(seed=0)
    _, reward, *_ = env.step(-obs["future_importance"])
    assert reward < -1.0


def test_neg_cost_reward_and_horizon(tiny_dir):
    env = make(tiny_dir, reward="neg_cost", horizon=8, agg="mean")
    env.reset(seed=1)
    _, reward, _, _, info = env.step(np.zeros(N, dtype=np.float32))
    assert reward == pytest.approx(-info["cost"])


def test_seeding_reproduces_episodes(tiny_dir):
    env = make(tiny_dir)
    first = [env.reset(seed=7)[1] for _ in range(2)]
    assert first[0] == first[1]
    sequence = [env.reset()[1] for _ in range(5)]
    env.reset(seed=7)
    assert sequence == [env.reset()[1] for _ in range(5)]
    assert len({tuple(env.reset(seed=s)[1].values()) for s in range(10)}) > 1


def test_reset_options_pin_the_episode(tiny_dir):
    env = make(tiny_dir)
    _, info = env.reset(seed=0, options={"trace": 1, "layer": 0, "kv_head": 1, "n": 40})
    assert info == {"trace": 1, "layer": 0, "kv_head": 1, "n": 40}
    with pytest.raises(ValueError, match="reset options: n"):
        env.reset(options={"n": 5})
    with pytest.raises(ValueError, match="unknown key"):
        env.reset(options={"budget": 5})


def test_fixed_layer_and_head(tiny_dir):
    env = make(tiny_dir, layer=1, kv_head=0)
    for seed in range(5):
        _, info = env.reset(seed=seed)
        assert (info["layer"], info["kv_head"]) == (1, 0)


def test_gymnasium_and_sb3_checkers_pass(tiny_dir):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("KVEvict-v0", traces=tiny_dir, max_tokens=N, obs_queries=4, obs_attention=True, obs_future=True)
    # scores are not normalized actions: the action space is every finite float32, so both checkers
    # recommend a [-1, 1] space; the [N, d] observations are not flat vectors (unavoidable)
    expected = ("symmetric and normalized", "unconventional shape")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert all("symmetric and normalized" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(make(tiny_dir))
    assert all(any(text in str(w.message) for text in expected) for w in caught)


def test_action_space_holds_every_finite_score(tiny_dir):
    env = make(tiny_dir)
    env.reset(seed=0)
    largest = np.finfo(np.float32).max
    for action in (np.full(N, largest, np.float32), np.full(N, -largest, np.float32), np.full(N, -1e9, np.float32)):
        assert env.action_space.contains(action)
        env.reset(seed=0)
        env.step(action)


def test_step_before_reset_is_refused(tiny_dir):
    env = make(tiny_dir)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(N, dtype=np.float32))


def test_layer_cache_is_shared_and_survives_eviction(tiny_dir):
    small = make(tiny_dir, cache_gb=1e-9)  # one slot: every new (trace, layer) evicts the last
    assert make(tiny_dir, cache_gb=1e-9).core.cache is small.core.cache
    reference = make(tiny_dir, obs_future=True)
    tiny = make(tiny_dir, obs_future=True, cache_gb=1e-9)
    for seed in range(6):
        expected, _ = reference.reset(seed=seed)
        obs, _ = tiny.reset(seed=seed)
        assert all(np.array_equal(obs[key], expected[key]) for key in expected)


# ----------------------------------------------------------------------------- vector env


def test_make_vec_is_native_and_batched(tiny_dir):
    envs = gym.make_vec("KVEvict-v0", num_envs=8, vectorization_mode="vector_entry_point", traces=tiny_dir,
                        max_tokens=N, obs_future=True)
    assert isinstance(envs.unwrapped, KVEvictVectorEnv)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert envs.single_action_space.shape == (N,) and envs.action_space.shape == (8, N)
    obs, info = envs.reset(seed=0)
    assert obs in envs.observation_space and obs["keys"].shape == (8, N, 16)
    assert set(info) >= {"trace", "_trace", "layer", "kv_head", "n"}
    next_obs, reward, terminated, truncated, info = envs.step(obs["future_importance"])
    assert reward.shape == (8,) and np.all(reward == -1.0)
    assert terminated.all() and not truncated.any()
    assert np.all(info["final_info"]["cost_ratio"] == 1.0) and info["_final_info"].all()
    assert np.array_equal(info["final_obs"]["keys"], obs["keys"])
    assert next_obs in envs.observation_space


def test_vector_env_agrees_with_the_single_env(tiny_dir):
    single = make(tiny_dir, obs_queries=4, obs_attention=True)
    envs = KVEvictVectorEnv(4, tiny_dir, max_tokens=N, obs_queries=4, obs_attention=True)
    options = {"trace": [0, 1, 2, 0], "layer": [0, 1, 1, 0], "kv_head": [1, 0, 1, 0], "n": [36, 50, 64, 41]}
    batch, _ = envs.reset(seed=0, options=options)
    scores = np.random.default_rng(0).normal(size=(4, N)).astype(np.float32)
    _, rewards, _, _, _ = envs.step(scores)
    for row in range(4):
        obs, _ = single.reset(options={key: value[row] for key, value in options.items()})
        assert all(np.array_equal(obs[key], batch[key][row]) for key in obs)
        assert single.step(scores[row])[1] == rewards[row]


def test_group_size_shares_the_state(tiny_dir):
    envs = KVEvictVectorEnv(6, tiny_dir, group_size=3, max_tokens=N)
    obs, info = envs.reset(seed=0)
    for key in ("keys", "positions", "layer", "kv_head"):
        assert np.array_equal(obs[key][0], obs[key][2]) and np.array_equal(obs[key][3], obs[key][5])
    assert np.array_equal(info["n"][:3], np.full(3, info["n"][0]))
    with pytest.raises(ValueError, match="group_size"):
        KVEvictVectorEnv(6, tiny_dir, group_size=4, max_tokens=N)


def test_as_torch(tiny_dir):
    envs = KVEvictVectorEnv(4, tiny_dir, max_tokens=N, as_torch=True, obs_future=True)
    obs, info = envs.reset(seed=0)
    assert isinstance(obs["keys"], torch.Tensor) and isinstance(info["trace"], torch.Tensor)
    _, reward, terminated, _, info = envs.step(obs["future_importance"])
    assert isinstance(reward, torch.Tensor) and torch.all(reward == -1) and terminated.all()


def test_sync_vector_env_over_the_single_env(tiny_dir):
    envs = gym.make_vec("KVEvict-v0", num_envs=3, vectorization_mode="sync", traces=tiny_dir, max_tokens=N,
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    envs.reset(seed=0)
    _, reward, terminated, _, info = envs.step(envs.action_space.sample())
    assert terminated.all() and np.all(reward <= -1) and "final_info" in info


def test_sb3_adapter_trains_ppo(tiny_dir):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = SB3VecEnv(KVEvictVectorEnv(4, tiny_dir, max_tokens=N))
    obs = venv.reset()
    assert obs["key_vectors"].shape == (4, N, 16) and venv.reset_infos[0].keys() >= {"trace", "n"}
    obs, reward, dones, infos = venv.step(np.zeros((4, N), dtype=np.float32))
    assert reward.dtype == np.float32 and dones.all()
    assert infos[0]["terminal_observation"]["value_vectors"].shape == (N, 16) and "cost_ratio" in infos[0]
    PPO("MultiInputPolicy", venv, n_steps=4, batch_size=8, n_epochs=1, seed=0).learn(8)
    single = DummyVecEnv([lambda: SB3ObservationNames(make(tiny_dir))])
    PPO("MultiInputPolicy", single, n_steps=4, batch_size=4, n_epochs=1, seed=0).learn(4)
    with pytest.raises(ValueError, match="as_torch"):
        SB3VecEnv(KVEvictVectorEnv(2, tiny_dir, max_tokens=N, as_torch=True))


# ----------------------------------------------------------------------------- policies


class NegPosition:
    """A trivial inline scorer: keep the oldest entries."""

    needs = frozenset()

    def score(self, view):
        return -view.positions[:, None, :].float().expand(view.shape)


def test_scorer_policy_and_view(tiny_dir):
    envs = KVEvictVectorEnv(4, tiny_dir, max_tokens=N, obs_queries=4, obs_attention=True, obs_future=True)
    obs, _ = envs.reset(seed=0)
    view = obs_to_view(obs, envs.model_spec)
    assert view.keys.shape == (4, 1, N, 16) and view.kv_heads.shape == (4, 1) and view.layer.shape == (4,)
    assert view.queries.shape == (4, 1, 2, 4, 16) and view.attention.shape == (4, 1, 2, N)
    assert view.future_importance.shape == (4, 1, N) and view.mask.dtype == torch.bool
    scores = ScorerPolicy(NegPosition(), envs.model_spec).act(obs)
    assert scores.shape == (4, N) and scores.dtype == np.float32
    _, reward, *_ = envs.step(scores)
    assert np.all(reward <= -1)
    single = make(tiny_dir, obs_future=True)
    obs, _ = single.reset(seed=0)
    assert ScorerPolicy(NegPosition(), single.model_spec).act(obs).shape == (N,)


def test_registered_scorers_play_the_env(tiny_dir):
    from kvp_gym.scorers import available

    if "oracle" not in available():
        pytest.skip("baselines not installed")
    envs = KVEvictVectorEnv(4, tiny_dir, max_tokens=N, obs_future=True)
    obs, _ = envs.reset(seed=0)
    _, reward, *_ = envs.step(ScorerPolicy("oracle", envs.model_spec).act(obs))
    assert np.all(reward == -1.0)


# ----------------------------------------------------------------------------- errors


@FAST
@given(shape=st.lists(st.integers(0, 70), min_size=0, max_size=3))
def test_wrong_action_shape(tiny_dir, shape):
    env = make(tiny_dir)
    env.reset(seed=0)
    if tuple(shape) != (N,):
        with pytest.raises(ValueError, match="action must have shape"):
            env.step(np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex64])
def test_wrong_action_dtype(tiny_dir, dtype):
    env = make(tiny_dir)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must hold float scores"):
        env.step(np.zeros(N, dtype=dtype))


@FAST
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), where=st.integers(0, N - 1),
       values=arrays(np.float32, N, elements=st.floats(-1e6, 1e6, width=32)))
def test_non_finite_actions(tiny_dir, bad, where, values):
    env = make(tiny_dir)
    obs, _ = env.reset(seed=0)
    values = values.copy()
    values[where] = bad
    ranked = obs["mask"][where] and not obs["protected"][where]
    if ranked:
        with pytest.raises(ValueError, match="NaN or inf"):
            env.step(values)
    else:  # padded and protected entries are ignored, whatever they hold
        assert env.step(values)[1] <= -1


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layer": 2}, "layer"),
        ({"layer": -1}, "layer"),
        ({"kv_head": 2}, "kv_head"),
        ({"model": "smollm2-135m"}, "model"),
        ({"prefix": (30, 200)}, "max_prefix"),
        ({"prefix": (30, 96)}, "max_prefix"),
        ({"max_tokens": 128, "prefix": (30, 100)}, "prefix range"),
        ({"prefix": (10, 40)}, "min_prefix"),
        ({"prefix": (50, 40)}, "prefix range"),
        ({"prefix": (30, 40), "min_prefix": 30}, "prefix"),
        ({"obs_queries": 100}, "obs_queries"),
        ({"agg": "sum"}, "agg"),
        ({"reward": "ppl"}, "reward"),
        ({"horizon": 0}, "horizon"),
        ({"traces": []}, "traces"),
    ],
)
def test_bad_arguments_are_named(tiny_dir, kwargs, argument):
    kwargs = {"traces": tiny_dir, "max_tokens": N} | kwargs
    with pytest.raises(ValueError, match=argument):
        KVEvictEnv(**kwargs)


class OtherModelTraces(list):
    """A stand-in trace set from a model with another geometry (3 layers)."""

    spec = ModelSpec("other", 3, 4, 2, 16, 1e4)


def test_trace_sets_from_other_models_are_refused(tiny_traces):
    with pytest.raises(ValueError, match="traces: the trace sets come from different models"):
        KVEvictEnv([tiny_traces, OtherModelTraces([None])], max_tokens=N)
    with pytest.raises(ValueError, match="model"):
        KVEvictEnv(tiny_traces, max_tokens=N, model=dataclasses.replace(tiny_traces.spec, num_layers=3))


# ----------------------------------------------------------------------------- default traces, real traces


def test_default_traces_are_reused(tiny_traces, tmp_path, monkeypatch):
    from kvp_gym.envs import default_traces as defaults

    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path))
    monkeypatch.setattr(defaults, "TRACES_PER_SOURCE", len(tiny_traces))
    for source in defaults.DEFAULT_SOURCES:
        shutil.copytree(tiny_traces.directory, defaults.default_trace_dir(source))
    env = gym.make("KVEvict-v0", max_tokens=N)
    assert len(env.unwrapped.traces) == len(tiny_traces) * len(defaults.DEFAULT_SOURCES)
    env.reset(seed=0)


@pytest.mark.slow
def test_real_traces_random_and_oracle(real_traces):
    envs = gym.make_vec("KVEvict-v0", num_envs=64, traces=real_traces.directory, obs_future=True,
                        model="smollm2-135m")
    obs, _ = envs.reset(seed=0)
    _, reward, *_ = envs.step(obs["future_importance"])
    assert np.all(reward == -1.0)
    _, reward, *_ = envs.step(envs.action_space.sample())
    assert np.all(reward < -1.0)
    assert len(set(envs.unwrapped.core.identity()["layer"].tolist())) > 5
