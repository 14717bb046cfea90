"""One progress bar for every long job (traces, training, leaderboard).

On a terminal it is a live rich bar. Written to a log (stderr not a terminal, e.g. ``nohup ... > log``)
it prints one plain line every ``LOG_EVERY_S`` seconds and one at the end, so a long job shows its
progress in the log too.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY_S = 30.0


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, status=status)


class _LogBar:
    """Progress as a plain line on stderr at most every ``LOG_EVERY_S`` seconds: done/total, elapsed, left."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description, self.done = total, description, 0
        self.started = self.printed = time.monotonic()

    def advance(self, steps: int = 1, status: str = "") -> None:
        self.done += steps
        if time.monotonic() - self.printed >= LOG_EVERY_S:
            self.line(status)

    def line(self, status: str = "") -> None:
        self.printed = time.monotonic()
        elapsed = self.printed - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"{self.description}: {self.done}/{self.total} in {elapsed:.0f} s, about {left:.0f} s left {status}".rstrip(),
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[_Bar | _LogBar]:
    """A rich progress bar with a free-text status column (plain lines in a log); a no-op when ``enabled`` is False."""
    if not enabled:
        yield _Bar(None, None)
        return
    if not sys.stderr.isatty():
        bar = _LogBar(total, description)
        yield bar
        bar.line()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task)
