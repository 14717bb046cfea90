"""Scale-out on Ray (kvp_gym.scale, agents/sweep.py): a local Ray with 2 CPUs on the tiny model gives the
serial path's outputs, and a worker killed mid-unit loses nothing (Ray retries the unit).

Every Ray test shares one session-scoped Ray; each arms the crash hook (kvp_gym.scale.crash_once) so that
one of its units kills its worker process the first time."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from kvp_gym.io import TEMP_SUFFIX
from kvp_gym.scale.runtime import CRASH_DIR_ENV, RAY_MISSING, WORKER_ENV, wants_ray


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray (2 CPUs) for the session; yields the crash hook's marker directory."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: install the kvp-gym[ray] extra (./setup.sh does) to test the scale-out paths")
    crash_dir = tmp_path_factory.mktemp("crash")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**WORKER_ENV, CRASH_DIR_ENV: str(crash_dir)}})
    yield crash_dir
    ray.shutdown()


@contextlib.contextmanager
def one_torch_thread():
    """The serial reference on one torch thread, as every worker runs: float32 sums in the same order, so the
    outputs are bitwise equal (with more threads, perplexity sums can differ in the last bits: docs/scale-out.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def arm(crash_dir: Path, kind: str) -> Path:
    """The next unit of ``kind`` kills its worker; returns the marker that says it happened."""
    (crash_dir / f"{kind}.arm").touch()
    return crash_dir / f"{kind}.fired"


def test_arguments_are_checked_without_ray(monkeypatch) -> None:
    from kvp_gym.scale import runtime

    assert not wants_ray(0, None) and not wants_ray(None, None)
    with pytest.raises(ValueError, match="--workers"):
        wants_ray(-1, None)
    monkeypatch.setattr(runtime, "ray_available", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        runtime.wants_ray(2, None)
    assert "[ray]" in RAY_MISSING


def test_ctrl_c_stops_the_workers_and_the_rerun_completes_the_set(tiny_model_dir, tmp_path) -> None:
    """Ctrl-C (SIGINT to the command's whole process group, as a terminal sends it) mid-run on 2 workers: exit
    code 130 with one line, whole files only, no Ray process left; the rerun completes the set, every file
    checked against the manifest's checksum (files equal to the serial path's: the test above)."""
    pytest.importorskip("ray", reason="Ray is not installed: install the kvp-gym[ray] extra")
    import os
    import signal
    import subprocess
    import sys
    import time

    from kvp_gym.traces import TraceDataset
    from kvp_gym.traces.generate import generate_traces

    out, n = tmp_path / "ray", 500  # the tiny model traces ~20 sequences/s on 2 workers: the interrupt lands mid-set
    command = [str(Path(sys.executable).with_name("kvp-gym")), "traces", "generate", "--source", "prose", "--n", str(n),
               "--length", "128", "--split", "test", "--out", str(out), "--model", str(tiny_model_dir), "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT handled as in a terminal even where this test runs with it ignored (a background job inherits that)
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt once the run is in its steady state (both workers writing), far from its end
    while len(list(out.glob("seq_*.safetensors"))) < 10 and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "rerun the same command" in stderr
    assert 1 <= len(list(out.glob("seq_*.safetensors"))) < n, "the run was not interrupted mid-set"
    # a worker killed mid-write leaves at most a hidden temporary file (atomic writes), never a partial visible one
    visible = {path.name for path in out.iterdir() if not path.name.startswith((".", "seq_"))}
    assert "samples.json" in visible <= {"manifest.json", "samples.json"}, visible
    assert all(path.suffix == ".safetensors" for path in out.glob("seq_*"))
    time.sleep(1)
    left = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the interrupted run still alive: {left}"
    with one_torch_thread():
        generate_traces(out, "prose", n, 128, split="test", model_name=str(tiny_model_dir), show_progress=False)
    resumed = TraceDataset(out)
    assert len(resumed) == n
    assert not list(out.glob(f".*{TEMP_SUFFIX}")), "the rerun left the killed writes' temporary files"
    for index in range(n):  # each first read checks the file's sha256 against the manifest
        assert 0 < resumed[index].length <= 128


def test_traces_on_workers_are_the_serial_files(ray_cluster, tiny_model_dir, tmp_path) -> None:
    from kvp_gym.traces.generate import generate_traces

    serial, distributed = tmp_path / "serial", tmp_path / "ray"
    with one_torch_thread():
        generate_traces(serial, "prose", 4, 128, split="test", model_name=str(tiny_model_dir), show_progress=False)
    fired = arm(ray_cluster, "trace")
    generate_traces(distributed, "prose", 4, 128, split="test", model_name=str(tiny_model_dir), show_progress=False, workers=2)
    assert fired.exists(), "the crash hook never killed a worker"

    def same_set() -> None:
        assert sorted(path.name for path in serial.iterdir()) == sorted(path.name for path in distributed.iterdir())  # no temp files
        for path in serial.glob("seq_*.safetensors"):
            assert path.read_bytes() == (distributed / path.name).read_bytes(), path.name  # byte-identical
        a, b = (json.loads((directory / "manifest.json").read_text()) for directory in (serial, distributed))
        assert {**a, "created": None} == {**b, "created": None}
        assert (serial / "samples.json").read_bytes() == (distributed / "samples.json").read_bytes()

    same_set()
    # a sequence lost (its file gone): the rerun on workers completes the set again
    (distributed / "seq_00002.safetensors").unlink()
    generate_traces(distributed, "prose", 4, 128, split="test", model_name=str(tiny_model_dir), show_progress=False, workers=2)
    same_set()


@pytest.mark.parametrize("batch", [1, 2])
def test_dialogue_samples_on_workers_are_the_serial_samples(ray_cluster, tiny_model_dir, tmp_path, batch, monkeypatch,
                                                            capsys) -> None:
    """The model's dialogue replies (the slow part of a dialogue set) made on workers, one at a time or in
    groups, one worker killed once and one dialogue already made by an interrupted run: the serial path's
    samples and sequence files. A group's tokens reach the driver's log before the group's samples."""
    from kvp_gym import progress
    from kvp_gym.traces.generate import PARTIAL_SAMPLES, generate_traces

    serial, distributed = tmp_path / "serial", tmp_path / "ray"
    with one_torch_thread():
        generate_traces(serial, "dialogue", 3, 96, split="test", model_name=str(tiny_model_dir), show_progress=False,
                        dialogue_batch=batch)
    samples = json.loads((serial / "samples.json").read_text())
    partial = distributed / PARTIAL_SAMPLES
    partial.mkdir(parents=True)
    (partial / "00001.json").write_text(json.dumps(samples["samples"][1]))
    fired = arm(ray_cluster, "dialogue")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    capsys.readouterr()
    generate_traces(distributed, "dialogue", 3, 96, split="test", model_name=str(tiny_model_dir), show_progress=True, workers=2,
                    dialogue_batch=batch)
    assert fired.exists(), "the crash hook never killed a worker"
    counts = [int(line.split(": ")[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()
              if line.startswith("dialogue samples")]
    if batch > 1:  # counted in tokens: a partial count is a worker's report from a group in progress
        assert counts[-1] == 3 * 96 and any(count % 96 for count in counts), counts
    else:
        assert counts[-1] == 3, counts
    assert (serial / "samples.json").read_bytes() == (distributed / "samples.json").read_bytes()
    assert not partial.exists()
    for path in serial.glob("seq_*.safetensors"):
        assert path.read_bytes() == (distributed / path.name).read_bytes(), path.name


def test_importance_store_on_workers_is_the_serial_store(ray_cluster, tiny_traces, tmp_path) -> None:
    """The store files written on workers, one worker killed once and one file already written by an
    interrupted run, are the serial path's bytes."""
    import shutil

    from kvp_gym.traces import TraceDataset
    from kvp_gym.utility.store import ImportanceStore

    here, copy = (TraceDataset(shutil.copytree(tiny_traces.directory, tmp_path / name, ignore=shutil.ignore_patterns("importance-*")))
                  for name in ("serial", "ray"))
    with one_torch_thread():
        serial = ImportanceStore.build(here, (40, 64), window=8, show_progress=False)
    done = sorted(serial.directory.glob("seq_*.safetensors"))
    assert len(done) == len(here) >= 3
    store_dir = ImportanceStore.directory_for(copy.directory, (40, 64), 8)
    store_dir.mkdir()
    shutil.copy(done[1], store_dir / done[1].name)
    fired = arm(ray_cluster, "store")
    distributed = ImportanceStore.build(copy, (40, 64), window=8, show_progress=False, workers=2)
    assert fired.exists(), "the crash hook never killed a worker"
    assert distributed.directory == store_dir and distributed.trace_prefixes == serial.trace_prefixes
    assert sorted(path.name for path in store_dir.iterdir()) == [path.name for path in done]  # no temp files
    for path in done:
        assert path.read_bytes() == (store_dir / path.name).read_bytes(), path.name


def test_leaderboard_on_workers_writes_the_serial_records(ray_cluster, tiny_suite, tmp_path) -> None:
    from kvp_gym.eval.leaderboard import run_leaderboard

    policies = ["streamingllm", "snapkv", "random"]
    with one_torch_thread():
        serial = run_leaderboard(tiny_suite, tmp_path / "serial", policies, show_progress=False)
    fired = arm(ray_cluster, "leaderboard")
    distributed = run_leaderboard(tiny_suite, tmp_path / "ray", policies, show_progress=False, workers=2)
    assert fired.exists(), "the crash hook never killed a worker"
    assert distributed == serial
    a, b = (tmp_path / name / "records" / tiny_suite.id for name in ("serial", "ray"))
    names = sorted(path.name for path in a.iterdir())
    assert names == sorted(path.name for path in b.iterdir()) and len(names) > 10
    for name in names:
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def test_sweep_on_workers_trains_the_serial_runs(ray_cluster, tiny_traces, tmp_path) -> None:
    from agents.sweep import run_sweep
    from agents.train import TrainConfig, train
    from kvp_gym.checkpoint import load_scorer

    base = TrainConfig(agent="kvp", traces=str(tiny_traces.directory), out="", steps=2, env_options={"max_tokens": 96},
                       eval_traces=str(tiny_traces.directory), eval_every=2, save_every=2, eval_episodes=16, progress=False)
    fired = arm(ray_cluster, "sweep")
    summary = run_sweep(base, tmp_path / "sweep", ["kvp"], ["1:0"], [0, 1], rewards=["cost_ratio", "neg_cost"],
                        workers=2, show_progress=False)
    assert fired.exists(), "the crash hook never killed a worker"
    assert len(summary["runs"]) == 4 and len(summary["rows"]) == 2
    assert all(row["iqm_low"] <= row["iqm"] <= row["iqm_high"] for row in summary["rows"])
    assert {"SUMMARY.md", "summary.json", "summary.png"} <= {path.name for path in (tmp_path / "sweep").iterdir()}
    run = next(run for run in summary["runs"] if run["seed"] == 1 and run["reward"] == "neg_cost")
    with one_torch_thread():
        alone = train(TrainConfig(**{**vars(base), "seed": 1, "layer": 1, "kv_head": 0, "env_options": {"max_tokens": 96, "reward": "neg_cost"},
                                     "out": str(tmp_path / "alone")}))
    a, b = load_scorer(alone.scorer_path), load_scorer(Path(run["out"]))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert run["evaluation"] == pytest.approx(alone.evaluation)


def test_cli_rejects_bad_workers_in_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from kvp_gym.cli import app

    result = CliRunner().invoke(app, ["traces", "generate", "--source", "prose", "--n", "1", "--out", str(tmp_path / "t"),
                                      "--workers", "-1"])
    assert result.exit_code == 2 and "--workers" in result.output
    assert not (tmp_path / "t").exists()


def test_the_three_commands_parse(tmp_path) -> None:
    """The documented scale-out command lines parse with the real CLI (option names and types)."""
    import typer

    from kvp_gym.cli import app

    group = typer.main.get_command(app)
    for line in (
        "traces generate --source prose --n 64 --length 1024 --split test --out t --workers 2",
        "leaderboard --suite quick --out lb --workers 2 --address auto",
        "sweep --agent kvp --agent pairwise --traces a --eval-traces b --steps 3 --heads each --heads 1:0 --seed 0 --seed 1 "
        "--reward cost_ratio --reward neg_cost --out s --workers 2",
    ):
        args = line.split()
        context = group.make_context("kvp-gym", list(args))
        name, command, rest = group.resolve_command(context, list(args))
        command.make_context(name, rest, parent=context)
