"""Ray sessions and unit scheduling for the scale-out paths (Ray is imported only when asked for)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

RAY_MISSING = (
    "--workers/--address need Ray, which is not installed: install the extra with "
    "`pip install -e '.[ray]'` (./setup.sh does), or drop --workers/--address to run serially"
)
# one torch / BLAS thread per worker: N workers on N CPUs, no oversubscription
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CRASH_DIR_ENV = "KVP_SCALE_CRASH_DIR"  # tests: a worker dies once per armed marker file (see crash_once)
RETRIES = 3  # a unit whose worker dies is retried (actor restart + task retry) this many times
WAIT_POLL_S = 5.0  # run_unordered calls on_wait this often while no unit finishes


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def wants_ray(workers: int | None, address: str | None) -> bool:
    """Whether the command asked for Ray; checks the arguments (one-line ValueErrors, before any slow work)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"--workers must be a non-negative integer (0 = serial), got {workers!r}")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ValueError(f"--address must name a Ray cluster (e.g. auto or ray://head:10001), got {address!r}")
    wanted = bool(workers) or address is not None
    if wanted and not ray_available():
        raise ValueError(RAY_MISSING)
    return wanted


@contextlib.contextmanager
def ray_session(workers: int | None, address: str | None = None) -> Iterator[int]:
    """Use the running Ray, join ``address``, or start a local Ray with ``workers`` CPUs; yields how many
    workers to use (``workers``, or every CPU of the cluster). A Ray this call started is shut down on exit."""
    import ray

    started = False
    if not ray.is_initialized():
        runtime_env = {"env_vars": dict(WORKER_ENV)}
        if address is not None:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        started = True
    try:
        yield workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def worker_setup() -> None:
    """What every worker does first: one torch thread (the worker is one CPU)."""
    import torch

    torch.set_num_threads(1)


def crash_once(kind: str) -> None:
    """Test hook: if ``$KVP_SCALE_CRASH_DIR/<kind>.arm`` exists, claim it and kill this worker process.

    The marker is claimed by an atomic rename, so exactly one unit dies once; Ray retries it."""
    directory = os.environ.get(CRASH_DIR_ENV)
    if not directory:
        return
    marker = Path(directory) / f"{kind}.arm"
    try:
        os.rename(marker, marker.with_suffix(".fired"))
    except FileNotFoundError:
        return
    os._exit(1)


def run_unordered(
    actor_class: type, actor_args: tuple, count: int, items: Iterable[Any], method: str, on_result: Callable[[Any], None],
    on_wait: Callable[[], None] | None = None,
) -> None:
    """Run ``actor.<method>(item)`` for every item on ``count`` actors of ``actor_class`` (each built once
    with ``actor_args``: e.g. a loaded model), calling ``on_result`` in the driver as each finishes, and
    ``on_wait`` every ``WAIT_POLL_S`` seconds while none does (and before each result: e.g. to show what the
    workers report of units in progress).

    A worker that dies is restarted and its unit retried (``RETRIES``); Ctrl-C or any error kills the
    actors (no unit is half-recorded: workers only write whole files atomically) and re-raises."""
    import ray
    from ray.util import ActorPool

    items = list(items)
    if not items:
        return
    remote = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(actor_class)
    actors = [remote.remote(*actor_args) for _ in range(min(count, len(items)))]
    try:
        pool = ActorPool(actors)
        for item in items:
            pool.submit(lambda actor, item: getattr(actor, method).remote(item), item)
        while pool.has_next():
            try:
                result = pool.get_next_unordered(timeout=WAIT_POLL_S if on_wait else None)
            except TimeoutError:
                on_wait()
                continue
            if on_wait:
                on_wait()
            on_result(result)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
