"""Trace generation on Ray actors: each loads the model once and writes whole sequence files
atomically into the trace set, or writes dialogue samples (the model answering every turn, the slow part
of a dialogue set) for the driver to keep; the driver alone updates the manifest and the samples (so
resuming works as serially)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvp_gym.scale.runtime import crash_once, ray_session, run_unordered, worker_setup


class TraceWorker:
    """One Ray actor: the model, loaded once; ``trace`` writes one sequence file and returns its record."""

    def __init__(self, model_name: str, directory: str) -> None:
        from kvp_gym.models import load_model

        worker_setup()
        self.model, _ = load_model(model_name)
        self.directory = Path(directory)

    def trace(self, job: tuple[str, torch.Tensor, dict[str, Any]]) -> dict[str, Any]:
        from kvp_gym.traces.generate import write_sequence

        name, ids, meta = job
        crash_once("trace")
        return write_sequence(self.directory, name, self.model, ids, meta)


class DialogueWorker:
    """One Ray actor: the model and tokenizer, loaded once; ``dialogues`` makes one group of dialogue samples."""

    def __init__(self, model_name: str, params: dict[str, Any]) -> None:
        from kvp_gym.models import load_model

        worker_setup()
        self.model, self.tokenizer = load_model(model_name)
        self.params = params

    def dialogues(self, indices: list[int]) -> list[tuple[int, dict[str, Any]]]:
        from kvp_gym.traces.generate import dialogue_records

        crash_once("dialogue")
        return list(zip(indices, dialogue_records(self.model, self.tokenizer, self.params, indices)))


def trace_on_workers(
    model_name: str, directory: Path, jobs: list[tuple[str, torch.Tensor, dict[str, Any]]],
    on_record: Callable[[dict[str, Any]], None], workers: int | None, address: str | None,
) -> None:
    """Trace ``jobs`` (name, ids [T], meta) on Ray actors; ``on_record`` gets each finished sequence's record."""
    with ray_session(workers, address) as count:
        run_unordered(TraceWorker, (model_name, str(directory)), count, jobs, "trace", on_record)


def dialogues_on_workers(
    model_name: str, params: dict[str, Any], groups: list[list[int]],
    on_samples: Callable[[list[tuple[int, dict[str, Any]]]], None], workers: int | None, address: str | None,
) -> None:
    """Make the dialogue samples of ``groups`` (lists of indices into a set with ``params``) on Ray actors;
    ``on_samples`` gets each group's [(index, sample record)] as it finishes."""
    with ray_session(workers, address) as count:
        run_unordered(DialogueWorker, (model_name, params), count, groups, "dialogues", on_samples)
