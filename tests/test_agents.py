"""Agents: the Plackett-Luce / baseline math, and short seeded training runs that must improve the reward."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.common import (
    group_normalized_advantages,
    gumbel_sort,
    leave_one_out_advantages,
    plackett_luce_log_prob,
    plackett_luce_terms,
    warmup_cosine,
)


def brute_force_pl(scores: list[float], perm: tuple[int, ...]) -> float:
    """Probability of ranking ``perm`` under Plackett-Luce, one placement at a time."""
    remaining = list(perm)
    prob = 1.0
    for index in perm:
        prob *= math.exp(scores[index]) / sum(math.exp(scores[j]) for j in remaining)
        remaining.remove(index)
    return prob


@pytest.mark.parametrize("n", [3, 4])
def test_plackett_luce_log_prob_equals_enumeration(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    scores = torch.randn(1, n, generator=generator, dtype=torch.float64) * 2
    active = torch.ones(1, n, dtype=torch.bool)
    total = 0.0
    for perm in itertools.permutations(range(n)):
        order = torch.tensor([perm])
        log_prob = plackett_luce_log_prob(scores, order, active).item()
        expected = brute_force_pl(scores[0].tolist(), perm)
        assert log_prob == pytest.approx(math.log(expected), abs=1e-10)
        total += math.exp(log_prob)
    assert total == pytest.approx(1.0, abs=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=5), st.lists(st.booleans(), min_size=5, max_size=5))
def test_plackett_luce_is_a_distribution(scores: list[float], active_bits: list[bool]) -> None:
    """Over every ranking of the active entries, the probabilities sum to 1 (whatever the inactive ones hold)."""
    n = len(scores)
    active = torch.tensor([active_bits[:n]])
    chosen = [index for index in range(n) if active_bits[index]]
    rest = [index for index in range(n) if not active_bits[index]]
    values = torch.tensor([scores], dtype=torch.float64)
    total = sum(
        plackett_luce_log_prob(values, torch.tensor([list(perm) + rest]), active).exp().item()
        for perm in itertools.permutations(chosen)
    )
    assert total == pytest.approx(1.0, abs=1e-9)


def test_inactive_entries_take_no_part() -> None:
    """Padding / protected entries (any score) change neither the log-prob nor the sampled order of the rest."""
    scores = torch.tensor([[0.3, 5.0, -1.0, 0.7, -50.0]], dtype=torch.float64)
    active = torch.tensor([[True, False, True, True, False]])
    for perm in itertools.permutations([0, 2, 3]):
        order = torch.tensor([list(perm) + [1, 4]])
        expected = brute_force_pl([0.3, 0.0, -1.0, 0.7], perm)
        assert plackett_luce_log_prob(scores, order, active).item() == pytest.approx(math.log(expected), abs=1e-10)
    terms = plackett_luce_terms(scores, torch.tensor([[3, 0, 2, 1, 4]]), active)
    assert terms[0, 3:].abs().max() == 0 and terms[0, 2] == 0  # last active rank is certain, inactive ranks 0
    _, order = gumbel_sort(scores, active, torch.Generator().manual_seed(0))
    assert set(order[0, :3].tolist()) == {0, 2, 3}


def test_gumbel_sort_samples_plackett_luce() -> None:
    scores = torch.tensor([[1.0, 0.0, -0.5]]).expand(40000, 3)
    active = torch.ones_like(scores, dtype=torch.bool)
    _, order = gumbel_sort(scores, active, torch.Generator().manual_seed(0))
    for perm in itertools.permutations(range(3)):
        frequency = (order == torch.tensor(perm)).all(dim=1).float().mean().item()
        assert frequency == pytest.approx(brute_force_pl([1.0, 0.0, -0.5], perm), abs=0.01)


def test_leave_one_out_baseline() -> None:
    rewards = torch.tensor([[1.0, 2.0, 6.0], [-3.0, -3.0, -3.0]])
    advantages = leave_one_out_advantages(rewards)
    expected = torch.tensor([[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(advantages, expected)
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.ones(2, 1))


def test_group_normalized_advantages() -> None:
    advantages = group_normalized_advantages(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert torch.allclose(advantages, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), atol=1e-6)


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-5)
    assert warmup_cosine(10, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(100, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-6)


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peaked_traces(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """tiny_traces' model and tokens with its query and key projections scaled by 6.

    The random tiny model attends almost uniformly, so every ranking of its cache costs within 0.4 %
    of the optimum and there is nothing to learn; with peaked attention a few tokens draw most of
    it (random ranking: cost ratio ~1.2), as in real models.
    """
    from conftest import write_random_traces
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    directory = tmp_path_factory.mktemp("peaked-model")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return write_random_traces(tmp_path_factory.mktemp("peaked-traces"), directory, n=3, length=96, seed=0)


STREAM_OPTIONS = {"budget": 32, "step": 8}
RUNS = {  # agent: (steps, hyperparameters)
    "kvp": (20, {}),
    "grpo": (10, {}),
    "grpo-stream": (8, {}),
    "pairwise": (10, {}),
    "pairwise-stream": (10, {}),
    "ppo": (20, {"lr": "3e-3"}),
    "a2c": (30, {}),
    "trpo": (10, {}),
    "ars": (20, {}),
    "recurrent-ppo": (6, {"lr": "3e-3"}),
}


def run_config(agent: str, traces, out: Path, steps: int, options: dict[str, str], **extra):
    from agents.train import TrainConfig

    stream = agent in ("grpo-stream", "pairwise-stream", "recurrent-ppo")
    return TrainConfig(
        agent=agent, traces=str(traces.directory), out=str(out), steps=steps, layer=1, kv_head=0, seed=0,
        agent_options=options, env_options=STREAM_OPTIONS if stream else {"max_tokens": 96},
        progress=False, **extra,
    )


@pytest.mark.parametrize("agent", list(RUNS))
def test_training_improves_reward(agent: str, peaked_traces, tmp_path: Path, one_thread) -> None:
    """A short seeded run lowers the mean cost ratio of the deterministic policy on fixed episodes."""
    from agents.train import train

    steps, options = RUNS[agent]
    config = run_config(agent, peaked_traces, tmp_path / agent, steps, options,
                        eval_traces=str(peaked_traces.directory), eval_every=steps, save_every=steps)
    result = train(config)
    before, after = result.evaluations[0]["cost_ratio"], result.evaluations[steps]["cost_ratio"]
    assert after < before - 0.002, f"{agent}: cost ratio {before:.4f} -> {after:.4f}"
    assert load_scorer_of(result.scorer_path).heads == [(1, 0)]


def load_scorer_of(path: Path):
    from kvp_gym.checkpoint import load_scorer

    return load_scorer(path)


def test_resume_after_kill_is_exact(peaked_traces, tmp_path: Path, one_thread, monkeypatch) -> None:
    """Killing a run after a checkpoint and rerunning the same command gives the uninterrupted run's weights."""
    from agents import kvp
    from agents.train import train

    straight = train(run_config("kvp", peaked_traces, tmp_path / "straight", 12, {}, save_every=4))
    original = kvp.KVPAgent.update
    calls = {"n": 0}

    def killed(self):
        calls["n"] += 1
        if calls["n"] == 7:  # dies between the checkpoints of steps 4 and 8
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(kvp.KVPAgent, "update", killed)
    config = run_config("kvp", peaked_traces, tmp_path / "resumed", 12, {}, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(kvp.KVPAgent, "update", original)
    resumed = train(config)
    a, b = load_scorer_of(straight.scorer_path), load_scorer_of(resumed.scorer_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="other settings"):
        train(run_config("kvp", peaked_traces, tmp_path / "resumed", 12, {"lr": "1e-2"}, save_every=4))


def test_all_heads_training(peaked_traces, tmp_path: Path, one_thread) -> None:
    from agents.train import TrainConfig, train

    config = TrainConfig(agent="kvp", traces=str(peaked_traces.directory), out=str(tmp_path / "all"), steps=3,
                         all_heads=True, env_options={"max_tokens": 96}, progress=False)
    scorer = load_scorer_of(train(config).scorer_path)
    assert len(scorer.heads) == 4 and scorer.config()["heads"] is None


def test_cli_train(peaked_traces, tmp_path: Path, one_thread) -> None:
    import typer
    from typer.testing import CliRunner

    from agents.cli import app as train_app

    app = typer.Typer()  # mounted as kvp_gym.cli mounts the `kvp_gym.commands` entry points
    app.add_typer(train_app)
    runner = CliRunner()
    args = ["train", "--agent", "pairwise", "--traces", str(peaked_traces.directory), "--steps", "2",
            "--out", str(tmp_path / "cli"), "--layer", "0", "--kv-head", "1", "--env-opt", "max_tokens=96",
            "--set", "lr=0.005", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "scorer.safetensors").exists() and (tmp_path / "cli" / "tb").is_dir()
    bad = runner.invoke(app, [*args[:-1], "--set", "nonsense=1"])
    assert bad.exit_code == 2 and "has no such option" in bad.output


def test_stream_checkpoint_protects_sinks_only(peaked_traces, tmp_path: Path, one_thread) -> None:
    """A streaming run saves the env's protected tokens, not its step size as ``recent``."""
    from agents.train import train
    from kvp_gym.checkpoint import read_header
    from kvp_gym.ranking import DEFAULT_PROTECTED

    result = train(run_config("pairwise-stream", peaked_traces, tmp_path / "stream", 1, {}))
    assert read_header(result.scorer_path).protected == {"sink": DEFAULT_PROTECTED.sink, "recent": 0}
