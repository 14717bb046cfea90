"""`kvp-gym leaderboard`: every policy on one held-out suite, ranking and downstream quality.

Work is split into small units (the ranking grid of one trace; one policy x trace x budget x
question placement downstream); each unit's result is written atomically to ``out/records`` as it
finishes, so an interrupted run resumes where it stopped and a rerun reuses what is done. Every
number is deterministic (seeded random scorer, greedy decoding): rerunning a suite reproduces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvp_gym import scorers
from kvp_gym.eval.downstream import (compressed_length, continuation_nll, record_prefill, recording_window, ruler_answers,
                                     ruler_prompt)
from kvp_gym.eval.ranking import SuiteRanking
from kvp_gym.eval.oracle import ORACLE, ORACLES, TraceOracle, oracle_rows, oracle_shares, trace_importance
from kvp_gym.eval.suite import Suite, is_ruler, resolve_budget
from kvp_gym.progress import progress_bar
from kvp_gym.scorers import Scorer, is_future_only
from kvp_gym.traces import TraceDataset
from kvp_gym.io import remove_temp_files, write_json_atomic

FULL_CACHE = "full cache"


def default_policies() -> list[str]:
    """Every registered scorer that is a ready policy (not a trainable architecture; future-only ones included)."""
    return [name for name in scorers.available() if not scorers.is_trainable(name)]


def scorer_identity(scorer: Any) -> str:
    """What a registered scorer's records are keyed by: sha256 of its class's source, its config and its weights.

    Re-registering a name with other code or another config gives other records, never the old numbers.
    """
    cls = type(scorer)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined where no source file can be read (e.g. an interactive session)
        source = f"{cls.__module__}.{cls.__qualname__} (no source)"
    fields = vars(scorer) if hasattr(scorer, "__dict__") else {}
    if dataclasses.is_dataclass(scorer):
        fields = {field.name: getattr(scorer, field.name) for field in dataclasses.fields(scorer)}
    config = {key: value for key, value in fields.items() if not key.startswith("_") and _is_plain(value)}
    digest = hashlib.sha256(json.dumps({"source": source, "config": config}, sort_keys=True).encode())
    shares = getattr(scorer, "head_shares", None)
    if shares is not None:  # how the cache splits the budget across heads: other shares, other records
        digest.update(shares.shares.contiguous().numpy().tobytes() + shares.fractions.contiguous().numpy().tobytes())
        if shares.scope != "layer":  # layer-scope ids stay those of the records made before scopes existed
            digest.update(shares.scope.encode())
    if isinstance(scorer, torch.nn.Module):  # a registered policy with weights (e.g. the shipped kvp): new weights, new records
        for name, tensor in sorted(scorer.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_plain(value: Any) -> bool:
    """A JSON value (the config part of an identity; generators, tensors and modules are state, not config)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    return False


def checkpoint_name(path: str | Path) -> str:
    """The leaderboard name of a checkpoint: its run directory's name (or the file's stem)."""
    from kvp_gym.checkpoint import FILE_NAME, checkpoint_file

    file = checkpoint_file(path)
    return file.parent.name if file.name == FILE_NAME else file.stem


def load_policies(
    names: Iterable[str], checkpoints: Iterable[str | Path], expect_spec: Any = None
) -> tuple[dict[str, Scorer], dict[str, str]]:
    """Registered scorers by name, plus trained checkpoints named after their run directory (or file).

    Every policy gets one name: a checkpoint whose name is taken (by another checkpoint or a
    registered scorer) is refused with a ValueError naming both. Also returns each policy's record
    id, ``name@hash``: for a registered scorer the hash of its class's source and config
    (``scorer_identity``), for a checkpoint the file's sha256; so records are never reused for other code,
    another config or a retrained checkpoint. Unknown names (KeyError) and bad checkpoints (ValueError,
    CheckpointError) fail before any work is done.
    """
    from kvp_gym.checkpoint import checkpoint_file, load_scorer
    from kvp_gym.traces.dataset import sha256_of

    policies: dict[str, Scorer] = {}
    ids: dict[str, str] = {}
    for name in names:
        if name in policies:
            raise ValueError(f"--policies names {name!r} twice")
        policies[name] = scorers.get(name)  # KeyError naming the known scorers
        ids[name] = f"{name}@{scorer_identity(policies[name])[:12]}"
    origin = {name: "the registered scorer" for name in policies}
    for path in checkpoints:
        file = checkpoint_file(path)
        name = checkpoint_name(path)
        if name in policies:
            raise ValueError(
                f"--checkpoint {path} would be named {name!r} on the leaderboard, like {origin[name]} {name!r}; "
                f"every policy needs its own name: rename its run directory (or file)"
            )
        policies[name] = load_scorer(path, expect_spec=expect_spec)
        origin[name] = f"--checkpoint {path}"
        ids[name] = f"{name}@{sha256_of(file)[:12]}"
    return policies, ids


class RecordStore:
    """One JSON file per finished unit of work under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: tuple) -> Path:
        name = "__".join(str(part).replace("/", "_").replace(" ", "_") for part in key)
        return self.directory / f"{name}.json"

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        path = self.path(key)
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        write_json_atomic(path, value)
        return value

    def get_or_compute_missing(self, keys: list[tuple], compute: Callable[[list[int]], list[Any]]) -> list[Any]:
        """The records of ``keys``: the missing ones are computed at once (``compute(indices)`` returns the
        records of those indices into ``keys``, in order) and written; the others are read as stored."""
        stored = [json.loads(self.path(key).read_text()) if self.path(key).exists() else None for key in keys]
        missing = [index for index, record in enumerate(stored) if record is None]
        if missing:
            computed = compute(missing)
            self.write_missing((keys[index], record) for index, record in zip(missing, computed))
            for index, record in zip(missing, computed):
                stored[index] = record
        return stored

    def write_missing(self, records: Iterable[tuple[tuple, Any]]) -> None:
        for key, value in records:
            if not self.path(key).exists():
                write_json_atomic(self.path(key), value)


def downstream_units(
    suite: Suite, traces: Mapping[str, TraceDataset], policies: Mapping[str, Scorer], oracles: Sequence[str] = ()
) -> list[tuple]:
    """Every (kind, policy, source, trace, budget, placement) downstream evaluation of the suite (RULER: at
    each of the suite's question placements).

    ``budget`` is a suite budget setting (tokens, or a fraction label like "25%"; None = full cache).
    Future-only policies have none: they cannot run in a real cache. ``oracles`` adds the future
    oracle's units of those rows (``oracle_rows``: the trace's own future attention, an upper bound, with equal
    budgets and, where shares are tuned for it on the traces' model, with those). Units come grouped by
    prompt (kind, source, trace, placement), the full cache first, so that a ``DownstreamRunner`` prefills
    each prompt once.
    """
    real_cache = [name for name, scorer in policies.items() if not is_future_only(scorer)]
    real_cache += oracles
    settings = [(FULL_CACHE, None)] + [(name, budget) for name in real_cache for budget in suite.budget_settings()]
    prompts = [("ppl", source, trace, "-") for source in suite.ppl_sources for trace in range(len(traces.get(source, [])))]
    prompts += [("ruler", source, trace, placement) for source in traces if is_ruler(source)
                for trace in range(len(traces[source])) for placement in suite.placements]
    return [(kind, policy, source, trace, budget, placement)
            for kind, source, trace, placement in prompts for policy, budget in settings]


def run_leaderboard(
    suite: Suite,
    out: str | Path,
    policy_names: Iterable[str] | None = None,
    checkpoints: Iterable[str | Path] = (),
    downstream: bool = True,
    show_progress: bool = True,
    oracle: bool = True,
    workers: int | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Evaluate every policy on the suite; returns (and keeps under ``out/records``) every number.

    ``oracle``: also run the future oracle downstream (``oracle_rows``, built per unit from the test trace's
    own future attention: upper bound rows next to the full cache). ``workers`` / ``address``: compute
    the missing units on Ray workers first (kvp_gym.scale; a local Ray with ``workers`` CPUs, or the
    cluster at ``address``); the records are the serial run's."""
    from kvp_gym.scale import ray_session, wants_ray

    distributed = wants_ray(workers, address)  # bad --workers / no Ray fails before any work
    from kvp_gym.checkpoint import read_header

    out = Path(out).expanduser()
    checkpoints = list(checkpoints)
    policy_names = list(policy_names or suite.policies or default_policies())
    policies, ids = load_policies(policy_names, checkpoints)  # bad input fails before any work
    registered = set(policy_names)

    def fresh(name: str) -> Scorer:
        """A new instance of a registered scorer for every unit of work, so that a scorer with state (the
        random scorer's generator) gives each unit the same numbers whatever ran before it: resumed and
        uninterrupted runs agree. Checkpoints are stateless modules, loaded once."""
        return scorers.get(name) if name in registered else policies[name]

    with ray_session(workers, address) if distributed else contextlib.nullcontext():  # one Ray for traces and units
        traces = suite.traces(show_progress=show_progress, workers=workers, address=address)
        spec = next(iter(traces.values())).spec
        oracles = oracle_rows(spec) if downstream and oracle else []
        for path in checkpoints:
            spec.check_compatible(read_header(path).model_spec, f"--checkpoint {path}")
        store = RecordStore(out / "records" / suite.id)
        remove_temp_files(store.directory)
        remove_temp_files(out)
        if distributed:  # the workers compute the missing units, the driver writes them; the loops below read them
            from kvp_gym.scale.leaderboard import compute_missing_units

            compute_missing_units(suite, store, traces, policies, ids, registered, checkpoints, downstream, oracles,
                                  workers, address, show_progress)

    ranking = []
    total = sum(min(len(dataset), suite.ranking_traces or len(dataset)) for dataset in traces.values())
    with progress_bar(total, "leaderboard: ranking", enabled=show_progress) as bar:
        for source, dataset in traces.items():
            evaluator = SuiteRanking(suite, source, dataset)
            for trace in range(min(len(dataset), suite.ranking_traces or len(dataset))):
                names = list(policies)
                ranking += store.get_or_compute_missing(  # one call per trace: the grid's importance is built once
                    [("ranking", ids[name], source, trace) for name in names],
                    lambda missing: evaluator.evaluate(trace, {names[i]: fresh(names[i]) for i in missing}),
                )
                bar.advance(1)

    results: list[dict[str, Any]] = []
    if downstream:
        units = downstream_units(suite, traces, policies, oracles)
        ids.update(oracle_ids(spec))
        runner = DownstreamRunner(suite, traces, fresh, recording_window(policies.values()))
        with progress_bar(len(units), "leaderboard: downstream", enabled=show_progress) as bar:
            for batch in unit_batches(units):
                keys = [(unit[0], ids.get(unit[1], unit[1]), *unit[2:]) for unit in batch]
                results += store.get_or_compute_missing(keys, lambda missing: runner([batch[i] for i in missing]))
                bar.advance(len(batch), status=f"{batch[0][0]} {batch[0][1]}{' ...' if len(batch) > 1 else ''} b={batch[0][4]}")
    future_only = sorted({*(name for name, scorer in policies.items() if is_future_only(scorer)), *oracles})
    learned = sorted(name for name in policies if name not in registered or _is_trainable(name) or _has_weights(policies[name]))
    return {"suite": {**suite.to_dict(), "hash": suite.hash()}, "policies": sorted(policies), "future_only": future_only,
            "learned": learned,
            "ranking": ranking, "downstream": results, "downstream_oracle": ORACLE if oracles else None,
            "downstream_oracles": oracles}


def _has_weights(scorer: Any) -> bool:
    """A registered scorer with trained weights (e.g. a shipped policy) is learned, not a heuristic."""
    return isinstance(scorer, torch.nn.Module) and any(True for _ in scorer.parameters())


def _is_trainable(name: str) -> bool:
    try:
        return scorers.is_trainable(name)
    except KeyError:
        return False


def oracle_ids(spec: Any) -> dict[str, str]:
    """The record id of every downstream oracle row for traces of ``spec``'s model (``oracle_rows``)."""
    return {row: f"{row}@{scorer_identity(TraceOracle(torch.zeros(1, 1, 1), oracle_shares(row)))[:12]}".replace(" ", "_")
            for row in oracle_rows(spec)}


def compressed_prefix(suite: Suite, kind: str, trace: Any, placement: str) -> int:
    """How many tokens a downstream unit prefills and compresses (a fractional budget is a share of it)."""
    return suite.ppl_prefix if kind == "ppl" else compressed_length(trace, placement)


def unit_batches(units: list[tuple]) -> list[list[tuple]]:
    """The units a ``DownstreamRunner`` computes together: every RULER unit of one prompt (the full cache and
    every policy at every budget; they decode in batches of similar length, ``ruler_answers``), every perplexity unit alone. Serial
    and Ray runs compute the missing units of a batch together, so from the same records they write the same
    records; a resumed or extended run (a new policy) computes only the missing ones."""
    batches: dict[tuple, list[tuple]] = {}
    for unit in units:
        kind, _, source, trace, _, placement = unit
        batches.setdefault((kind, source, trace, placement) if kind == "ruler" else unit, []).append(unit)
    return list(batches.values())


class DownstreamRunner:
    """Computes batches of downstream units (``unit_batches``) with the real model and cache.

    Consecutive units of one (trace, placement) share their work: the prompt's prefill runs once into a
    recording cache that the full cache and every policy and budget fork (``EvictingCache.fork``: the same
    evictions, the same numbers as a prefill per unit), and the future oracle's importance is computed once. Only the
    latest trace's are kept, so units should come grouped by trace, as ``downstream_units`` orders them.
    The compressed caches of a RULER batch are stacked and answer as one batch of rows. The model loads
    on the first unit.
    """

    def __init__(self, suite: Suite, traces: Mapping[str, TraceDataset], scorer_of: Callable[[str], Scorer],
                 query_window: int) -> None:
        self.suite, self.traces, self.scorer_of, self.query_window = suite, traces, scorer_of, query_window
        self.model = self.tokenizer = None
        self.shared: dict[tuple, Any] = {}  # (what, source, trace, prefix) -> importance or recording, latest trace only

    def __call__(self, batch: list[tuple]) -> list[dict[str, Any]]:
        """The records of a batch of units, in its order."""
        from kvp_gym.models import load_model

        if self.model is None:
            self.model, self.tokenizer = load_model(self.suite.model)
        suite = self.suite
        kind, _, source, trace_index, _, placement = batch[0]
        trace = self.traces[source][trace_index]
        prefix = compressed_prefix(suite, kind, trace, placement)
        records, rows = [], []
        for _, policy, _, _, budget, _ in batch:
            tokens = None if budget is None else resolve_budget(budget, prefix, suite.sink, suite.recent)
            records.append({"kind": kind, "policy": policy, "source": source, "trace": trace_index, "budget": budget,
                            "placement": placement, "budget_tokens": tokens})
            scorer = (None if policy == FULL_CACHE else self._oracle(source, trace_index, prefix, policy)
                      if policy in ORACLES else self.scorer_of(policy))
            rows.append((scorer, tokens))
        prompt = trace.tokens[None, :prefix] if kind == "ppl" else ruler_prompt(self.tokenizer, trace)[:, :prefix]
        prefill = self._shared(("prefill", source, trace_index, prefix),
                               lambda: record_prefill(self.model, prompt, self.query_window))
        if kind == "ppl":  # a batch of one (unit_batches)
            (scorer, tokens), = rows
            nll, count = continuation_nll(self.model, trace, prefix, scorer, tokens, suite.sink, suite.recent, prefill)
            return [{**records[0], "nll_sum": nll, "tokens": count}]
        answers = ruler_answers(self.model, self.tokenizer, trace, placement, rows, suite.sink, suite.recent,
                                suite.answer_tokens, prefill)
        return [{**record, "task": trace.meta.get("task"), "answer": answer, "score": score}
                for record, (answer, score) in zip(records, answers)]

    def _oracle(self, source: str, trace_index: int, prefix: int, row: str) -> Scorer:
        importance = self._shared(("oracle", source, trace_index, prefix),
                                  lambda: trace_importance(self.traces[source][trace_index], prefix, agg=self.suite.agg))
        return TraceOracle(importance, oracle_shares(row))

    def _shared(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self.shared:
            if any(other[1:3] != key[1:3] for other in self.shared):
                self.shared.clear()
            self.shared[key] = compute()
        return self.shared[key]
