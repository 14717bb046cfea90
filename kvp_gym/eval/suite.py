"""Benchmark suites: the held-out data, budgets and seeds every policy is scored on, versioned.

A suite is frozen: changing any field means a new version, so numbers from different versions are
never mixed. Its test traces are generated once (test split: topics, names and seeds disjoint from
training) into $KVP_GYM_HOME/suites/<name>-v<version>/<source>.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvp_gym.data import SOURCES
from kvp_gym.paths import home_dir
from kvp_gym.ranking import DEFAULT_PROTECTED
from kvp_gym.traces import TraceDataset, generate_traces


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a leaderboard run evaluates. Budgets are absolute tokens kept per KV head."""

    name: str
    version: int
    model: str = "smollm2-135m"
    sources: tuple[str, ...] = SOURCES
    traces_per_source: int = 6
    length: int = 1024
    seed: int = 1
    prefix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    agg: str = "max"
    sink: int = DEFAULT_PROTECTED.sink
    recent: int = DEFAULT_PROTECTED.recent
    query_window: int = 64
    budgets: tuple[int, ...] = (64, 128, 256, 512)
    ppl_prefix: int = 768
    ppl_sources: tuple[str, ...] = ("dialogue", "prose")
    answer_tokens: int = 32

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "id": self.id}

    def directory(self) -> Path:
        return home_dir() / "suites" / self.id

    def traces(self, show_progress: bool = True) -> dict[str, TraceDataset]:
        """The suite's test trace sets by source, generated on first use and reused afterwards."""
        return {
            source: generate_traces(
                self.directory() / source,
                source,
                n=self.traces_per_source,
                length=self.length,
                split="test",
                model_name=self.model,
                seed=self.seed,
                show_progress=show_progress,
            )
            for source in self.sources
        }


SUITES: dict[str, Suite] = {
    "full": Suite(name="full", version=1),
    "demo": Suite(name="demo", version=1, traces_per_source=2, budgets=(64, 256), prefix_fractions=(0.5,)),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]
