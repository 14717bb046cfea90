"""Every CLI error is one line and exit code 2, found before any slow work; leaderboard policies have
unique names and records keyed by the scorer's identity; a killed leaderboard resumes to the same bytes;
checkpoint headers are checked field by field."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvp_gym import scorers
from kvp_gym.checkpoint import CheckpointError, load_scorer, read_header, save_scorer
from kvp_gym.cli import app
from kvp_gym.eval.leaderboard import load_policies, run_leaderboard, scorer_identity
from kvp_gym.eval.suite import SUITES, Suite
from kvp_gym.models import ModelSpec

HERE = Path(__file__).parent
TINY_SPEC = ModelSpec("tiny", 2, 4, 2, 16, 10000.0)


def cli(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_knorm(path: Path, spec: ModelSpec = TINY_SPEC) -> Path:
    return save_scorer(scorers.get("knorm"), path, registry_name="knorm", config={}, model_spec=spec,
                       protected={"sink": 2, "recent": 4}, training={})


# -- kvp-gym generate -------------------------------------------------------------------------------------
def test_generate_refuses_a_checkpoint_without_every_head_before_generating(tiny_model_dir, tmp_path):
    from agents.mlp_scorer import PerHeadMLPScorer
    from transformers import AutoConfig

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir), str(tiny_model_dir))
    scorer = PerHeadMLPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, hidden=4, heads=[(1, 0)])
    save_scorer(scorer, tmp_path / "one-head", registry_name="mlp", config=scorer.config(), model_spec=spec,
                protected={"sink": 2, "recent": 4}, training={})
    result = cli("generate", "--policy", tmp_path / "one-head", "--budget", "8", "--model", tiny_model_dir,
                 "--prompt", "a b c d e f g h i j k l m n o p", "--max-new-tokens", "3", "--raw")
    one_line_error(result, "has agents for 1 of the model's 4 (layer, KV head) pairs, missing (0, 0)",
                          "train it with --all-heads")
    assert result.stdout == ""  # not a token was generated


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "no-such-policy", "--budget", "8"], "--policy: unknown scorer 'no-such-policy'"),
    (["--policy", "knorm", "--budget", "8", "--prompt", "   "], "the prompt is empty"),
    (["--policy", "knorm", "--budget", "1"], "--budget / --sink / --recent"),
])
def test_generate_errors_are_one_line(tiny_model_dir, args, fragment):
    prompt = [] if "--prompt" in args else ["--prompt", "a b c d e f g h"]
    one_line_error(cli("generate", *args, *prompt, "--model", tiny_model_dir, "--max-new-tokens", "2"), fragment)


def test_generate_refuses_a_bad_header_in_one_line(tiny_model_dir, tmp_path):
    file = save_knorm(tmp_path / "bad")
    _rewrite_header(file, lambda header: header.update(protected="4"))
    one_line_error(cli("generate", "--policy", tmp_path / "bad", "--budget", "8", "--model", tiny_model_dir,
                       "--prompt", "a b c"), "header field 'protected' must map 'sink' / 'recent' to non-negative ints")


# -- checkpoint headers ------------------------------------------------------------------------------------
def _rewrite_header(file: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as handle:
        header = json.loads(handle.metadata()["kvp_gym"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    edit(header)
    save_file(tensors, str(file), metadata={"kvp_gym": json.dumps(header)})


@pytest.mark.parametrize("field, value, fragment", [
    ("protected", "4", "header field 'protected' must map 'sink' / 'recent' to non-negative ints, got '4'"),
    ("protected", {"sink": "4"}, "header field 'protected'"),
    ("protected", {"sink": True}, "header field 'protected'"),
    ("config", [], "header field 'config' must be a dict"),
    ("model", {"name": "x"}, "header field 'model' is not a model spec"),
    ("registry_name", 3, "header field 'registry_name' must be a str"),
])
def test_malformed_checkpoint_headers_name_the_field(tmp_path, field, value, fragment):
    file = save_knorm(tmp_path / "ckpt")
    _rewrite_header(file, lambda header: header.update({field: value}))
    for read in (read_header, load_scorer):
        with pytest.raises(CheckpointError) as error:
            read(file)
        assert fragment in str(error.value)


def test_save_scorer_refuses_bool_and_string_protected_counts(tmp_path):
    for protected in ({"sink": True}, {"sink": "4"}, {"sync": 4}):
        with pytest.raises(CheckpointError, match="protected must map 'sink' / 'recent' to non-negative ints"):
            save_scorer(scorers.get("knorm"), tmp_path / "x", registry_name="knorm", config={}, model_spec=TINY_SPEC,
                        protected=protected, training={})


# -- kvp-gym train -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--agent", "kvp", "--traces", "{tmp}/nowhere"], "nowhere"),
    (["--agent", "nope", "--traces", "{traces}"], "unknown agent 'nope'; choose one of kvp, grpo"),
    (["--agent", "kvp", "--traces", "{traces}", "--steps", "0"], "--steps, --save-every and --eval-every must be positive"),
    (["--agent", "kvp", "--traces", "{traces}", "--layer", "9"], "--layer 9 is out of range [0, 2)"),
    (["--agent", "kvp", "--traces", "{traces}", "--env-opt", "max_tokens=200000"], "max_tokens must be an int in [2, 16384]"),
    (["--agent", "kvp", "--traces", "{traces}", "--env-opt", "bogus=1"], "bogus"),
])
def test_train_errors_are_one_line(tiny_traces, tmp_path, args, fragment):
    filled = [arg.format(tmp=tmp_path, traces=tiny_traces.directory) for arg in args]
    defaults = {"--steps": "2", "--layer": "0"}
    extra = [item for key, value in defaults.items() if key not in filled for item in (key, value)]
    one_line_error(cli("train", *filled, *extra, "--out", tmp_path / "run", "--no-progress"), fragment)
    assert not (tmp_path / "run" / "run.json").exists()


# -- kvp-gym leaderboard -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--checkpoint", "{tmp}/missing"], "no scorer checkpoint at"),
    (["--policies", "knorm,nope"], "--policies: unknown scorer 'nope'"),
    (["--suite", "huge"], "--suite: unknown suite 'huge'"),
    (["--policies", "knorm", "--checkpoint", "{tmp}/knorm"], "would be named 'knorm' on the leaderboard, like the registered scorer"),
])
def test_leaderboard_errors_are_one_line_and_come_before_any_trace(tmp_path, monkeypatch, args, fragment):
    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path / "home"))
    save_knorm(tmp_path / "knorm")
    started = time.perf_counter()
    one_line_error(cli("leaderboard", "--suite", "demo", *[a.format(tmp=tmp_path) for a in args], "--out", tmp_path / "lb"),
                   fragment)
    assert not (tmp_path / "home").exists() and time.perf_counter() - started < 10  # no suite trace was generated


def test_checkpoints_with_the_same_directory_name_are_refused(tmp_path):
    save_knorm(tmp_path / "A" / "kvp"), save_knorm(tmp_path / "B" / "kvp")
    with pytest.raises(ValueError, match=r"--checkpoint .*B/kvp would be named 'kvp' on the leaderboard, like --checkpoint .*A/kvp"):
        load_policies([], [tmp_path / "A" / "kvp", tmp_path / "B" / "kvp"])
    with pytest.raises(ValueError, match="names 'knorm' twice"):
        load_policies(["knorm", "knorm"], [])
    policies, ids = load_policies(["knorm"], [tmp_path / "A" / "kvp"])
    assert sorted(policies) == ["knorm", "kvp"] and ids["knorm"].startswith("knorm@") and ids["kvp"].startswith("kvp@")


@dataclasses.dataclass
class _Mine:
    needs = frozenset()
    scale: float = 1.0

    def score(self, view):
        return view.keys.norm(dim=-1) * self.scale


@dataclasses.dataclass
class _MineAgain:
    needs = frozenset()
    scale: float = 1.0

    def score(self, view):
        return -view.keys.norm(dim=-1) * self.scale


def test_a_registered_scorer_is_keyed_by_its_code_and_config():
    assert scorer_identity(_Mine()) == scorer_identity(_Mine())
    assert scorer_identity(_Mine()) != scorer_identity(_Mine(scale=2.0))
    assert scorer_identity(_Mine()) != scorer_identity(_MineAgain())


def test_a_re_registered_scorer_never_reuses_the_old_records(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path / "home"))
    suite = Suite(name="tiny", version=1, model=str(tiny_model_dir), sources=("prose",), traces_per_source=1, length=96,
                  prefix_fractions=(0.5,), query_window=8)
    try:
        scorers.register("mine-test", _Mine, overwrite=True)
        first = run_leaderboard(suite, tmp_path / "lb", ["mine-test"], downstream=False, show_progress=False)
        scorers.register("mine-test", _MineAgain, overwrite=True)
        second = run_leaderboard(suite, tmp_path / "lb", ["mine-test"], downstream=False, show_progress=False)
    finally:
        scorers._registry.pop("mine-test", None)
    assert first["ranking"][0]["cost_ratio"] != second["ranking"][0]["cost_ratio"]
    assert len(list((tmp_path / "lb" / "records" / "tiny-v1").glob("*.json"))) == 2


# -- SIGKILL at every write point of `kvp-gym leaderboard`, then rerun: the same outputs, no temp files ------
def report_snapshot(out: Path) -> dict:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "results.json":
                parsed = json.loads(data)
                parsed.pop("created")
                data = parsed
            elif path.name == "LEADERBOARD.md":
                data = "\n".join(line for line in data.decode().splitlines() if "Created" not in line)
            files[str(path.relative_to(out))] = data
    return files


@pytest.mark.slow  # about ten fresh processes
def test_leaderboard_killed_at_every_write_point_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    fields = dict(name="killtest", version=1, model=str(tiny_model_dir), sources=["prose"], traces_per_source=2,
                  length=96, prefix_fractions=[0.5], query_window=8)
    suite = Suite(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    monkeypatch.setitem(SUITES, "killtest", suite)
    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path / "home"))
    args = lambda out: ["leaderboard", "--suite", "killtest", "--policies", "knorm,random", "--no-downstream", "--out", str(out)]  # noqa: E731
    straight = tmp_path / "straight"
    assert cli(*args(straight)).exit_code == 0
    expected = report_snapshot(straight)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KVP_TEST_SUITE": json.dumps(fields),
           "MPLBACKEND": "Agg"}
    records = 2 * 2  # traces x policies
    reports = sum(1 for name in expected if "/" not in name)  # LEADERBOARD.md, results.json/csv, plots
    points = [("records/killtest-v1", k) for k in range(1, records + 1)] + [(".", k) for k in range(1, reports + 1)]
    for where, kill_at in points:
        out = tmp_path / f"killed-{where.replace('/', '_')}-{kill_at}"
        killed = subprocess.run([sys.executable, str(HERE / "kill_leaderboard.py"), str(kill_at), str(out / where), *args(out)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert list((out / where).glob(".*.tmp")), f"kill point {where} {kill_at} left no temporary file"
        result = cli(*args(out))
        assert result.exit_code == 0, result.output
        assert report_snapshot(out) == expected, f"killed at write {kill_at} into {where}"
        assert not list(out.rglob(".*.tmp"))
