"""Importance stores on Ray actors: each opens the trace set once and writes whole store files atomically
(one per trace, the serial path's bytes); the driver only counts them (``ImportanceStore.build(workers=N)``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvp_gym.scale.runtime import crash_once, ray_session, run_unordered, worker_setup


class StoreWorker:
    """One Ray actor: the trace set, opened once; ``statistics`` writes one trace's store file."""

    def __init__(self, traces_dir: str, store_dir: str, window: int) -> None:
        from kvp_gym.traces import TraceDataset

        worker_setup()
        self.traces, self.store_dir, self.window = TraceDataset(traces_dir), Path(store_dir), window

    def statistics(self, job: tuple[int, tuple[int, ...]]) -> int:
        from kvp_gym.utility.store import write_statistics

        index, prefixes = job
        crash_once("store")
        write_statistics(self.store_dir, self.traces[index], prefixes, self.window)
        return index


def statistics_on_workers(traces_dir: Path, store_dir: Path, window: int, jobs: list[tuple[int, tuple[int, ...]]],
                          on_done: Callable[[int], None], workers: int | None, address: str | None = None) -> None:
    """Write the store files of ``jobs`` (trace index, its prefixes) on Ray actors; ``on_done`` gets each
    finished trace index."""
    with ray_session(workers, address) as count:
        run_unordered(StoreWorker, (str(traces_dir), str(store_dir), window), count, jobs, "statistics", on_done)
