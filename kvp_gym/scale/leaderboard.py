"""The leaderboard's missing units on Ray actors: ranking (one trace's missing policies) and downstream (the
batches of one prompt that miss records, sharing its prefill; see ``unit_batches``). Workers compute;
the driver writes each record, keyed as the serial path keys it, so ``run_leaderboard``'s loops then
only read them back: identical records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvp_gym.scale.runtime import crash_once, ray_session, run_unordered, worker_setup


class LeaderboardWorker:
    """One Ray actor: the suite's trace sets, the policies and a ``DownstreamRunner`` (it loads the model on
    the first downstream unit)."""

    def __init__(self, suite: Any, trace_dirs: dict[str, str], names: list[str], checkpoints: list[str], registered: list[str]) -> None:
        from kvp_gym.eval.downstream import recording_window
        from kvp_gym.eval.leaderboard import DownstreamRunner, load_policies
        from kvp_gym.traces import TraceDataset

        worker_setup()
        self.suite = suite
        self.traces = {source: TraceDataset(path) for source, path in trace_dirs.items()}
        self.policies, _ = load_policies(names, checkpoints)
        self.registered = set(registered)
        self.rankers: dict[str, Any] = {}
        self.downstream = DownstreamRunner(suite, self.traces, self.fresh, recording_window(self.policies.values()))

    def fresh(self, name: str) -> Any:
        """A new registered scorer per unit (as the serial path), checkpoints as loaded."""
        from kvp_gym import scorers

        return scorers.get(name) if name in self.registered else self.policies[name]

    def run(self, job: tuple[str, list]) -> list[tuple[tuple, Any]]:
        """One trace's missing ranking units [(key, unit)], or the missing units of one prompt's batches
        [[(key, unit)]] (they share its prefill): [(record key, record)]."""
        kind, work = job
        crash_once("leaderboard")
        if kind == "ranking":
            return self._ranking(work)
        return [pair for batch in work for pair in zip([key for key, _ in batch], self.downstream([unit for _, unit in batch]))]

    def _ranking(self, work: list[tuple[tuple, tuple[str, str, int]]]) -> list[tuple[tuple, Any]]:
        """The ranking records of one trace's missing policies [(key, (name, source, trace))], in one grid pass."""
        from kvp_gym.eval.ranking import SuiteRanking

        _, source, trace = work[0][1]
        if source not in self.rankers:
            self.rankers[source] = SuiteRanking(self.suite, source, self.traces[source])
        records = self.rankers[source].evaluate(trace, {name: self.fresh(name) for _, (name, _, _) in work})
        return [(key, record) for (key, _), record in zip(work, records)]


def compute_missing_units(
    suite: Any, store: Any, traces: Mapping[str, Any], policies: Mapping[str, Any], ids: Mapping[str, str],
    registered: Iterable[str], checkpoints: Iterable[str | Path], downstream: bool, oracles: Sequence[str],
    workers: int | None, address: str | None, show_progress: bool = True,
) -> int:
    """Compute every unit ``store`` lacks on Ray workers and write its record (driver only); returns how many."""
    from kvp_gym.eval.leaderboard import downstream_units, oracle_ids, unit_batches
    from kvp_gym.progress import progress_bar

    jobs = []
    for source, dataset in traces.items():
        for trace in range(min(len(dataset), suite.ranking_traces or len(dataset))):
            keys = [(("ranking", ids[name], source, trace), (name, source, trace)) for name in policies]
            missing = [(key, unit) for key, unit in keys if not store.path(key).exists()]
            if missing:  # one job per trace: its grid's importance is built once for all its policies
                jobs.append(("ranking", missing))
    if downstream:
        all_ids = {**ids, **oracle_ids(next(iter(traces.values())).spec)}
        by_prompt: dict[tuple, list] = {}
        for batch in unit_batches(downstream_units(suite, traces, policies, oracles)):
            keys = [(unit[0], all_ids.get(unit[1], unit[1]), *unit[2:]) for unit in batch]
            missing = [(key, unit) for key, unit in zip(keys, batch) if not store.path(key).exists()]
            if missing:
                by_prompt.setdefault((batch[0][0], *batch[0][2:4], batch[0][5]), []).append(missing)
        jobs += [("downstream", batches) for batches in by_prompt.values()]
    if not jobs:
        return 0
    trace_dirs = {source: str(dataset.directory) for source, dataset in traces.items()}
    args = (suite, trace_dirs, [name for name in policies if name in set(registered)], [str(path) for path in checkpoints],
            sorted(registered))
    units = sum(len(work) if kind == "ranking" else sum(len(batch) for batch in work) for kind, work in jobs)
    with progress_bar(units, "leaderboard: units on workers", enabled=show_progress) as bar:

        def record(results: list[tuple[tuple, Any]]) -> None:
            store.write_missing(results)
            bar.advance(len(results), status=str(results[0][0][0]))

        with ray_session(workers, address) as count:
            run_unordered(LeaderboardWorker, args, count, jobs, "run", record)
    return units
