"""Write a trace set: run the model once per text sample and store post-RoPE Q/K/V of every layer.

Resumable and atomic: every file is written to a temporary name and renamed into place, and the
manifest (rewritten atomically after each sequence) lists only finished sequences. Rerunning the
same command after a kill continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvp_gym.data import SOURCES, SPLITS, TextSample, encode_sample, make_samples
from kvp_gym.io import package_versions, write_atomic, write_json_atomic
from kvp_gym.models import DEFAULT_MODEL, ModelSpec, capture_qkv, load_model
from kvp_gym.progress import progress_bar
from kvp_gym.traces.dataset import FORMAT, FORMAT_VERSION, MANIFEST, TraceDataset, TraceError, sha256_of

DEFAULT_SEEDS = {"train": 0, "test": 1}
SAMPLES_FILE = "samples.json"


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


class TraceWriter:
    """Appends finished sequences to a trace set, one atomic file and one atomic manifest update each."""

    def __init__(self, directory: Path, params: dict[str, Any], spec: ModelSpec) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST
        if path.exists():
            self.manifest = json.loads(path.read_text())
            if self.manifest.get("params") != params:
                raise TraceError(
                    f"{directory} already holds a trace set made with {self.manifest.get('params')}; "
                    f"refusing to mix it with {params} (choose another --out)"
                )
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

    def done(self) -> set[str]:
        return {record["file"] for record in self.manifest["sequences"]}

    def add(self, name: str, model: Any, ids: torch.Tensor, meta: dict[str, Any]) -> int:
        """Trace ``ids [T]`` through ``model`` and store it as ``name``; returns T."""
        logits, captured = capture_qkv(model, ids[None])
        loss, entropy = token_losses(logits, ids)
        tensors = {"tokens": ids, "loss": loss, "entropy": entropy}
        for layer in sorted(captured.k):
            tensors[f"q.{layer}"] = captured.q[layer]
            tensors[f"k.{layer}"] = captured.k[layer]
            tensors[f"v.{layer}"] = captured.v[layer]
        path = self.directory / name
        write_atomic(path, lambda tmp: save_file(tensors, tmp))
        self.manifest["sequences"].append(
            {"file": name, "length": int(ids.shape[0]), "bytes": path.stat().st_size,
             "sha256": sha256_of(path), "meta": meta}
        )
        write_json_atomic(self.directory / MANIFEST, self.manifest)
        return int(ids.shape[0])


def _load_samples(directory: Path, params: dict[str, Any], tokenizer: Any, model: Any) -> list[dict[str, Any]]:
    """Text samples of the set, made once and kept in samples.json (dialogue generation is the slow part)."""
    path = directory / SAMPLES_FILE
    if path.exists():
        return json.loads(path.read_text())
    samples = make_samples(
        params["source"],
        tokenizer,
        n=params["n"],
        split=params["split"],
        seed=params["seed"],
        target_tokens=params["length"],
        model=model,
    )
    records = [sample.to_dict() for sample in samples]
    write_json_atomic(path, records)
    return records


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
) -> TraceDataset:
    """Generate (or resume) a trace set of ``n`` sequences of ``length`` tokens at ``out``."""
    _check_arguments(source, split, n, length)
    directory = Path(out).expanduser()
    params = {
        "source": source,
        "split": split,
        "n": n,
        "length": length,
        "seed": DEFAULT_SEEDS[split] if seed is None else seed,
        "model": model_name,
    }
    model, tokenizer = load_model(model_name)
    writer = TraceWriter(directory, params, ModelSpec.from_config(model.config, model_name))
    samples = _load_samples(directory, params, tokenizer, model)
    done = writer.done()
    with progress_bar(total=len(samples), description=f"traces {source}/{split}", enabled=show_progress) as bar:
        bar.advance(len(done))
        for index, sample in enumerate(samples):
            name = f"seq_{index:05d}.safetensors"
            if name in done:
                continue
            started = time.perf_counter()
            ids, meta = _tokenize(tokenizer, sample, length)
            tokens = writer.add(name, model, ids, meta)
            bar.advance(1, status=f"{tokens / (time.perf_counter() - started):,.0f} tok/s")
    return TraceDataset(directory)
