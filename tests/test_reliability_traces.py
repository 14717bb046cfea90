"""Trace sets fail loudly and precisely: corrupt files, manifests that do not describe their files,
resumes under other settings, killed writes, bad CLI input, an interrupted model conversion."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvp_gym.data import SOURCES
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kvp_gym.cli import app
from kvp_gym.models import loading
from kvp_gym.traces import TraceDataset, TraceError, dataset, generate, generate_traces
from kvp_gym.traces.dataset import sha256_of
from kvp_gym.traces.generate import TraceWriter

N, LENGTH = 2, 48
KILL_HELPER = Path(__file__).with_name("kill_at_write.py")


def generate_args(out: Path, model_dir: Path, split: str = "test", source: str = "prose") -> list[str]:
    return ["traces", "generate", "--source", source, "--n", str(N), "--length", str(LENGTH),
            "--split", split, "--model", str(model_dir), "--out", str(out)]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, one line on stderr that contains every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def prose_set(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 2-sequence prose set of the tiny model, made with the CLI (never modified: copy it)."""
    out = tmp_path_factory.mktemp("prose") / "set"
    result = cli(*generate_args(out, tiny_model_dir))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy_of(prose_set, tmp_path) -> Path:
    directory = tmp_path / "copy"
    shutil.copytree(prose_set, directory)
    return directory


# -- corrupt files are caught when first opened, and the error says how to regenerate them -------------
def test_same_size_bit_flip_is_caught_on_open_and_regenerated_by_the_command_it_names(copy_of, tiny_model_dir):
    path = copy_of / "seq_00001.safetensors"
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    traces = TraceDataset(copy_of)
    assert traces[0].length == LENGTH
    with pytest.raises(TraceError, match=r"checksum mismatch for .*seq_00001\.safetensors.*delete it and rerun `kvp-gym traces generate") as error:
        traces[1]
    command = re.search(r"`kvp-gym (.*)`", str(error.value)).group(1)
    assert command == f"traces generate --source prose --n {N} --length {LENGTH} --split test --seed 1 --model {tiny_model_dir} --out {copy_of}"
    path.unlink()
    result = cli(*command.split())
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == original
    TraceDataset(copy_of, verify=True)


def test_nan_in_a_file_with_a_matching_checksum_is_rejected_when_read(copy_of):
    path = copy_of / "seq_00000.safetensors"
    tensors = load_file(path)
    tensors["k.1"][0, 5, 3] = float("nan")
    save_file(tensors, path)
    edit_manifest(copy_of, lambda m: m["sequences"][0].update(bytes=path.stat().st_size, sha256=sha256_of(path)))
    trace = TraceDataset(copy_of)[0]
    assert torch.isfinite(trace.k(0)).all()
    with pytest.raises(TraceError, match=r"corrupt trace file .*seq_00000\.safetensors: tensor 'k\.1' holds NaN or inf; delete it"):
        trace.k(1)


def test_a_model_that_produces_nan_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(generate, "token_losses", lambda logits, ids: (torch.full(ids.shape, float("nan")), torch.zeros(ids.shape)))
    with pytest.raises(TraceError, match=r"the model produced NaN or inf in \['loss'\] for .*seq_00000\.safetensors; nothing was written"):
        generate_traces(tmp_path / "set", "prose", n=1, length=LENGTH, split="test", model_name=str(tiny_model_dir), show_progress=False)
    assert not list((tmp_path / "set").glob("seq_*")) and not list((tmp_path / "set").glob(".*.tmp"))


def test_each_file_is_hashed_once_per_process(copy_of, monkeypatch):
    hashed = []
    monkeypatch.setattr(dataset, "sha256_of", lambda path: hashed.append(path) or sha256_of(path))
    for _ in range(3):
        TraceDataset(copy_of)[0].k(0)
    assert len(hashed) == 1


# -- the manifest must describe its files ----------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_layers", 1, r"manifest field 'model\.num_layers' is 1 but trace file .*seq_00000\.safetensors holds 2 layers"),
        ("num_kv_heads", 1, r"manifest field 'model\.num_kv_heads' is 1 but tensor 'k\.0' of trace file .*seq_00000\.safetensors has shape \[2, 48, 16\]"),
        ("num_heads", 8, r"manifest field 'model\.num_heads' is 8 but tensor 'q\.0' of trace file .*seq_00000\.safetensors has shape \[4, 48, 16\]"),
        ("head_dim", 32, r"manifest field 'model\.head_dim' is 32 but tensor 'q\.0'"),
    ],
)
def test_manifest_shapes_that_do_not_match_the_files_name_the_field(copy_of, field, value, message):
    edit_manifest(copy_of, lambda m: m["model"].update({field: value}))
    with pytest.raises(TraceError, match=message):
        TraceDataset(copy_of)[0]
    assert_one_line_error(cli("traces", "info", "--verify", str(copy_of)), f"'model.{field}'")


def test_a_wrong_sequence_length_names_the_field(copy_of):
    edit_manifest(copy_of, lambda m: m["sequences"][1].update(length=40))
    with pytest.raises(TraceError, match=r"manifest field 'sequences\[1\]\.length' is 40 but tensor 'tokens'"):
        TraceDataset(copy_of)[1]


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.pop("model"), "'model'"),
        (lambda m: m["model"].pop("num_kv_heads"), "'model.num_kv_heads' is missing"),
        (lambda m: m["model"].update(head_dim="64"), "'model.head_dim' has the wrong type"),
        (lambda m: m["model"].update(num_heads=0), "'model.num_heads' must be >= 1"),
        (lambda m: m["sequences"][0].pop("sha256"), "'sequences[0].sha256' is missing"),
        (lambda m: m.update(sequences={}), "'sequences' must be a list"),
    ],
)
def test_malformed_manifest_fields_are_named(copy_of, edit, field):
    edit_manifest(copy_of, edit)
    with pytest.raises(TraceError, match=re.escape(field)):
        TraceDataset(copy_of)
    assert_one_line_error(cli("traces", "info", str(copy_of)), field, "manifest.json")


# -- resuming never reuses anything made with other settings ---------------------------------------------
@pytest.fixture
def killed_before_the_first_sequence(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A set whose generation was killed after samples.json was written, before any manifest existed."""
    out = tmp_path / "set"

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TraceWriter, "add", die)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(out, "prose", n=N, length=LENGTH, split="train", model_name=str(tiny_model_dir), show_progress=False)
    monkeypatch.undo()
    assert (out / "samples.json").exists() and not (out / "manifest.json").exists()
    return out


@pytest.mark.parametrize("option, value, change", [("--split", "test", "split='train' (now 'test')"), ("--source", "ruler", "source='prose' (now 'ruler')")])
def test_samples_made_with_other_settings_are_never_reused(killed_before_the_first_sequence, tiny_model_dir, option, value, change):
    out = killed_before_the_first_sequence
    args = generate_args(out, tiny_model_dir, split="train")
    args[args.index(option) + 1] = value
    assert_one_line_error(cli(*args), change, "samples.json", "refusing to mix")
    assert not (out / "manifest.json").exists()


def test_samples_without_recorded_settings_are_refused(killed_before_the_first_sequence, tiny_model_dir):
    out = killed_before_the_first_sequence
    samples = json.loads((out / "samples.json").read_text())["samples"]
    (out / "samples.json").write_text(json.dumps(samples))  # the old format: a bare list
    assert_one_line_error(cli(*generate_args(out, tiny_model_dir, split="train")), "does not record the settings")


def test_the_same_settings_resume_from_the_saved_samples(killed_before_the_first_sequence, tiny_model_dir, prose_set):
    out = killed_before_the_first_sequence
    (out / ".seq_00000.safetensors.x1y2.tmp").write_bytes(b"\0" * 1000)  # what a killed write leaves
    result = cli(*generate_args(out, tiny_model_dir, split="train"))
    assert result.exit_code == 0, result.output
    assert len(TraceDataset(out, verify=True)) == N
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "samples.json", "seq_00000.safetensors", "seq_00001.safetensors"]


# -- every CLI validation error is one line and exit code 2 -------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["traces", "generate", "--source", "poetry", "--n", "1", "--out", "{tmp}/x"], f"--source must be one of {SOURCES}"),
        (["traces", "generate", "--source", "prose", "--split", "dev", "--n", "1", "--out", "{tmp}/x"], "--split must be one of ('train', 'test')"),
        (["traces", "generate", "--source", "prose", "--n", "0", "--out", "{tmp}/x"], "--n must be at least 1"),
        (["traces", "generate", "--source", "prose", "--n", "1", "--length", "8", "--out", "{tmp}/x"], "--length must be at least 32"),
        (["traces", "generate", "--source", "prose", "--n", "1", "--model", "{tmp}/no-model", "--out", "{tmp}/x"], "no-model"),
        (["traces", "info", "{tmp}/nowhere"], "no trace set at"),
    ],
)
def test_cli_validation_errors_are_one_line_with_exit_code_2(tmp_path, args, fragment):
    assert_one_line_error(cli(*[arg.format(tmp=tmp_path) for arg in args]), fragment)


# -- an interrupted model conversion is recovered by converting again ---------------------------------------
def test_conversion_replaces_a_directory_an_interrupted_one_left(tmp_path, smol_dir, monkeypatch):
    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path))
    target = loading.converted_dir()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half a model")  # no config.json: the conversion never finished
    # the slow part (dequantizing the GGUF) is replaced by copying its result; the directory handling is real
    monkeypatch.setattr(loading, "_save_dequantized", lambda directory: shutil.copytree(smol_dir, directory, dirs_exist_ok=True))
    model, _ = loading.load_model()
    assert (target / "config.json").exists() and model.config.num_hidden_layers == 30
    assert (target / "model.safetensors").read_bytes() == (smol_dir / "model.safetensors").read_bytes()
    assert sorted(path.name for path in target.parent.iterdir()) == [target.name]


# -- SIGKILL at every write point, then rerun: the same bytes as an uninterrupted run, no temp files ----------
def snapshot(directory: Path) -> dict[str, bytes | dict]:
    """Every file's bytes; the manifest as JSON without its creation time."""
    files: dict[str, bytes | dict] = {path.name: path.read_bytes() for path in directory.iterdir()}
    manifest = json.loads(files["manifest.json"])
    manifest.pop("created")
    files["manifest.json"] = manifest
    return files


@pytest.mark.slow  # five fresh processes (~35 s on 2 cores)
def test_killed_at_every_write_point_then_rerun_equals_an_uninterrupted_run(prose_set, tiny_model_dir, tmp_path):
    expected = snapshot(prose_set)
    write_points = 1 + 2 * N  # samples.json, then each sequence's file and the manifest update
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for kill_at in range(1, write_points + 1):
        out = tmp_path / f"killed-at-{kill_at}"
        killed = subprocess.run([sys.executable, str(KILL_HELPER), str(kill_at), str(out), *generate_args(out, tiny_model_dir)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        assert list(out.glob(".*.tmp")), f"kill point {kill_at} left no temporary file to clean up"
        result = cli(*generate_args(out, tiny_model_dir))
        assert result.exit_code == 0, result.output
        assert snapshot(out) == expected, f"killed at write {kill_at}"
