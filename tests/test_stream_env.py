"""KVEvictStream-v0: evictions and rewards by hand, golden replay, per-env autoreset, groups, API checks."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import kvp_gym  # noqa: F401  (registers the envs)
from kvp_gym.envs.adapters import GoldenPolicy
from kvp_gym.envs.sb3 import SB3VecEnv
from kvp_gym.envs.stream import KVEvictStreamEnv, KVEvictStreamVectorEnv
from kvp_gym.models import ModelSpec
from hand_traces import HandTrace
from kvp_gym.utility import (
    attention_received,
    golden_eviction_schedule,
    importance_from_table,
    importance_table,
    num_stream_steps,
)

BUDGET, STEP = 32, 16  # tiny traces have 96 tokens: 3 steps


class HandTraceSet(list):
    """A trace set in memory: a list of HandTrace with the spec of the first."""

    @property
    def spec(self) -> ModelSpec:
        return self[0].spec


def uniform_traces(*lengths: int) -> HandTraceSet:
    """q = 0: every query attends uniformly to its causal prefix, A[j, i] = 1 / (j + 1)."""
    generator = torch.Generator().manual_seed(0)
    return HandTraceSet(HandTrace(torch.zeros(2, t, 4), torch.randn(1, t, 4, generator=generator)) for t in lengths)


def tail_mass(start: int, length: int) -> float:
    """Future attention of any cached token under uniform attention: sum_{j >= start} 1 / (j + 1)."""
    return sum(1.0 / (j + 1) for j in range(start, length))


@pytest.mark.parametrize(("keep", "expected_evictions"), [
    ("oldest", [list(range(8, 12))] + [list(range(12 + 4 * (t - 1), 16 + 4 * (t - 1))) for t in range(1, 6)]),
    ("newest", [list(range(2 + 4 * t, 6 + 4 * t)) for t in range(6)]),
])
def test_evictions_and_rewards_by_hand(keep, expected_evictions):
    """B = 12, L = 4, sink = 2, T = 40: 6 steps; step t's chunk ends at e = 12 + 4 (t + 1)."""
    env = KVEvictStreamEnv(uniform_traces(40), budget=12, step=4, sink=2)
    obs, info = env.reset(seed=0)
    assert np.array_equal(obs["positions"], np.arange(16)) and info["step"] == 0
    assert np.array_equal(obs["protected"], np.isin(np.arange(16), [0, 1, 12, 13, 14, 15]).astype(np.int8))
    total = 0.0
    for t, evictions in enumerate(expected_evictions):
        sign = -1.0 if keep == "oldest" else 1.0
        obs, reward, terminated, _, info = env.step((sign * obs["positions"]).astype(np.float32))
        expected = -4 * tail_mass(12 + 4 * (t + 1), 40)
        total += expected
        assert info["evicted"].tolist() == evictions and info["step"] == t
        assert reward == pytest.approx(expected, rel=1e-5)
        assert info["episode_return"] == pytest.approx(total, rel=1e-5)
        assert terminated == (t == 5)
        cached = obs["positions"][:12]
        assert not np.isin(cached, evictions).any() and np.all(np.diff(cached) > 0)
    assert info["golden_return"] == pytest.approx(total, rel=1e-5)  # every eviction costs the same here


def test_rewards_and_observations_match_the_utility(tiny_traces):
    env = KVEvictStreamEnv(tiny_traces.directory, budget=BUDGET, step=STEP, obs_queries=4, obs_attention=True,
                           obs_future=True)
    obs, info = env.reset(seed=2)
    trace, layer, head = tiny_traces[info["trace"]], info["layer"], info["kv_head"]
    table = importance_table(trace, layer, "mean")
    group = tiny_traces.spec.group_size
    rng = np.random.default_rng(0)
    for t in range(num_stream_steps(trace.length, BUDGET, STEP)):
        end = BUDGET + (t + 1) * STEP
        positions = torch.from_numpy(obs["positions"])
        assert positions[-STEP:].tolist() == list(range(end - STEP, end))
        assert np.array_equal(obs["keys"], trace.k(layer)[head, positions].numpy())
        importance = importance_from_table(table, end)[head]
        assert np.allclose(obs["future_importance"], importance[positions].numpy(), atol=1e-5)
        received = attention_received(trace, layer, end)[head][:, positions]
        assert np.allclose(obs["attention"], received.numpy(), atol=1e-5)
        assert np.array_equal(obs["queries"], trace.q(layer)[head * group : (head + 1) * group, end - 4 : end].numpy())
        obs, reward, terminated, _, info = env.step(rng.normal(size=BUDGET + STEP).astype(np.float32))
        assert reward == pytest.approx(-importance[torch.from_numpy(info["evicted"])].sum().item(), abs=1e-5)
    assert terminated


def test_golden_policy_replays_the_schedule(tiny_traces):
    env = KVEvictStreamEnv(tiny_traces.directory, budget=BUDGET, step=STEP, sink=0)
    policy = GoldenPolicy.from_env(env)
    obs, info = env.reset(seed=0)
    schedule = golden_eviction_schedule(tiny_traces[info["trace"]], info["layer"], BUDGET, STEP)
    terminated = False
    while not terminated:
        obs, reward, terminated, _, info = env.step(policy.act(obs, info))
        assert info["evicted"].tolist() == schedule.evicted[info["step"], info["kv_head"]].tolist()
        assert reward == pytest.approx(-info["golden_evicted_mass"], abs=1e-6)
    assert info["episode_return"] == pytest.approx(info["golden_return"], abs=1e-6)


def test_vector_env_autoresets_each_env_when_its_trace_ends():
    envs = KVEvictStreamVectorEnv(2, uniform_traces(40, 48), budget=12, step=4, sink=2)
    obs, info = envs.reset(seed=0, options={"trace": [0, 1]})
    assert info["trace"].tolist() == [0, 1]
    for _ in range(num_stream_steps(40, 12, 4)):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert terminated.tolist() == [True, False] and not truncated.any()
    assert info["_final_info"].tolist() == [True, False] and info["final_info"]["step"][0] == 5
    assert info["_episode_return"].tolist() == [False, True]
    assert info["step"][0] == 0 and info["step"][1] == 6  # env 0 restarted; env 1 continues
    assert np.array_equal(obs["positions"][0], np.arange(16))
    assert info["final_obs"]["positions"][0].max() == 12 + 4 * 7 - 1  # the terminal state, one chunk on
    for _ in range(2):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert terminated.tolist() == [False, True]


def test_groups_start_together_and_diverge(tiny_traces):
    envs = KVEvictStreamVectorEnv(4, tiny_traces.directory, group_size=2, budget=BUDGET, step=STEP)
    obs, info = envs.reset(seed=0)
    assert np.array_equal(obs["keys"][0], obs["keys"][1]) and np.array_equal(obs["keys"][2], obs["keys"][3])
    steps = num_stream_steps(96, BUDGET, STEP)
    scores = np.stack([obs["positions"][0], -obs["positions"][1], obs["positions"][2], -obs["positions"][3]])
    obs, *_ = envs.step(scores.astype(np.float32))
    assert not np.array_equal(obs["positions"][0], obs["positions"][1])  # past evictions change the state
    for _ in range(steps - 1):
        obs, _, terminated, _, info = envs.step(envs.action_space.sample())
    assert terminated.all() and np.array_equal(info["trace"][0::2], info["trace"][1::2])


def test_api_checkers_and_sb3(tiny_traces):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("KVEvictStream-v0", traces=str(tiny_traces.directory), budget=BUDGET, step=STEP, obs_future=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert all("symmetric and normalized" in str(w.message) for w in caught)  # scores are not normalized actions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sb3_check_env(KVEvictStreamEnv(tiny_traces.directory, budget=BUDGET, step=STEP))
    venv = SB3VecEnv(gym.make_vec("KVEvictStream-v0", num_envs=2, traces=str(tiny_traces.directory),
                                  budget=BUDGET, step=STEP))
    venv.reset()
    for _ in range(3):
        _, reward, dones, infos = venv.step(np.zeros((2, BUDGET + STEP), dtype=np.float32))
    assert dones.all() and "terminal_observation" in infos[0] and "golden_return" in infos[0]


def test_errors(tiny_traces):
    with pytest.raises(ValueError, match="budget"):
        KVEvictStreamEnv(tiny_traces.directory, budget=8, step=8, sink=4)
    with pytest.raises(ValueError, match="budget"):
        KVEvictStreamEnv(tiny_traces.directory, budget=64, step=32)
    with pytest.raises(ValueError, match="kv_head"):
        KVEvictStreamEnv(tiny_traces.directory, budget=BUDGET, step=STEP, kv_head=5)
    env = KVEvictStreamEnv(tiny_traces.directory, budget=BUDGET, step=STEP)
    obs, _ = env.reset(seed=0)
    scores = np.zeros(BUDGET + STEP, dtype=np.float32)
    scores[-1] = np.nan  # an appended (protected) entry: ignored
    env.step(scores)
    scores[10] = np.inf  # an evictable entry
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(scores)


@pytest.mark.slow
def test_real_trace_whole_episode_with_the_golden_policy(real_traces):
    env = gym.make("KVEvictStream-v0", traces=real_traces.directory, budget=128, step=32, model="smollm2-135m")
    policy = GoldenPolicy.from_env(env)
    obs, info = env.reset(seed=0)
    steps, terminated = 0, False
    while not terminated:
        obs, reward, terminated, _, info = env.step(policy.act(obs, info))
        steps += 1
    assert steps == num_stream_steps(256, 128, 32)
    assert info["episode_return"] == pytest.approx(info["golden_return"], rel=1e-5)
