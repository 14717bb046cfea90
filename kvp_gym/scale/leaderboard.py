"""The leaderboard's missing units on Ray actors: ranking (one trace x policy) and downstream (one
policy x trace x budget x placement). Workers compute; the driver writes each record, keyed as the
serial path keys it, so ``run_leaderboard``'s loops then only read them back: identical records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from kvp_gym.io import write_json_atomic
from kvp_gym.scale.runtime import crash_once, ray_session, run_unordered, worker_setup


def oracle_id() -> str:
    """The future oracle's record id (as run_leaderboard computes it)."""
    from kvp_gym.eval.leaderboard import scorer_identity
    from kvp_gym.eval.oracle import ORACLE, TraceOracle

    return f"{ORACLE}@{scorer_identity(TraceOracle(torch.zeros(1, 1, 1)))[:12]}".replace(" ", "_")


class LeaderboardWorker:
    """One Ray actor: the suite's trace sets, the policies and (on the first downstream unit) the model."""

    def __init__(self, suite: Any, trace_dirs: dict[str, str], names: list[str], checkpoints: list[str], registered: list[str]) -> None:
        from kvp_gym.eval.leaderboard import load_policies
        from kvp_gym.traces import TraceDataset

        worker_setup()
        self.suite = suite
        self.traces = {source: TraceDataset(path) for source, path in trace_dirs.items()}
        self.policies, _ = load_policies(names, checkpoints)
        self.registered = set(registered)
        self.rankers: dict[str, Any] = {}
        self.model = self.tokenizer = None
        self.importance: dict[tuple, torch.Tensor] = {}

    def fresh(self, name: str) -> Any:
        """A new registered scorer per unit (as the serial path), checkpoints as loaded."""
        from kvp_gym import scorers

        return scorers.get(name) if name in self.registered else self.policies[name]

    def run(self, job: tuple[tuple, tuple]) -> tuple[tuple, Any]:
        key, unit = job
        crash_once("leaderboard")
        if unit[0] == "ranking":
            return key, self._ranking(*unit[1:])
        return key, self._downstream(unit[1])

    def _ranking(self, name: str, source: str, trace: int) -> dict[str, Any]:
        from kvp_gym.eval.ranking import SuiteRanking

        if source not in self.rankers:
            self.rankers[source] = SuiteRanking(self.suite, source, self.traces[source])
        return self.rankers[source].evaluate(trace, {name: self.fresh(name)})[0]

    def _downstream(self, unit: tuple) -> dict[str, Any]:
        from kvp_gym.eval.leaderboard import _downstream
        from kvp_gym.eval.oracle import ORACLE, TraceOracle, trace_importance
        from kvp_gym.models import load_model

        if self.model is None:
            self.model, self.tokenizer = load_model(self.suite.model)

        def policy_of(name: str, source: str, trace_index: int, prefix: int) -> Any:
            if name != ORACLE:
                return self.fresh(name)
            key = (source, trace_index, prefix)
            if key not in self.importance:
                self.importance.clear()
                self.importance[key] = trace_importance(self.traces[source][trace_index], prefix, agg=self.suite.agg)
            return TraceOracle(self.importance[key])

        return _downstream(self.suite, self.model, self.tokenizer, self.traces, policy_of, unit)


def compute_missing_units(
    suite: Any, store: Any, traces: Mapping[str, Any], policies: Mapping[str, Any], ids: Mapping[str, str],
    registered: Iterable[str], checkpoints: Iterable[str | Path], downstream: bool, oracle: bool,
    workers: int | None, address: str | None, show_progress: bool = True,
) -> int:
    """Compute every unit ``store`` lacks on Ray workers and write its record (driver only); returns how many."""
    from kvp_gym.eval.leaderboard import downstream_units
    from kvp_gym.eval.oracle import ORACLE
    from kvp_gym.progress import progress_bar

    jobs = []
    for source, dataset in traces.items():
        for trace in range(min(len(dataset), suite.ranking_traces or len(dataset))):
            for name in policies:
                key = ("ranking", ids[name], source, trace)
                if not store.path(key).exists():
                    jobs.append((key, ("ranking", name, source, trace)))
    if downstream:
        all_ids = {**ids, ORACLE: oracle_id()}
        for unit in downstream_units(suite, traces, policies, oracle=oracle):
            key = (unit[0], all_ids.get(unit[1], unit[1]), *unit[2:])
            if not store.path(key).exists():
                jobs.append((key, ("downstream", unit)))
    if not jobs:
        return 0
    trace_dirs = {source: str(dataset.directory) for source, dataset in traces.items()}
    args = (suite, trace_dirs, [name for name in policies if name in set(registered)], [str(path) for path in checkpoints],
            sorted(registered))
    with progress_bar(len(jobs), "leaderboard: units on workers", enabled=show_progress) as bar:

        def record(result: tuple[tuple, Any]) -> None:
            key, value = result
            write_json_atomic(store.path(key), value)
            bar.advance(1, status=str(key[0]))

        with ray_session(workers, address) as count:
            run_unordered(LeaderboardWorker, args, count, jobs, "run", record)
    return len(jobs)
