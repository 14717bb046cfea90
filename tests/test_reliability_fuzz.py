"""Property-based fuzzing of every public entry point that takes user input: both envs (single and
native vector), and EvictingCache on a tiny random model. Every input either works or raises the
documented error: ValueError (or a subclass: TraceError, CheckpointError) with a message; TypeError
only for an object that is not a Scorer. Never an IndexError, AttributeError, RuntimeError, ..."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from kvp_gym.cache import EvictingCache
from kvp_gym.envs.kv_evict import KVEvictEnv
from kvp_gym.envs.kv_evict_vector import KVEvictVectorEnv
from kvp_gym.envs.stream import KVEvictStreamEnv, KVEvictStreamVectorEnv
from kvp_gym.scorers import get

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# odd values of every kind: ints near the edges, bools, floats with NaN/inf, strings, containers, None
odd = st.one_of(
    st.integers(-3, 200), st.sampled_from([0, 1, 2, 8, 16, 32, 48, 64, 95, 96, 97, 200000]), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(["max", "mean", "cost_ratio", "x", ""]),
    st.none(), st.lists(st.integers(0, 100), max_size=3), st.tuples(st.integers(0, 100), st.integers(0, 100)),
)
KV_OPTIONS = ["layer", "kv_head", "prefix", "min_prefix", "max_prefix", "max_tokens", "sink", "recent", "agg", "horizon",
              "reward", "obs_queries", "obs_attention", "obs_future", "curve", "cache_gb"]
STREAM_OPTIONS = ["layer", "kv_head", "budget", "step", "sink", "agg", "horizon", "obs_queries", "obs_attention",
                  "obs_future", "cache_gb"]


def kwargs_strategy(names):
    return st.dictionaries(st.sampled_from(names), odd, max_size=4)


def error_is_documented(error: Exception) -> None:
    assert type(error) is not AssertionError
    assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
    assert str(error), "an error without a message"


def actions(size: int, rows: int | None):
    shape = st.sampled_from([(size,) if rows is None else (rows, size), (size + 1,), (1,), (rows or 1, size, 1), ()])
    dtype = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_])
    fill = st.sampled_from(["normal", "nan", "inf", "huge"])
    kind = st.sampled_from(["numpy", "torch", "list"])
    return st.tuples(shape, dtype, fill, kind)


def make_action(spec, seed: int):
    shape, dtype, fill, kind = spec
    rng = np.random.default_rng(seed)
    array = rng.normal(size=shape)
    if fill == "nan" and array.size:
        array.flat[0] = np.nan
    if fill == "inf" and array.size:
        array.flat[-1] = np.inf
    if fill == "huge":
        array = array * 1e39
    array = array.astype(dtype)
    if kind == "torch":
        return torch.from_numpy(np.ascontiguousarray(array))
    return array.tolist() if kind == "list" else array


reset_options = st.one_of(
    st.none(), st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["trace", "layer", "kv_head", "n", "step", "bogus"]), odd, max_size=2),
)


def drive(env, rows: int | None, options, action_spec, seed: int) -> None:
    try:
        env.reset(seed=seed, options=options)
    except Exception as error:  # noqa: BLE001 (checked below)
        error_is_documented(error)
        env.reset(seed=seed)
    size = env.single_action_space.shape[0] if rows is not None else env.action_space.shape[0]
    for attempt in (make_action(action_spec, seed), env.action_space.sample()):
        env.reset(seed=seed)  # a KVEvict episode is one step (stepping a finished one is a RuntimeError, by design)
        try:
            env.step(attempt)
        except Exception as error:  # noqa: BLE001
            error_is_documented(error)
    assert size >= 1


@FUZZ
@given(kwargs=kwargs_strategy(KV_OPTIONS), vector=st.sampled_from([None, 1, 3]), options=reset_options,
       action=actions(96, None), seed=st.integers(0, 2**16))
def test_kv_evict_takes_any_input_or_names_it(tiny_traces, kwargs, vector, options, action, seed):
    kwargs.setdefault("max_tokens", 96)
    kwargs["cache_gb"] = 0.05 if kwargs.get("cache_gb", 0.05) == 0.05 else kwargs["cache_gb"]
    try:
        env = KVEvictEnv(tiny_traces, **kwargs) if vector is None else KVEvictVectorEnv(vector, tiny_traces, **kwargs)
    except Exception as error:  # noqa: BLE001
        error_is_documented(error)
        return
    size = env.core.size
    shape, *rest = action
    if shape == (96,):
        shape = (size,) if vector is None else (vector, size)
    drive(env, vector, options, (shape, *rest), seed)


@FUZZ
@given(kwargs=kwargs_strategy(STREAM_OPTIONS), vector=st.sampled_from([None, 2]), options=reset_options,
       action=actions(40, None), seed=st.integers(0, 2**16))
def test_stream_takes_any_input_or_names_it(tiny_traces, kwargs, vector, options, action, seed):
    kwargs.setdefault("budget", 32)
    kwargs.setdefault("step", 8)
    kwargs["cache_gb"] = 0.05 if kwargs.get("cache_gb", 0.05) == 0.05 else kwargs["cache_gb"]
    try:
        env = (KVEvictStreamEnv(tiny_traces, **kwargs) if vector is None
               else KVEvictStreamVectorEnv(vector, tiny_traces, **kwargs))
    except Exception as error:  # noqa: BLE001
        error_is_documented(error)
        return
    shape, *rest = action
    if shape == (40,):
        shape = (env.core.size,) if vector is None else (vector, env.core.size)
    drive(env, vector, options, (shape, *rest), seed)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@FUZZ
@given(name=st.sampled_from(["knorm", "snapkv", "tova", "h2o", "streamingllm", "random", "oracle"]),
       budget=odd, sink=st.one_of(st.integers(0, 6), odd), recent=st.one_of(st.integers(0, 6), odd),
       every=st.one_of(st.none(), st.integers(1, 4), odd), window=st.one_of(st.none(), st.integers(1, 8), odd),
       batch=st.integers(1, 3), length=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
@torch.no_grad()
def test_evicting_cache_takes_any_input_or_names_it(model, name, budget, sink, recent, every, window, batch, length,
                                                    dtype, seed):
    try:
        cache = EvictingCache(get(name), budget, config=model.config, sink=sink, recent=recent, every=every,
                              query_window=window)
    except Exception as error:  # noqa: BLE001
        error_is_documented(error)
        return
    ids = torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    out = model.to(dtype).generate(ids, cache=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    model.to(torch.float32)
    assert out.shape == (batch, length + 3)
    stored = cache.report().stored
    assert stored <= max(budget, length + 3) + 3 and not math.isnan(stored)


def test_a_non_scorer_is_a_type_error(model):
    with pytest.raises(TypeError, match="is not a Scorer"):
        EvictingCache(object(), 8, config=model.config)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_prefix": 30.5}, "min_prefix must be an int >= 1 or None, got 30.5"),
    ({"obs_queries": True}, "obs_queries must be an int >= 0, got True"),
    ({"layer": True}, "layer must be None (sampled) or an int in [0, 1], got True"),
    ({"max_tokens": 200000}, "max_tokens must be an int in [2, 16384], got 200000"),
    ({"obs_attention": 1}, "obs_attention must be True or False, got 1"),
    ({"prefix": 40}, "prefix must be a pair (lo, hi) of ints, got 40"),
    ({"cache_gb": float("nan")}, "cache_gb must be a finite number > 0.0, got nan"),
])
def test_the_issue_cases_name_the_argument_and_its_range(tiny_traces, kwargs, message):
    with pytest.raises(ValueError) as error:
        KVEvictEnv(tiny_traces, **{"max_tokens": 96, **kwargs})
    assert str(error.value) == message


def test_reset_options_that_are_not_a_dict_are_named(tiny_traces):
    env = KVEvictEnv(tiny_traces, max_tokens=96)
    with pytest.raises(ValueError) as error:
        env.reset(options=[1, 2])
    assert str(error.value) == "reset options must be a dict with keys from ('trace', 'layer', 'kv_head', 'n') or None, got [1, 2]"


def test_the_default_shortest_prefix_leaves_room_for_obs_queries(tiny_traces):
    """The README's call: obs_queries=64 without min_prefix works (the default shortest prefix follows it)."""
    envs = KVEvictVectorEnv(4, tiny_traces, obs_queries=64, obs_attention=True)
    assert envs.core.lo == 64
    obs, _ = envs.reset(seed=0)
    assert obs["queries"].shape[2] == 64 and (obs["mask"].sum(1) >= 64).all()
