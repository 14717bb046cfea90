"""Training runs resume safely: no pickle is ever loaded, the scorer and the state are written as a
pair (scorer first, then the state that names its hash), every agent's state round-trips through
safetensors + JSON, and a kill at any write point followed by a rerun gives the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from test_agents import STREAM_OPTIONS, one_thread, peaked_traces, run_config  # noqa: F401  (fixtures)

KILL_HELPER = Path(__file__).with_name("kill_at_write.py")


class _RunsCode:
    """Unpickling this object runs ``touch MARKER`` (what a crafted state file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 0, "payload": _RunsCode(marker)}, path)  # what torch.load(weights_only=False) runs


def test_no_pickle_is_loaded_anywhere_in_the_tree() -> None:
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if ".venv" in path.parts or path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8")
        if "torch.load(" in text or "import pickle" in text or "pickle.load" in text:
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


@pytest.mark.parametrize("name", ["state.pt", "state.safetensors"])
def test_a_planted_pickle_is_refused_and_never_runs(name, peaked_traces, tmp_path, one_thread):
    from agents.train import train

    config = run_config("kvp", peaked_traces, tmp_path / "run", 2, {})
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "run" / name, marker)
    with pytest.raises(ValueError, match=r"(is a pickle \(it could run code when loaded\), so it is never loaded"
                                         r"|corrupt training state .*delete it to restart the run)"):
        train(config)
    assert not marker.exists()


def test_the_cli_refuses_a_planted_pickle_in_one_line(peaked_traces, tmp_path, one_thread):
    from typer.testing import CliRunner

    from kvp_gym.cli import app

    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "run" / "state.pt", marker)
    result = CliRunner().invoke(app, ["train", "--agent", "kvp", "--traces", str(peaked_traces.directory), "--steps", "2",
                                      "--out", str(tmp_path / "run"), "--layer", "1", "--kv-head", "0",
                                      "--env-opt", "max_tokens=96", "--no-progress"])
    assert result.exit_code == 2 and "is a pickle" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_the_state_is_safetensors_and_names_its_scorer(peaked_traces, tmp_path, one_thread):
    from agents.train import train
    from kvp_gym.traces.dataset import sha256_of

    result = train(run_config("kvp", peaked_traces, tmp_path / "run", 2, {}, save_every=1))
    with safe_open(str(tmp_path / "run" / "state.safetensors"), framework="pt") as handle:
        tree = json.loads(handle.metadata()["kvp_gym"])
    assert tree["format"] == "kvp-gym-state" and not (tmp_path / "run" / "state.pt").exists()
    from kvp_gym.checkpoint import load_state

    state = load_state(tmp_path / "run" / "state.safetensors")
    assert state["step"] == 2 and state["scorer_sha256"] == sha256_of(result.scorer_path)


@pytest.mark.parametrize("agent", ["grpo", "pairwise-stream", "ppo", "a2c", "trpo", "ars", "recurrent-ppo"])
def test_every_agent_state_round_trips_without_pickle(agent, peaked_traces, tmp_path, one_thread):
    """One step writes the state; the rerun loads it into a fresh agent (then finds the run done)."""
    from agents.train import train

    config = run_config(agent, peaked_traces, tmp_path / agent, 1, {})
    first = train(config)
    again = train(config)  # loads state.safetensors into the agent before seeing the run is finished
    assert again.seconds == 0.0 and again.scorer_path == first.scorer_path


def _scorer_bytes_without_time(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["kvp_gym"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header.pop("created")
    return header, tensors


def _same_run(a: Path, b: Path) -> None:
    """Same scorer (header without its timestamp, weights) and the same state, bit for bit; no temp files."""
    from kvp_gym.checkpoint import load_state

    header_a, weights_a = _scorer_bytes_without_time(a / "scorer.safetensors")
    header_b, weights_b = _scorer_bytes_without_time(b / "scorer.safetensors")
    assert header_a == header_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a, state_b = load_state(a / "state.safetensors"), load_state(b / "state.safetensors")
    state_a.pop("scorer_sha256"), state_b.pop("scorer_sha256")  # the scorer's header holds its creation time
    assert _flat(state_a) == _flat(state_b)
    assert (a / "run.json").read_text() == (b / "run.json").read_text()
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
    assert not list(b.glob(".*.tmp"))


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, item in tree.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, item in enumerate(tree) for k, v in _flat(item, f"{prefix}/{i}").items()}
    if isinstance(tree, torch.Tensor):
        return {prefix: (tuple(tree.shape), tree.dtype, tree.flatten().tolist())}
    return {prefix: tree}


def test_a_kill_between_the_scorer_and_the_state_resumes_from_the_state(peaked_traces, tmp_path, one_thread, monkeypatch):
    """The scorer of step 4 is written, the state of step 4 is not: the rerun redoes steps 2..4."""
    from agents import train as train_module

    straight = tmp_path / "straight"
    train_module.train(run_config("kvp", peaked_traces, straight, 4, {}, save_every=2))
    real = train_module.save_state
    calls = {"n": 0}

    def dies_on_the_second(path, tree):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(path, tree)

    monkeypatch.setattr(train_module, "save_state", dies_on_the_second)
    config = run_config("kvp", peaked_traces, tmp_path / "killed", 4, {}, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config)
    monkeypatch.setattr(train_module, "save_state", real)
    assert train_module.load_state(tmp_path / "killed" / "state.safetensors")["step"] == 2
    result = train_module.train(config)
    assert result.seconds > 0  # it trained again from step 2, not "already done"
    _same_run(straight, tmp_path / "killed")


def test_a_scorer_that_is_not_the_states_is_rewritten_when_the_run_is_done(peaked_traces, tmp_path, one_thread):
    from agents.train import train
    from kvp_gym.checkpoint import load_scorer

    config = run_config("kvp", peaked_traces, tmp_path / "run", 2, {})
    result = train(config)
    expected = {k: v.clone() for k, v in load_scorer(result.scorer_path).state_dict().items()}
    result.scorer_path.unlink()
    again = train(config)
    assert all(torch.equal(expected[k], v) for k, v in load_scorer(again.scorer_path).state_dict().items())


# -- SIGKILL at every write point of `kvp-gym train`, then rerun: the uninterrupted run's outputs ----------
def train_args(traces: Path, out: Path) -> list[str]:
    return ["train", "--agent", "kvp", "--traces", str(traces), "--steps", "4", "--save-every", "2",
            "--out", str(out), "--layer", "1", "--kv-head", "0", "--env-opt", "max_tokens=96", "--no-progress"]


@pytest.mark.slow  # six fresh processes
def test_train_killed_at_every_write_point_then_rerun_equals_an_uninterrupted_run(peaked_traces, tmp_path):
    from typer.testing import CliRunner

    from kvp_gym.cli import app

    traces = Path(peaked_traces.directory)
    straight = tmp_path / "straight"
    assert CliRunner().invoke(app, train_args(traces, straight)).exit_code == 0
    write_points = 5  # run.json, then (scorer, state) at steps 2 and 4
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for kill_at in range(1, write_points + 1):
        out = tmp_path / f"killed-at-{kill_at}"
        killed = subprocess.run([sys.executable, str(KILL_HELPER), str(kill_at), str(out), *train_args(traces, out)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        assert list(out.glob(".*.tmp")), f"kill point {kill_at} left no temporary file to clean up"
        result = CliRunner().invoke(app, train_args(traces, out))
        assert result.exit_code == 0, result.output
        _same_run(straight, out)
