"""Benchmark suites: the held-out data, budgets and seeds every policy is scored on, versioned.

A suite is frozen: changing any field means a new version, so numbers from different versions are
never mixed. Its test traces are generated once (test split: topics, names and seeds disjoint from
training) into $KVP_GYM_HOME/suites/<name>-v<version>/<source>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from kvp_gym.data import SOURCES
from kvp_gym.paths import home_dir
from kvp_gym.ranking import DEFAULT_PROTECTED
from kvp_gym.traces import TraceDataset, generate_traces


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a leaderboard run evaluates.

    Budgets: ``budgets`` are absolute tokens kept per KV head; ``budget_fractions`` are fractions of
    the compressed prefix (a unit's budget is ``int(f * prefix)`` tokens, at least the protected
    ones), reported as e.g. "25%". ``source_traces`` overrides ``traces_per_source`` per source;
    ``ruler_lengths`` adds RULER sets at other context lengths (sources ``ruler-<length>``);
    ``ranking_traces`` caps the traces per source the (costly) ranking grid runs on;
    ``min_task_accuracy`` calibrates RULER to the model: only tasks the full cache answers right at
    least that often are scored (every task's full-cache accuracy is reported); ``placements`` are the
    RULER question placements run ("outside": the question follows the compressed part; "inside": it is
    in it).
    """

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
    budget_fractions: tuple[float, ...] = ()
    source_traces: tuple[tuple[str, int], ...] = ()
    ruler_lengths: tuple[int, ...] = ()
    ranking_traces: int | None = None
    min_task_accuracy: float | None = None
    placements: tuple[str, ...] = ("outside", "inside")
    ruler_tasks: tuple[str, ...] | None = None
    policies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.placements or not set(self.placements) <= {"outside", "inside"}:
            raise ValueError(f"placements must be a non-empty subset of ('outside', 'inside'), got {self.placements}")

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "id": self.id}

    def hash(self) -> str:
        """sha256 (first 16 hex digits) of every field: two runs with one hash scored the same suite.

        Fields added after suites were published (``LATER_FIELDS``) count only when set away from their
        default, so the suites defined before them keep their hash."""
        fields = {key: value for key, value in self.to_dict().items()
                  if key not in LATER_FIELDS or value != LATER_FIELDS[key]}
        encoded = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(encoded.encode()).hexdigest()[:16]

    def budget_settings(self) -> list[int | str]:
        """Every budget a downstream unit runs at: the absolute ones (ints), then the fractions ("25%")."""
        return [*self.budgets, *(fraction_label(f) for f in self.budget_fractions)]

    def trace_count(self, source: str) -> int:
        return dict(self.source_traces).get(source, self.traces_per_source)

    def trace_sets(self) -> list[tuple[str, str, int, int]]:
        """(key, data source, traces, length) of every trace set; extra RULER lengths as ``ruler-<length>``."""
        sets = [(source, source, self.trace_count(source), self.length) for source in self.sources]
        if "ruler" in self.sources:
            sets += [(f"ruler-{length}", "ruler", self.trace_count(f"ruler-{length}"), length) for length in self.ruler_lengths]
        return sets

    def directory(self) -> Path:
        return home_dir() / "suites" / self.id

    def traces(self, show_progress: bool = True, workers: int | None = None, address: str | None = None,
               only: tuple[str, ...] | None = None) -> dict[str, TraceDataset]:
        """The suite's test trace sets by source (those keyed in ``only``, if given), generated on first use and
        reused afterwards (on ``workers`` Ray workers, or the cluster at ``address``, if given: the same files)."""
        keys = [key for key, *_ in self.trace_sets()]
        unknown = sorted(set(only or ()) - set(keys))
        if unknown:
            raise ValueError(f"suite {self.name!r} has no trace set {', '.join(map(repr, unknown))}; its sets: {', '.join(keys)}")
        return {
            key: generate_traces(
                self.directory() / key,
                source,
                n=n,
                length=length,
                split="test",
                model_name=self.model,
                seed=self.seed,
                show_progress=show_progress,
                tasks=self.ruler_tasks if source == "ruler" else None,
                workers=workers,
                address=address,
            )
            for key, source, n, length in self.trace_sets()
            if only is None or key in only
        }

    def validation_traces(self, source: str, n: int, seed: int, show_progress: bool = True) -> TraceDataset:
        """``n`` training-split texts of ``source`` at the suite's length, drawn with ``seed`` (one no recipe uses, to
        choose on before checking once on the test texts), made once under $KVP_GYM_HOME/validation/ and reused."""
        return generate_traces(home_dir() / "validation" / f"{source}-s{seed}-n{n}", source, n=n, length=self.length,
                               split="train", model_name=self.model, seed=seed, show_progress=show_progress)


# Fields added to Suite after suites were published, with their defaults (see Suite.hash).
LATER_FIELDS: dict[str, Any] = {"placements": ("outside", "inside"), "ruler_tasks": None, "policies": ()}


def fraction_label(fraction: float) -> str:
    """0.25 -> "25%" (the budget key of a fractional budget)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a budget fraction must lie in (0, 1), got {fraction}")
    return f"{fraction * 100:g}%"


def resolve_budget(setting: int | str, prefix: int, sink: int, recent: int) -> int:
    """Tokens kept per KV head for a budget setting: an int as is; "25%" -> int(0.25 * prefix), at least
    the protected tokens (sink + recent) and at most the prefix."""
    if isinstance(setting, str):
        tokens = int(float(setting.rstrip("%")) / 100 * prefix)
        return min(prefix, max(tokens, sink + recent, 1))
    return setting


def is_ruler(source: str) -> bool:
    """Whether a trace set key holds RULER samples ("ruler" or "ruler-<length>")."""
    return source == "ruler" or source.startswith("ruler-")


# The sources of the suites below, pinned: they were defined when SOURCES held exactly these three,
# and a suite's fields (hence its hash) must not change when a source is added to the data layer.
# The out-of-domain sources, "code" and "drama", are in none of them.
IN_DOMAIN_SOURCES: tuple[str, ...] = ("ruler", "dialogue", "prose")
FULL_V2_POLICIES: tuple[str, ...] = ("random", "streamingllm", "h2o", "h2o-norm", "snapkv", "tova", "expected-attention",
                                     "h2o-norm+tuned", "expected-attention+tuned", "kvp", "kvp+tuned", "oracle")

SUITES: dict[str, Suite] = {
    "full": Suite(name="full", version=1, sources=IN_DOMAIN_SOURCES),
    "demo": Suite(name="demo", version=1, sources=IN_DOMAIN_SOURCES, traces_per_source=2, budgets=(64, 256),
                  prefix_fractions=(0.5,)),
    # v2: 32 held-out texts per perplexity source and 128 RULER samples at two context lengths, budgets as
    # fractions of the prefix too, the question after the compressed part. RULER is calibrated to the model:
    # of the eight tasks, SmolLM2-135M's full cache answers only niah_single right at least 80% of the time
    # (48 training-split samples at 1024 tokens: niah_single 1.0, qa 0.67, niah_multivalue 0.61, niah_multiquery
    # 0.57, niah_multikey 0.29, cwe 0.03, vt 0.0), so the samples are niah_single (an answer of one number:
    # 12 tokens suffice). The policies: every heuristic at its strongest and the paper's plain H2O, the two strongest
    # with the split of the budget across heads tuned for them (``+tuned``, since round 29: a heuristic is compared at its
    # strongest), the shipped learned policy with and without its tuned split, random (the normalised score's floor) and
    # the future oracle (the downstream tables add its rows, with and without its own tuned split).
    "full-v2": Suite(
        name="full", version=2, sources=IN_DOMAIN_SOURCES, budgets=(128,), budget_fractions=(0.1, 0.25, 0.5),
        source_traces=(("dialogue", 32), ("prose", 32), ("ruler", 64), ("ruler-512", 64)), ruler_lengths=(512,),
        ranking_traces=4, min_task_accuracy=0.8, placements=("outside",), ruler_tasks=("niah_single",), answer_tokens=12,
        policies=FULL_V2_POLICIES,
    ),
    # the held-out domains, which no training recipe reads: Python source and Shakespeare's plays, 24 texts each,
    # perplexity at full-v2's budgets with its policies (does the learned policy's lead carry over?)
    "unseen": Suite(
        name="unseen", version=1, sources=("code", "drama"), budgets=(128,), budget_fractions=(0.1, 0.25, 0.5),
        ppl_sources=("code", "drama"), source_traces=(("code", 24), ("drama", 24)), ranking_traces=4,
        policies=FULL_V2_POLICIES,
    ),
    # long contexts: 4096-token held-out prose and Python source, the first 3072 tokens compressed once and the
    # last 1024 scored, at the budgets users run, with full-v2's policies (does a policy trained on 1k-token
    # contexts, or on longer ones, keep its lead when the context is four times longer?)
    "long": Suite(
        name="long", version=1, sources=("prose", "code"), length=4096, ppl_prefix=3072, budgets=(),
        budget_fractions=(0.1, 0.25), ppl_sources=("prose", "code"), source_traces=(("prose", 8), ("code", 8)),
        ranking_traces=2, policies=FULL_V2_POLICIES,
    ),
    # v1 of quick (kept to reproduce its numbers): 4 texts per perplexity source, 12 RULER samples, both placements
    "quick-v1": Suite(
        name="quick", version=1, sources=IN_DOMAIN_SOURCES, budgets=(), budget_fractions=(0.1, 0.25), prefix_fractions=(0.5,),
        source_traces=(("dialogue", 4), ("prose", 4), ("ruler", 12)), ranking_traces=2, min_task_accuracy=0.8,
    ),
    # small, for the demo and smoke checks. v2 (sized for the 15-minute demo on 2 cores): 2 texts per perplexity
    # source, 10/25% budgets, 4 RULER samples (one of each needle task: samples cycle through the tasks) with the
    # question after the compressed part only; one sample per task, so a task is scored when the full cache gets
    # at least half of it right (SmolLM2-135M: niah_single, niah_multivalue, niah_multiquery; not niah_multikey).
    "quick": Suite(
        name="quick", version=2, sources=IN_DOMAIN_SOURCES, budgets=(), budget_fractions=(0.1, 0.25), prefix_fractions=(0.5,),
        source_traces=(("dialogue", 2), ("prose", 2), ("ruler", 4)), ranking_traces=2, min_task_accuracy=0.5,
        placements=("outside",),
    ),
    # the learned-vs-heuristics question at the budgets users run (10/25% kept), sized for one CPU hour:
    # perplexity on prose and dialogue plus Python source code, a domain no training recipe uses, and RULER
    # with the question after the compressed part
    "headline": Suite(
        name="headline", version=1, sources=("prose", "dialogue", "code", "ruler"), budgets=(),
        budget_fractions=(0.1, 0.25), prefix_fractions=(0.5,), ppl_sources=("prose", "dialogue", "code"),
        source_traces=(("prose", 8), ("dialogue", 6), ("code", 6), ("ruler", 8)), ranking_traces=2,
        min_task_accuracy=0.8, placements=("outside",),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]
