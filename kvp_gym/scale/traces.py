"""Trace generation on Ray actors: each loads the model once and writes whole sequence files
atomically into the trace set, or writes dialogue samples (the model answering every turn, the slow part
of a dialogue set) for the driver to keep; the driver alone updates the manifest and the samples (so
resuming works as serially)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvp_gym.scale.runtime import crash_once, ray_session, run_unordered, worker_setup

PROGRESS_EVERY_S = 10.0


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
    """One Ray actor: the model and tokenizer, loaded once; ``dialogues`` makes one group of dialogue samples,
    putting (first index, tokens written) into ``progress`` (a Ray queue) every ``PROGRESS_EVERY_S`` seconds
    and at the end, if given."""

    def __init__(self, model_name: str, params: dict[str, Any], progress: Any = None) -> None:
        from kvp_gym.models import load_model

        worker_setup()
        self.model, self.tokenizer = load_model(model_name)
        self.params, self.progress = params, progress

    def dialogues(self, indices: list[int]) -> list[tuple[int, dict[str, Any]]]:
        from kvp_gym.traces.generate import dialogue_records

        crash_once("dialogue")
        unsent, sent_at = 0, time.monotonic()

        def wrote(tokens: int) -> None:
            nonlocal unsent, sent_at
            unsent += tokens
            if time.monotonic() - sent_at >= PROGRESS_EVERY_S:
                self.progress.put((indices[0], unsent))
                unsent, sent_at = 0, time.monotonic()

        records = dialogue_records(self.model, self.tokenizer, self.params, indices, wrote if self.progress is not None else None)
        if self.progress is not None and unsent:
            self.progress.put((indices[0], unsent))
        return list(zip(indices, records))


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
    on_tokens: Callable[[int, int], None] | None = None,
) -> None:
    """Make the dialogue samples of ``groups`` (lists of indices into a set with ``params``) on Ray actors;
    ``on_samples`` gets each group's [(index, sample record)] as it finishes, ``on_tokens`` (first index of a
    group, tokens) what the workers report of the groups they are writing (batched sets), before their samples."""
    with ray_session(workers, address) as count:
        if on_tokens is None:
            run_unordered(DialogueWorker, (model_name, params), count, groups, "dialogues", on_samples)
            return
        from ray.util.queue import Queue

        progress = Queue(actor_options={"num_cpus": 0})

        def show_progress() -> None:
            for first, tokens in progress.get_nowait_batch(progress.qsize()):
                on_tokens(first, tokens)

        run_unordered(DialogueWorker, (model_name, params, progress), count, groups, "dialogues", on_samples,
                      on_wait=show_progress)
