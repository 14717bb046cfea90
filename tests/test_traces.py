"""Trace sets: round trip, resume after a kill, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from kvp_gym.cli import app
from kvp_gym.traces import TraceDataset, TraceError, generate_traces
from kvp_gym.traces.generate import TraceWriter, token_losses


def test_random_trace_round_trip(tiny_traces):
    assert len(tiny_traces) == 3
    trace = tiny_traces[2]
    assert trace.length == 96 and trace.tokens.dtype == torch.long
    assert trace.q(1).shape == (4, 96, 16) and trace.k(1).shape == (2, 96, 16) and trace.v(0).shape == (2, 96, 16)
    assert trace._file.get_slice("k.0").get_dtype() == "F16"
    assert trace.loss[0] == 0 and (trace.loss[1:] > 0).all() and (trace.entropy[1:] > 0).all()
    manifest = tiny_traces.manifest
    assert manifest["model"]["num_kv_heads"] == 2 and "torch" in manifest["versions"]
    assert all(len(record["sha256"]) == 64 for record in manifest["sequences"])
    for index in range(3):
        tiny_traces[index].verify()


def test_token_losses_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    loss, entropy = token_losses(logits, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(loss, torch.tensor([0.0, torch.log(torch.tensor(2.0)), torch.log1p(torch.exp(torch.tensor(-2.0)))]))
    assert entropy[0] == 0 and abs(entropy[1] - torch.log(torch.tensor(2.0))) < 1e-6


@pytest.fixture
def prose_set(tmp_path, tiny_model_dir):
    def make(directory, n=3):
        return generate_traces(directory, "prose", n=n, length=64, split="test", model_name=str(tiny_model_dir), show_progress=False)

    return make


def test_text_source_traces_and_info(tmp_path, prose_set):
    dataset = prose_set(tmp_path / "prose")
    assert len(dataset) == 3 and all(length == 64 for length in dataset.lengths)
    assert dataset[0].meta["source"] == "prose"
    result = CliRunner().invoke(app, ["traces", "info", str(tmp_path / "prose")])
    assert result.exit_code == 0, result.output
    assert "sequences" in result.output and "192" in result.output


def test_written_files_get_the_permissions_open_gives(tmp_path, prose_set):
    from kvp_gym.io import UMASK

    dataset = prose_set(tmp_path / "prose")
    written = sorted(path for path in dataset.directory.iterdir() if path.is_file())
    assert written and {path.stat().st_mode & 0o777 for path in written} == {0o666 & ~UMASK}


def test_traces_written_here_are_not_read_again_to_check_them(tmp_path, prose_set, monkeypatch):
    """A recipe trains in the process that wrote its traces: their sha256s were taken as they were written.
    A file changed since (another mtime) is checked again, and a corrupt one is still caught."""
    import kvp_gym.traces.dataset as dataset_module

    dataset = prose_set(tmp_path / "prose")
    hashed = []
    real_sha256_of = dataset_module.sha256_of
    monkeypatch.setattr(dataset_module, "sha256_of", lambda path: hashed.append(path.name) or real_sha256_of(path))
    assert TraceDataset(dataset.directory)[0].k(0).shape[1] == 64 and hashed == []
    path = dataset.directory / "seq_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    written = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    if path.stat().st_mtime_ns == written:  # within the file system's clock tick: as the next tick would stamp it
        os.utime(path, ns=(written, written + 1_000_000))
    with pytest.raises(TraceError, match="checksum mismatch"):
        TraceDataset(dataset.directory)[1]
    assert hashed == ["seq_00001.safetensors"]


def test_resume_after_kill_leaves_no_partial_file(tmp_path, prose_set, monkeypatch):
    directory = tmp_path / "resume"
    original_add = TraceWriter.add
    calls = {"n": 0}

    def add_then_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(TraceWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prose_set(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [record["file"] for record in manifest["sequences"]] == ["seq_00000.safetensors"]
    first_bytes = (directory / "seq_00000.safetensors").read_bytes()
    monkeypatch.setattr(TraceWriter, "add", original_add)
    dataset = prose_set(directory)
    assert len(dataset) == 3
    assert (directory / "seq_00000.safetensors").read_bytes() == first_bytes
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*"))


def test_dialogue_samples_resume_one_dialogue_at_a_time(tmp_path, tiny_model_dir, monkeypatch):
    """The model writes every dialogue (minutes each on a CPU): an interrupted set keeps the dialogues made
    so far and the rerun makes only the rest, giving the uninterrupted set's samples."""
    from kvp_gym.traces import generate as generate_module

    def dialogue_set(directory):
        return generate_traces(directory, "dialogue", n=3, length=96, split="test", model_name=str(tiny_model_dir),
                               show_progress=False)

    original = generate_module.make_dialogue
    made = []

    def make_then_die(*args):
        made.append(args[4])
        if len(made) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(generate_module, "make_dialogue", make_then_die)
    with pytest.raises(KeyboardInterrupt):
        dialogue_set(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "samples.json").exists()
    assert sorted(path.name for path in (tmp_path / "resumed" / "samples.partial").iterdir()) == [
        "00000.json", "00001.json", "params.json"]
    made.clear()
    monkeypatch.setattr(generate_module, "make_dialogue", lambda *args, **kwargs: made.append(args[4]) or original(*args, **kwargs))
    dialogue_set(tmp_path / "resumed")
    assert made == [2]
    assert not (tmp_path / "resumed" / "samples.partial").exists()
    monkeypatch.setattr(generate_module, "make_dialogue", original)
    dialogue_set(tmp_path / "whole")
    assert (tmp_path / "resumed" / "samples.json").read_bytes() == (tmp_path / "whole" / "samples.json").read_bytes()


def test_batched_dialogues_resume_a_group_at_a_time(tmp_path, tiny_model_dir, monkeypatch):
    """With --dialogue-batch the model writes the dialogues in fixed groups: an interrupted set keeps its finished
    groups, the rerun makes only the rest and gives the uninterrupted set's samples; the batch is a setting."""
    from kvp_gym.traces import generate as generate_module

    def dialogue_set(directory, batch=2):
        return generate_traces(directory, "dialogue", n=3, length=96, split="test", model_name=str(tiny_model_dir),
                               show_progress=False, dialogue_batch=batch)

    original = generate_module.make_dialogue_group
    made = []

    def make_then_die(*args, **kwargs):
        made.append(args[4])
        if len(made) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "make_dialogue_group", make_then_die)
    with pytest.raises(KeyboardInterrupt):
        dialogue_set(tmp_path / "resumed")
    assert made == [[0, 1], [2]]
    assert sorted(path.name for path in (tmp_path / "resumed" / "samples.partial").iterdir()) == [
        "00000.json", "00001.json", "params.json"]
    made.clear()
    monkeypatch.setattr(generate_module, "make_dialogue_group", lambda *args, **kwargs: made.append(args[4]) or original(*args, **kwargs))
    dialogue_set(tmp_path / "resumed")
    assert made == [[2]]
    monkeypatch.setattr(generate_module, "make_dialogue_group", original)
    dialogue_set(tmp_path / "whole")
    assert (tmp_path / "resumed" / "samples.json").read_bytes() == (tmp_path / "whole" / "samples.json").read_bytes()
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["params"]["dialogue_batch"] == 2
    with pytest.raises(ValueError, match="other settings"):
        dialogue_set(tmp_path / "whole", batch=3)
    params = json.loads((tmp_path / "whole" / "manifest.json").read_text())["params"]
    settings = tmp_path / "old" / "samples.partial" / "params.json"  # a set begun by round 14's writer is not resumed
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({key: value for key, value in params.items() if key != "dialogue_writer"}))
    with pytest.raises(ValueError, match="dialogue_writer=None"):
        dialogue_set(tmp_path / "old")
    with pytest.raises(ValueError, match="--dialogue-batch must be a positive integer"):
        dialogue_set(tmp_path / "bad", batch=0)
    with pytest.raises(ValueError, match="but source is 'prose'"):
        generate_traces(tmp_path / "prose", "prose", n=1, length=96, model_name=str(tiny_model_dir), dialogue_batch=2)


def test_batched_dialogue_progress_counts_tokens_as_they_are_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A batched set's log shows the tokens the model writes while a group is in progress (a group of 12 takes
    minutes), and ends at n x length."""
    from kvp_gym import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    generate_traces(tmp_path / "set", "dialogue", n=3, length=96, split="test", model_name=str(tiny_model_dir),
                    dialogue_batch=2)
    counts = [int(line.split(": ")[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()
              if line.startswith("dialogue samples (test), the model writing every reply, 2 dialogues at once (tokens)")]
    assert counts[-1] == 3 * 96
    assert len([count for count in counts if 0 < count < 2 * 96]) > 10  # step by step through the first group


def test_batched_dialogue_progress_counts_a_group_up_to_its_share(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A group feeds a few tokens more than n x length when a reply re-tokenizes differently in the next prompt;
    the log counts it up to its share, so the count never passes the total nor goes back when the group ends."""
    from kvp_gym import progress
    from kvp_gym.traces import generate

    def overfeeding(model, tokenizer, params, group, on_tokens):
        on_tokens(10 * len(group) * params["length"])
        return real(model, tokenizer, params, group, on_tokens)

    real = generate.dialogue_records
    monkeypatch.setattr(generate, "dialogue_records", overfeeding)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    generate_traces(tmp_path / "set", "dialogue", n=3, length=96, split="test", model_name=str(tiny_model_dir),
                    dialogue_batch=2)
    counts = [int(line.split(": ")[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()
              if line.startswith("dialogue samples (test)")]
    assert counts == sorted(counts) and counts[-1] == 3 * 96


def test_mixing_parameters_is_refused(tmp_path, prose_set, tiny_model_dir):
    prose_set(tmp_path / "set", n=1)
    with pytest.raises(TraceError, match="refusing to mix"):
        generate_traces(tmp_path / "set", "prose", n=1, length=32, split="test", model_name=str(tiny_model_dir), show_progress=False)


def test_bad_generate_arguments(tmp_path):
    with pytest.raises(ValueError, match="--source"):
        generate_traces(tmp_path, "poetry", n=1, length=64)
    with pytest.raises(ValueError, match="--split"):
        generate_traces(tmp_path, "prose", n=1, length=64, split="dev")
    with pytest.raises(ValueError, match="--n"):
        generate_traces(tmp_path, "prose", n=0, length=64)


@pytest.fixture
def copy_of(tiny_traces, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(tiny_traces.directory, directory)
    return directory


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(TraceError, match="no trace set at .*nowhere"):
        TraceDataset(tmp_path / "nowhere")


def test_truncated_file_names_the_file(copy_of):
    path = copy_of / "seq_00001.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    dataset = TraceDataset(copy_of)
    with pytest.raises(TraceError, match="seq_00001.safetensors"):
        dataset[1]
    assert dataset[0].length == 96


def test_tampered_file_fails_verification(copy_of):
    path = copy_of / "seq_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="checksum mismatch for .*seq_00002"):
        TraceDataset(copy_of, verify=True)


def test_missing_file_and_bad_manifest(copy_of):
    (copy_of / "seq_00000.safetensors").unlink()
    with pytest.raises(TraceError, match="seq_00000.safetensors .*missing"):
        TraceDataset(copy_of)[0]
    (copy_of / "manifest.json").write_text("{not json")
    with pytest.raises(TraceError, match="corrupt manifest"):
        TraceDataset(copy_of)


def test_layer_out_of_range(tiny_traces):
    with pytest.raises(IndexError, match="layer 2 out of range"):
        tiny_traces[0].k(2)
    with pytest.raises(IndexError, match="trace index 3"):
        tiny_traces[3]


def test_ruler_haystack_is_a_recorded_setting(tmp_path, tiny_model_dir):
    """--haystack reaches the samples and the manifest; a wrong haystack or task list fails before anything is
    written."""
    dataset = generate_traces(tmp_path / "repeat", "ruler", n=1, length=256, model_name=str(tiny_model_dir),
                              haystack="repeat", show_progress=False)
    assert dataset.manifest["params"]["haystack"] == "repeat" and dataset[0].meta["meta"]["haystack"] == "repeat"
    with pytest.raises(ValueError, match="other settings"):
        generate_traces(tmp_path / "repeat", "ruler", n=1, length=256, model_name=str(tiny_model_dir), show_progress=False)
    with pytest.raises(ValueError, match="haystack must be one of"):
        generate_traces(tmp_path / "web", "ruler", n=1, length=256, model_name=str(tiny_model_dir), haystack="web")
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        generate_traces(tmp_path / "mcq", "ruler", n=1, length=256, model_name=str(tiny_model_dir), tasks=("mcq",))
    with pytest.raises(ValueError, match="but source is 'prose'"):
        generate_traces(tmp_path / "prose", "prose", n=1, length=96, model_name=str(tiny_model_dir), haystack="repeat")
    assert not any((tmp_path / name).exists() for name in ("web", "mcq", "prose"))
