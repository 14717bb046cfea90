"""Write a trace set: run the model once per text sample and store post-RoPE Q/K/V of every layer.

Resumable and atomic: every file is written to a temporary name and renamed into place, and the
manifest (rewritten atomically after each sequence) lists only finished sequences. Rerunning the
same command after a kill continues where it stopped; rerunning it with other settings is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvp_gym.data import SOURCES, SPLITS, TextSample, encode_sample, make_dialogue, make_dialogue_group, make_samples
from kvp_gym.data.ruler import DEFAULT_HAYSTACK, check_ruler_options
from kvp_gym.io import package_versions, remove_temp_files, write_atomic, write_json_atomic
from kvp_gym.models import DEFAULT_MODEL, ModelSpec, capture_qkv, load_model
from kvp_gym.progress import progress_bar
from kvp_gym.traces.dataset import (FORMAT, FORMAT_VERSION, MANIFEST, TraceDataset, TraceError, read_manifest, sha256_of,
                                    written_file_sha256)

DEFAULT_SEEDS = {"train": 0, "test": 1}
SAMPLES_FILE = "samples.json"
PARTIAL_SAMPLES = "samples.partial"  # dialogue samples made so far, one file each


def token_losses(logits: torch.Tensor, tokens: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and predictive entropy of the full-cache model. logits [T, V], tokens [T] -> [T], [T]."""
    length = tokens.shape[0]
    loss = torch.zeros(length)
    entropy = torch.zeros(length)
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        log_probs = torch.log_softmax(logits[start:stop].float(), dim=-1)
        loss[start + 1 : stop + 1] = -log_probs.gather(1, tokens[start + 1 : stop + 1, None])[:, 0]
        entropy[start + 1 : stop + 1] = -(log_probs.exp() * log_probs).sum(-1)
    return loss, entropy


def _check_arguments(source: str, split: str, n: int, length: int) -> None:
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {SOURCES}, got {source!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if length < 32:
        raise ValueError(f"--length must be at least 32 tokens, got {length}")


def check_same_settings(path: Path, recorded: Any, params: dict[str, Any]) -> None:
    """Refuse to reuse what ``path`` holds (a manifest or samples.json) if it was made with other settings."""
    if recorded == params:
        return
    directory = path.parent
    if not isinstance(recorded, dict):
        raise TraceError(
            f"{path} does not record the settings it was made with; refusing to mix it with new traces: "
            f"choose another --out, or delete {directory} to start over"
        )
    changed = ", ".join(
        f"{key}={recorded.get(key)!r} (now {params.get(key)!r})"
        for key in sorted(set(recorded) | set(params))
        if recorded.get(key) != params.get(key)
    )
    raise TraceError(
        f"{directory} holds traces made with other settings ({changed}; recorded in {path.name}); refusing to mix "
        f"them: choose another --out, or delete {directory} to start over"
    )


class TraceWriter:
    """Appends finished sequences to a trace set, one atomic file and one atomic manifest update each.

    Resuming checks the settings against the manifest, forgets sequences whose file is missing or
    fails its checksum (they are generated again) and removes temporary files left by a killed run.
    """

    def __init__(self, directory: Path, params: dict[str, Any], spec: ModelSpec) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(directory)
        if (directory / MANIFEST).exists():
            self.manifest = read_manifest(directory)
            check_same_settings(directory / MANIFEST, self.manifest.get("params"), params)
            self.manifest["sequences"] = [record for record in self.manifest["sequences"] if self._intact(record)]
        else:
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "params": params,
                "model": spec.to_dict(),
                "dtype": "float16",
                "versions": package_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sequences": [],
            }

    def _intact(self, record: dict[str, Any]) -> bool:
        path = self.directory / record["file"]
        return path.exists() and path.stat().st_size == record["bytes"] and sha256_of(path) == record["sha256"]

    def done(self) -> set[str]:
        return {record["file"] for record in self.manifest["sequences"]}

    def add(self, name: str, model: Any, ids: torch.Tensor, meta: dict[str, Any]) -> int:
        """Trace ``ids [T]`` through ``model`` and store it as ``name``; returns T."""
        return self.add_record(write_sequence(self.directory, name, model, ids, meta))

    def add_record(self, record: dict[str, Any]) -> int:
        """Enter a sequence file already written by ``write_sequence`` (here or on a worker); returns T."""
        self.manifest["sequences"] = [old for old in self.manifest["sequences"] if old["file"] != record["file"]]
        self.manifest["sequences"].append(record)
        self.manifest["sequences"].sort(key=lambda record: record["file"])
        write_json_atomic(self.directory / MANIFEST, self.manifest)
        return int(record["length"])


def write_sequence(directory: Path, name: str, model: Any, ids: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
    """Trace ``ids [T]`` through ``model``, write ``directory/name`` atomically; returns its manifest record."""
    logits, captured = capture_qkv(model, ids[None])
    loss, entropy = token_losses(logits, ids)
    tensors = {"tokens": ids, "loss": loss, "entropy": entropy}
    for layer in sorted(captured.k):
        tensors[f"q.{layer}"] = captured.q[layer]
        tensors[f"k.{layer}"] = captured.k[layer]
        tensors[f"v.{layer}"] = captured.v[layer]
    path = directory / name
    _require_finite(tensors, path)
    write_atomic(path, lambda tmp: save_file(tensors, tmp))
    return {"file": name, "length": int(ids.shape[0]), "bytes": path.stat().st_size, "sha256": written_file_sha256(path),
            "meta": meta}


def _require_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(tensor.float().sum().isfinite())]
    if bad:
        raise TraceError(
            f"the model produced NaN or inf in {bad[:3]} for {path}; nothing was written (check the model and its dtype)"
        )


def _load_samples(directory: Path, params: dict[str, Any], tokenizer: Any, model: Any,
                  show_progress: bool = True, ray: tuple[int | None, str | None] | None = None) -> list[dict[str, Any]]:
    """Text samples of the set, made once and kept with their settings in samples.json (dialogue is slow to make:
    on the Ray of ``ray`` = (workers, address) when given)."""
    path = directory / SAMPLES_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        check_same_settings(path, stored.get("params") if isinstance(stored, dict) else None, params)
        return stored["samples"]
    if params["source"] == "dialogue":
        records = _dialogue_records(directory / PARTIAL_SAMPLES, params, tokenizer, model, show_progress, ray)
    else:
        samples = make_samples(
            params["source"],
            tokenizer,
            n=params["n"],
            split=params["split"],
            seed=params["seed"],
            target_tokens=params["length"],
            model=model,
            **{key: params[key] for key in ("tasks", "haystack") if key in params},
        )
        records = [sample.to_dict() for sample in samples]
    write_json_atomic(path, {"params": params, "samples": records})
    shutil.rmtree(directory / PARTIAL_SAMPLES, ignore_errors=True)
    return records


def dialogue_groups(params: dict[str, Any]) -> list[list[int]]:
    """The set's dialogues in the groups they are written in: ``params["dialogue_batch"]`` consecutive
    indices each (one each without it)."""
    batch, count = params.get("dialogue_batch", 1), params["n"]
    return [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]


def dialogue_records(model: Any, tokenizer: Any, params: dict[str, Any], indices: list[int],
                     on_tokens: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The dialogues ``indices`` (one of ``dialogue_groups``' groups) of a set with ``params`` (split, seed,
    length, dialogue_batch), as sample records; a batched group tells ``on_tokens`` the tokens it writes."""
    if "dialogue_batch" not in params:
        return [make_dialogue(model, tokenizer, params["split"], params["seed"], index, params["length"]).to_dict()
                for index in indices]
    group = make_dialogue_group(model, tokenizer, params["split"], params["seed"], indices, params["length"],
                                on_tokens=on_tokens)
    return [sample.to_dict() for sample in group]


def _dialogue_records(partial: Path, params: dict[str, Any], tokenizer: Any, model: Any, show_progress: bool,
                      ray: tuple[int | None, str | None] | None = None) -> list[dict[str, Any]]:
    """The dialogue samples (the model writes every reply: about a minute each on a CPU core, unless batched),
    each kept in ``partial`` as its group is made, so an interrupted set resumes with the groups it lacks. One
    group at a time here, or on the Ray of ``ray`` = (workers, address) (each group is seeded by its indices
    alone: the same samples). A batched set's progress counts tokens as the model writes them (a group takes
    minutes), each group's count set to its dialogues' full length when it is kept."""
    partial.mkdir(parents=True, exist_ok=True)
    remove_temp_files(partial)
    settings = partial / "params.json"
    if settings.exists():
        check_same_settings(settings, json.loads(settings.read_text()), params)
    else:
        write_json_atomic(settings, params)
    paths = [partial / f"{index:05d}.json" for index in range(params["n"])]
    missing = [group for group in dialogue_groups(params) if not all(paths[index].exists() for index in group)]
    batch = params.get("dialogue_batch", 1)
    unit = params["length"] if batch > 1 else 1  # a batched set counts tokens
    description = (f"dialogue samples ({params['split']}), the model writing every reply"
                   + (f", {batch} dialogues at once (tokens)" if batch > 1 else ""))
    with progress_bar(params["n"] * unit, description, enabled=show_progress) as bar:
        bar.advance(unit * (params["n"] - sum(len(group) for group in missing)))
        written: dict[int, int] = {}  # first index of a group in progress -> tokens counted so far
        sizes = {group[0]: len(group) for group in missing}

        def wrote(first: int, tokens: int) -> None:
            # a group feeds a few tokens more than its share (a reply re-tokenized in the next prompt): count up to it
            counted = min(written.get(first, 0) + tokens, unit * sizes[first])
            bar.advance(counted - written.get(first, 0))
            written[first] = counted

        def keep(made: list[tuple[int, dict[str, Any]]]) -> None:
            for index, record in made:
                write_json_atomic(paths[index], record)
            bar.advance(unit * len(made) - written.pop(made[0][0], 0))

        live = wrote if batch > 1 else None
        if ray is not None:
            from kvp_gym.scale.traces import dialogues_on_workers

            dialogues_on_workers(params["model"], params, missing, keep, *ray, on_tokens=live)
        else:
            for group in missing:
                on_tokens = (lambda tokens, first=group[0]: wrote(first, tokens)) if live else None
                keep(list(zip(group, dialogue_records(model, tokenizer, params, group, on_tokens))))
    return [json.loads(path.read_text()) for path in paths]


def _tokenize(tokenizer: Any, record: dict[str, Any], length: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids [T] (truncated to ``length``) and the sample's metadata with its token offsets."""
    encoded = encode_sample(tokenizer, TextSample.from_dict(record))
    meta = {key: value for key, value in record.items() if key not in ("text", "prompt")}
    meta["question_token"] = encoded.question_token
    meta["answer_token"] = encoded.answer_token
    return torch.tensor(encoded.input_ids[:length]), meta


def generate_traces(
    out: str | Path,
    source: str,
    n: int,
    length: int,
    split: str = "train",
    model_name: str = DEFAULT_MODEL,
    seed: int | None = None,
    show_progress: bool = True,
    workers: int | None = None,
    address: str | None = None,
    tasks: tuple[str, ...] | None = None,
    haystack: str | None = None,
    dialogue_batch: int = 1,
) -> TraceDataset:
    """Generate (or resume) a trace set of ``n`` sequences of ``length`` tokens at ``out``.

    ``tasks``: the RULER tasks the samples cycle through (``source="ruler"`` only; default all).
    ``haystack``: what RULER hides the needles in (``kvp_gym.data.ruler.HAYSTACKS``; default "filler").
    ``dialogue_batch``: the model writes that many dialogues at once (``source="dialogue"`` only; other
    dialogues than one at a time, see ``make_dialogue_group``; ``benchmarks/dialogue_batch.py`` for the speed).
    ``workers`` / ``address``: trace the sequences on Ray actors (a local Ray with ``workers`` CPUs, or the
    cluster at ``address``; kvp_gym.scale), and the dialogue samples too; the files are the same."""
    _check_arguments(source, split, n, length)
    from kvp_gym.scale import wants_ray

    distributed = wants_ray(workers, address)
    directory = Path(out).expanduser()
    params = {
        "source": source,
        "split": split,
        "n": n,
        "length": length,
        "seed": DEFAULT_SEEDS[split] if seed is None else seed,
        "model": model_name,
    }
    if tasks is not None:  # only when set, so the sets made before this option keep their settings
        if source != "ruler":
            raise ValueError(f"tasks are RULER tasks, but source is {source!r}")
        params["tasks"] = list(tasks)
    if haystack is not None:  # likewise
        if source != "ruler":
            raise ValueError(f"--haystack is RULER's, but source is {source!r}")
        params["haystack"] = haystack
    if source == "ruler":  # before the directory exists
        check_ruler_options(tasks, haystack or DEFAULT_HAYSTACK)
    if isinstance(dialogue_batch, bool) or not isinstance(dialogue_batch, int) or dialogue_batch < 1:
        raise ValueError(f"--dialogue-batch must be a positive integer, got {dialogue_batch!r}")
    if dialogue_batch > 1:  # only when set, so the sets made one dialogue at a time keep their settings
        if source != "dialogue":
            raise ValueError(f"--dialogue-batch batches the model's dialogue replies, but source is {source!r}")
        params["dialogue_batch"] = dialogue_batch
        params["dialogue_writer"] = "stream"  # round 15's writer: a set begun by the earlier one must not resume with it
    model, tokenizer = load_model(model_name)
    writer = TraceWriter(directory, params, ModelSpec.from_config(model.config, model_name))
    if len(writer.done()) == n:  # finished: nothing to generate, no samples to read
        return TraceDataset(directory)
    samples = _load_samples(directory, params, tokenizer, model, show_progress, (workers, address) if distributed else None)
    done = writer.done()
    with progress_bar(total=len(samples), description=f"traces {source}/{split}", enabled=show_progress) as bar:
        bar.advance(len(done))
        if distributed:
            from kvp_gym.scale.traces import trace_on_workers

            jobs = [(f"seq_{index:05d}.safetensors", *_tokenize(tokenizer, sample, length)) for index, sample in enumerate(samples)]
            jobs = [job for job in jobs if job[0] not in done]
            trace_on_workers(model_name, directory, jobs, lambda record: bar.advance(1, status=f"{writer.add_record(record)} tok"),
                             workers, address)
            samples = []
        for index, sample in enumerate(samples):
            name = f"seq_{index:05d}.safetensors"
            if name in done:
                continue
            started = time.perf_counter()
            ids, meta = _tokenize(tokenizer, sample, length)
            tokens = writer.add(name, model, ids, meta)
            bar.advance(1, status=f"{tokens / (time.perf_counter() - started):,.0f} tok/s")
    return TraceDataset(directory)
