"""Turn leaderboard results into LEADERBOARD.md, results.json / results.csv and PNG plots."""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvp_gym import scorers
from kvp_gym.eval.downstream import QUESTION_PLACEMENTS, perplexity
from kvp_gym.eval.leaderboard import FULL_CACHE
from kvp_gym.eval.oracle import ORACLE, ORACLE_TUNED, ORACLES
from kvp_gym.eval.suite import fraction_label
from kvp_gym.eval.ranking import CURVE_FRACTIONS
from kvp_gym.eval.stats import (
    Interval,
    bootstrap_ci,
    bootstrap_means,
    env_downstream_tau,
    iqm,
    normalized_score,
    percentile_interval,
    probability_of_improvement,
    worse_of,
)
from kvp_gym.io import package_versions, write_atomic, write_json_atomic

FLOOR_POLICIES = ("random", "streamingllm")  # the normalised score's 0: the worse of the two


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def ranking_twins(results: dict[str, Any]) -> dict[str, str]:
    """{policy: its base policy} for the policies that split a ranking also in the results across heads (``kvp+tuned``
    when ``kvp`` ran): the env ranks within each head, so their ranking records are their base's."""
    ranked = {record["policy"] for record in results["ranking"]}
    return {policy: base for policy in ranked if (base := scorers.split_base(policy)) in ranked}


def ranking_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per policy (``ranking_twins`` left out): mean (and std) cost ratio overall and per source, kept fractions
    (each mean with its 95% interval over texts: ``<key>_low``, ``<key>_high``), heads won."""
    by_policy: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    twins = ranking_twins(results)
    for record in results["ranking"]:
        if record["policy"] in twins:
            continue
        rows = by_policy[record["policy"]]
        rows["all"] += record["cost_ratio"]
        rows[record["source"]] += record["cost_ratio"]
        for p in (10, 25, 50):
            rows[f"kept_{p}"] += record[f"kept_fraction_{p}"]
    wins = heads_won(results, twins)
    table = []
    for policy, rows in by_policy.items():
        row = {"policy": policy, "cost_ratio": float(np.mean(rows["all"])), "cost_ratio_std": float(np.std(rows["all"]))}
        units = ranking_units(results, policy)
        for source in results["suite"]["sources"]:
            row[f"cost_ratio_{source}"] = float(np.mean(rows[source])) if rows[source] else math.nan
            mine = [value for (where, _), value in units.items() if where == source]
            interval = bootstrap_ci(mine) if mine else Interval(math.nan, math.nan, math.nan)
            row[f"cost_ratio_{source}_low"], row[f"cost_ratio_{source}_high"] = interval.low, interval.high
        for p in (10, 25, 50):
            row[f"kept_{p}"] = float(np.mean(rows[f"kept_{p}"]))
            kept = ranking_units(results, policy, f"kept_fraction_{p}")
            interval = bootstrap_ci(list(kept.values()), strata=[source for source, _ in kept])
            row[f"kept_{p}_low"], row[f"kept_{p}_high"] = interval.low, interval.high
        row["heads_won"] = wins.get(policy, 0)
        row["upper_bound"] = policy in results["future_only"]
        interval = bootstrap_ci(list(units.values()), strata=[source for source, _ in units])
        row["cost_ratio_low"], row["cost_ratio_high"] = interval.low, interval.high
        table.append(row)
    table.sort(key=lambda row: row["cost_ratio"])
    means = {row["policy"]: row["cost_ratio"] for row in table}
    oracle = min((means[p] for p in results["future_only"] if p in means), default=1.0)
    floor = worse_of(means.get(p, math.nan) for p in FLOOR_POLICIES)
    drawn = {policy: paired_draws({u: (v, 1.0) for u, v in ranking_units(results, policy).items()}) for policy in means}
    floors = [drawn[p] for p in FLOOR_POLICIES if p in drawn]
    for row, following in zip(table, table[1:] + [None]):
        row["normalized"] = normalized_score(row["cost_ratio"], oracle, floor)
        units, _, samples = drawn[row["policy"]]
        interval = Interval(row["normalized"], math.nan, math.nan)
        if floors and all(other[0] == units for other in floors):  # the same texts: paired draws
            interval = percentile_interval(row["normalized"], normalized_samples(samples, [f[2] for f in floors], oracle))
        row["normalized_low"], row["normalized_high"] = interval.low, interval.high
        row["p_beats_next"] = math.nan if following is None else paired_probability(
            ranking_units(results, row["policy"]), ranking_units(results, following["policy"]))
    return table


def paired_draws(units: dict[Any, tuple[float, float]]) -> tuple[list, float, np.ndarray]:
    """(the units in one order, the weighted mean of their (value, weight) pairs, its bootstrap means [R]),
    units (source, trace) resampled within each source. The same units draw the same resamples, so the
    draws of two policies on the same texts are paired, and a score of several means can be resampled."""
    order = sorted(units, key=str)
    estimate, means = bootstrap_means([units[u][0] for u in order], strata=[u[0] for u in order],
                                      weights=[units[u][1] for u in order])
    return order, estimate, means


def normalized_samples(values: np.ndarray, floors: list[np.ndarray], reference: np.ndarray,
                       lower_is_better: bool = True) -> np.ndarray:
    """``normalized_score`` per resample of paired draws: values, each floor and reference [R] -> [R]; the
    floor is the worse of ``floors`` in each resample; NaN where floor == reference."""
    stacked = np.stack(floors)
    floor = stacked.max(0) if lower_is_better else stacked.min(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(floor == reference, np.nan, (floor - values) / (floor - reference))


def ranking_units(results: dict[str, Any], policy: str, field: str = "cost_ratio") -> dict[tuple[str, Any], float]:
    """{(source, trace): mean ``field`` (cost ratio, kept fraction) over that trace's episodes} of one policy:
    the bootstrap's units (episodes of one text are not independent; texts are), stratified by source."""
    units = {}
    for index, record in enumerate(r for r in results["ranking"] if r["policy"] == policy):
        units[record["source"], record.get("trace", index)] = float(np.mean(record[field]))
    return units


def paired_probability(a: dict, b: dict, lower_is_better: bool = True, weights: dict | None = None) -> float:
    """P(a beats b) by bootstrap over the units both have, paired by unit and stratified by source."""
    shared = sorted(set(a) & set(b), key=str)
    if not shared:
        return math.nan
    return probability_of_improvement([a[u] for u in shared], [b[u] for u in shared], lower_is_better,
                                      strata=[u[0] for u in shared],
                                      weights=None if weights is None else [weights[u] for u in shared])


def downstream_oracles(results: dict[str, Any]) -> list[str]:
    """The downstream oracle rows a run has (``ORACLES``): results of older runs name one, ``downstream_oracle``."""
    if "downstream_oracles" in results:
        return list(results["downstream_oracles"])
    return [results["downstream_oracle"]] if results.get("downstream_oracle") else []


def reference_oracle(value: dict[str, float], lower_is_better: bool) -> str | None:
    """The upper bound of one cell: the better of the oracle rows in ``value`` (policy -> estimate), None if none ran."""
    rows = [row for row in ORACLES if row in value]
    return (min if lower_is_better else max)(rows, key=value.__getitem__) if rows else None


def downstream_statistics(results: dict[str, Any]) -> dict[str, Any]:
    """Intervals, P(beats the next policy) and normalised scores of the downstream numbers.

    Units are texts (source, trace), stratified by source. Perplexity: the interval of exp(mean NLL
    per token), tokens as weights (so the estimate is the pooled perplexity); normalised between the
    worse of random and StreamingLLM (0) and the downstream future oracle at that budget (1: the better of its
    rows, ``ORACLES``; the full cache where no oracle ran). Accuracy: the interval of the mean score; normalised the
    same way.
    Returns {"perplexity": {policy: {budget: {...}}}, "accuracy": {placement: {policy: {budget: {...}}}}}
    where each cell holds estimate, low, high, normalized with its interval (normalized_low/high: the
    policy's, the floor's and the oracle's means resampled together, texts paired) and p_beats_next (the
    next policy by estimate at that budget; the oracle rows are left out of that order).
    """
    ppl_units: dict[str, dict[Any, dict]] = defaultdict(lambda: defaultdict(dict))
    acc_units: dict[str, dict[str, dict[Any, dict]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for index, record in enumerate(results["downstream"]):
        budget = record["budget"] if record["budget"] is not None else "full"
        unit = (record["source"], record.get("trace", index))
        if record["kind"] == "ppl":
            ppl_units[record["policy"]][budget][unit] = unit_value(record)
        else:
            acc_units[record["placement"]][record["policy"]][budget][unit] = unit_value(record)

    def cells(table: dict[str, dict[Any, dict]], lower_is_better: bool, transform) -> dict[str, dict[Any, dict]]:
        out: dict[str, dict[Any, dict]] = defaultdict(dict)

        def draws(per_unit: dict) -> tuple[list, float, np.ndarray]:
            """``paired_draws`` with the mean transformed (exp for perplexity)."""
            units, estimate, means = paired_draws(per_unit)
            return units, float(transform(estimate)), transform(means)

        full = table.get(FULL_CACHE, {}).get("full")
        full_draws = None if full is None else draws(full)
        for budget in {b for per in table.values() for b in per}:
            drawn = {policy: draws(per[budget]) for policy, per in table.items() if budget in per}
            stats = {policy: percentile_interval(estimate, samples) for policy, (_, estimate, samples) in drawn.items()}
            best_oracle = reference_oracle({p: stats[p].estimate for p in stats}, lower_is_better)
            reference = drawn[best_oracle] if best_oracle else full_draws  # the downstream oracle (reads the future) is the 1
            floors = [drawn[p] for p in FLOOR_POLICIES if p in drawn]
            floor = worse_of((f[1] for f in floors), lower_is_better)
            order = sorted((p for p in stats if p not in ORACLES),
                           key=lambda p: stats[p].estimate if lower_is_better else -stats[p].estimate)
            chain = list(zip(order, order[1:] + [None])) + [(p, None) for p in ORACLES if p in stats]
            for policy, following in chain:  # an oracle, an upper bound, is nobody's next
                values = {u: v for u, (v, _) in table[policy][budget].items()}
                weights = {u: w for u, (_, w) in table[policy][budget].items()}
                beats = math.nan if following is None else paired_probability(
                    values, {u: v for u, (v, _) in table[following][budget].items()}, lower_is_better, weights)
                estimate = stats[policy]
                low, high = sorted((estimate.low, estimate.high))
                normalized = Interval(math.nan, math.nan, math.nan)
                if reference is not None:
                    normalized = Interval(normalized_score(estimate.estimate, reference[1], floor), math.nan, math.nan)
                    units = drawn[policy][0]
                    if floors and all(other[0] == units for other in (*floors, reference)):  # paired draws
                        samples = normalized_samples(drawn[policy][2], [f[2] for f in floors], reference[2], lower_is_better)
                        normalized = percentile_interval(normalized.estimate, samples)
                out[policy][budget] = {"estimate": estimate.estimate, "low": low, "high": high, "p_beats_next": beats,
                                       "next": following, "normalized": normalized.estimate,
                                       "normalized_low": normalized.low, "normalized_high": normalized.high}
        return out

    return {
        "perplexity": cells(ppl_units, True, np.exp),
        "accuracy": {placement: cells(table, False, lambda x: x) for placement, table in acc_units.items()},
    }


def headline_scores(results: dict[str, Any]) -> dict[str, Interval]:
    """The leaderboard's headline: per policy, the IQM over tasks of its normalised downstream score, with a
    95% stratified bootstrap interval (rliable's protocol, Agarwal et al. 2021).

    A task is one (metric, source, budget) cell: perplexity on a source (pooled, exp of the token-weighted
    mean NLL) or RULER accuracy at a placement. Its normalised score is ``normalized_score(policy, oracle,
    floor)``: 0 = the worse of random and StreamingLLM, 1 = the better downstream future oracle row (the full cache
    where it did not run). Each resample draws a source's texts with replacement, the same draw for every
    policy and budget, and recomputes every task mean, floor and oracle, then the IQM. Only units every
    policy of a task has are used. Policies without a real-cache row (future-only ones, the full cache,
    the oracle itself) get no score.
    """
    tasks: dict[tuple, dict[str, dict[Any, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for index, record in enumerate(results["downstream"]):
        if record["budget"] is None:
            continue
        metric = "perplexity" if record["kind"] == "ppl" else f"accuracy {record['placement']}"
        tasks[metric, record["source"], record["budget"]][record["policy"]][record.get("trace", index)] = unit_value(record)
    full = {(record["source"], record.get("trace", index)): record for index, record in enumerate(results["downstream"])
            if record["budget"] is None}
    per_policy: dict[str, list[np.ndarray]] = defaultdict(list)  # policy -> per task [1 + R] scores (estimate first)
    for (metric, source, _), table in sorted(tasks.items(), key=str):
        units = sorted(set.intersection(*(set(per) for per in table.values())), key=str)
        if not units or not any(p in table for p in FLOOR_POLICIES):
            continue
        lower_is_better = metric == "perplexity"

        def means(values: list[tuple[float, float]]) -> np.ndarray:
            """The task's mean for the estimate and every resample (``paired_draws``, the same for every policy): [1 + R]."""
            _, estimate, samples = paired_draws({(source, u): value for u, value in zip(units, values)})
            drawn = np.concatenate([[estimate], samples])
            return np.exp(drawn) if lower_is_better else drawn

        mean = {policy: means([per[u] for u in units]) for policy, per in table.items()}
        best_oracle = reference_oracle({p: values[0] for p, values in mean.items()}, lower_is_better)
        if best_oracle:
            reference = mean[best_oracle]
        elif lower_is_better and all((source, u) in full for u in units):
            reference = means([unit_value(full[source, u]) for u in units])
        else:
            continue
        floors = [mean[p] for p in FLOOR_POLICIES if p in mean]
        for policy, values in mean.items():
            if policy not in ORACLES and policy not in results.get("future_only", ()):
                per_policy[policy].append(normalized_samples(values, floors, reference, lower_is_better))
    headline = {}
    for policy, scores in per_policy.items():
        grid = np.stack(scores)  # [tasks, 1 + R]
        samples = np.array([iqm(column[~np.isnan(column)]) for column in grid.T[1:] if (~np.isnan(column)).any()])
        estimate = grid[:, 0][~np.isnan(grid[:, 0])]
        if estimate.size and samples.size:
            low, high = np.quantile(samples, [0.025, 0.975])
            headline[policy] = Interval(iqm(estimate), float(min(low, iqm(estimate))), float(max(high, iqm(estimate))))
    return headline


def unit_value(record: dict[str, Any]) -> tuple[float, float]:
    """(value, weight) of one downstream record as a bootstrap unit: (mean NLL per token, tokens) of a
    perplexity record, so the weighted mean is the pooled NLL; (score, 1) of a task record."""
    if record["kind"] == "ppl":
        return record["nll_sum"] / record["tokens"], record["tokens"]
    return float(record["score"]), 1.0


def head_means(results: dict[str, Any]) -> tuple[dict[str, np.ndarray], int, int]:
    """Mean cost ratio per policy and (layer, KV head): {policy: [L, H]}."""
    sums: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in results["ranking"]:
        for layer, head, ratio in zip(record["layer"], record["kv_head"], record["cost_ratio"]):
            sums[record["policy"]][layer, head].append(ratio)
    layers = 1 + max(layer for cells in sums.values() for layer, _ in cells)
    heads = 1 + max(head for cells in sums.values() for _, head in cells)
    means = {}
    for policy, cells in sums.items():
        grid = np.full((layers, heads), np.nan)
        for (layer, head), ratios in cells.items():
            grid[layer, head] = np.mean(ratios)
        means[policy] = grid
    return means, layers, heads


def _twins_note(twins: dict[str, str]) -> str:
    """The ranking table's sentence on the policies it leaves out (``ranking_twins``); "" when none."""
    if not twins:
        return ""
    named = ", ".join(f"`{policy}` as `{base}`" for policy, base in sorted(twins.items()))
    return (f" A split of the budget across heads is not a ranking, so these rank as their base policy and have no row "
            f"of their own: {named}.")


def heads_won(results: dict[str, Any], twins: Collection[str] = ()) -> dict[str, int]:
    """How many (layer, KV head) each policy has the lowest mean cost ratio on (future-only policies and ``twins``,
    the ``ranking_twins``, excluded)."""
    means, _, _ = head_means(results)
    skip = {*results["future_only"], *twins}
    names = [name for name in means if name not in skip]
    if not names:
        return {}
    stacked = np.stack([means[name] for name in names])
    winners = np.nanargmin(stacked, axis=0)
    counts = np.bincount(winners.ravel(), minlength=len(names))
    return {name: int(count) for name, count in zip(names, counts)}


def downstream_tables(results: dict[str, Any]) -> tuple[dict, dict]:
    """Perplexity {policy: {budget: ppl}} and RULER accuracy {placement: {policy: {budget: acc}}}."""
    nll: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    scores: dict[str, dict[str, dict[Any, list[float]]]] = {p: defaultdict(lambda: defaultdict(list)) for p in QUESTION_PLACEMENTS}
    for record in results["downstream"]:
        budget = record["budget"] if record["budget"] is not None else "full"
        if record["kind"] == "ppl":
            cell = nll[record["policy"]][budget]
            cell[0] += record["nll_sum"]
            cell[1] += record["tokens"]
        else:
            scores[record["placement"]][record["policy"]][budget].append(record["score"])
    ppl = {policy: {budget: perplexity(*cell) for budget, cell in cells.items()} for policy, cells in nll.items()}
    accuracy = {
        placement: {policy: {budget: float(np.mean(v)) for budget, v in cells.items()} for policy, cells in table.items()}
        for placement, table in scores.items()
    }
    return ppl, accuracy


def budget_keys(suite: dict[str, Any]) -> list[Any]:
    """The suite's budget settings as the records key them: tokens (ints), then fractions ("25%")."""
    return [*suite.get("budgets", ()), *(fraction_label(f) for f in suite.get("budget_fractions", ()))]


def calibration(results: dict[str, Any]) -> dict[str, Any]:
    """RULER difficulty calibrated to the model: full-cache accuracy per task (both question placements
    pooled, with its 95% bootstrap interval over samples), and which tasks are scored (accuracy >= the suite's ``min_task_accuracy``; all when None)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in results["downstream"]:
        if record["kind"] == "ruler" and record["policy"] == FULL_CACHE:
            scores[str(record.get("task"))].append(float(record["score"]))
    threshold = results["suite"].get("min_task_accuracy")
    accuracy = {task: float(np.mean(values)) for task, values in sorted(scores.items())}
    scored = [task for task, acc in accuracy.items() if threshold is None or acc >= threshold]
    intervals = {task: bootstrap_ci(values) for task, values in sorted(scores.items())}
    return {"threshold": threshold, "task_accuracy": accuracy, "samples": {t: len(v) for t, v in sorted(scores.items())},
            "task_accuracy_ci": {task: [i.low, i.high] for task, i in intervals.items()}, "scored_tasks": scored}


def scored_results(results: dict[str, Any], scored_tasks: list[str]) -> dict[str, Any]:
    """``results`` with the RULER records of unscored tasks left out (every other record kept)."""
    keep = set(scored_tasks)
    downstream = [r for r in results["downstream"] if r["kind"] != "ruler" or str(r.get("task")) in keep]
    return {**results, "downstream": downstream}


def headroom(results: dict[str, Any]) -> list[dict[str, Any]]:
    """headroom closed = (best heuristic - policy) / (best heuristic - oracle), per metric, source and budget.

    The best heuristic is the best non-learned, non-future policy at that budget and source; the oracle
    is the better downstream future oracle row there (``reference_oracle``). Perplexity per perplexity source;
    RULER accuracy per question placement over every (scored) RULER sample. 1 = as good as the oracle, 0 = as the best heuristic,
    < 0 worse. Same formula for both orientations. One row per (metric, source, budget, policy), with a
    95% interval (the policy's, the best heuristic's and the oracle's means resampled together, texts
    paired; the best heuristic is the one of the full sample).
    """
    if not downstream_oracles(results):
        return []
    units: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for index, record in enumerate(results["downstream"]):
        if record["budget"] is None:
            continue
        unit = (record["source"], record.get("trace", index))
        if record["kind"] == "ppl":
            key, value = ("perplexity", record["source"], record["budget"]), (record["nll_sum"] / record["tokens"], record["tokens"])
        else:
            key, value = (f"accuracy ({record['placement']})", "ruler", record["budget"]), (float(record["score"]), 1.0)
        units[key][record["policy"]][unit] = value
    learned = set(results.get("learned", ()))
    future = set(results.get("future_only", ())) | set(ORACLES)
    rows = []
    for (metric, source, budget), by_policy in units.items():
        lower = metric == "perplexity"
        transform = np.exp if lower else (lambda x: x)
        drawn = {p: paired_draws(per) for p, per in by_policy.items()}
        value = {p: float(transform(estimate)) for p, (_, estimate, _) in drawn.items()}
        heuristics = [p for p in value if p not in learned and p not in future]
        oracle = reference_oracle(value, lower)
        if oracle is None or not heuristics:
            continue
        best = (min if lower else max)(heuristics, key=lambda p: value[p])
        for policy, v in sorted(value.items()):
            if policy in ORACLES:
                continue
            closed = Interval(normalized_score(v, value[oracle], value[best]), math.nan, math.nan)
            if drawn[policy][0] == drawn[best][0] == drawn[oracle][0]:  # the same texts: paired draws
                samples = normalized_samples(transform(drawn[policy][2]), [transform(drawn[best][2])],
                                             transform(drawn[oracle][2]), lower)
                closed = percentile_interval(closed.estimate, samples)
            rows.append({"metric": metric, "source": source, "budget": budget, "policy": policy, "value": v,
                         "best_heuristic": best, "best_heuristic_value": value[best], "oracle": value[oracle],
                         "oracle_row": oracle,
                         "headroom_closed": closed.estimate, "headroom_closed_low": closed.low,
                         "headroom_closed_high": closed.high})
    rows.sort(key=lambda r: (r["metric"], r["source"], str(r["budget"]), r["policy"]))
    return rows


def write_report(results: dict[str, Any], out: str | Path, title: str = "kvp-gym leaderboard") -> Path:
    """Write LEADERBOARD.md, results.json, results.csv and plots into ``out``; returns the .md path.

    RULER tables and statistics count only the scored tasks (``calibration``); every record stays in
    results.json / results.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calibrated = calibration(results)
    scored = scored_results(results, calibrated["scored_tasks"])
    ranking = ranking_table(results)
    ppl, accuracy = downstream_tables(scored)
    downstream_stats = downstream_statistics(scored)
    taus = env_downstream_tau(scored)
    closed = headroom(scored)
    headline = headline_scores(scored) if scored["downstream"] else {}
    suite = results["suite"]
    suite_hash = suite.get("hash", "-")
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": package_versions(), "machine": machine()}
    statistics = {"downstream": downstream_stats, "env_downstream_tau": taus, "headroom_closed": closed,
                  "ruler_calibration": calibrated,
                  "headline": {policy: interval._asdict() for policy, interval in headline.items()}}
    write_json_atomic(out / "results.json", {**results, **meta, "ranking_table": ranking, "perplexity": ppl, "accuracy": accuracy,
                                             "statistics": statistics})
    _write_csv(out / "results.csv", results)
    plots = _plots(results, ranking, ppl, accuracy, out, downstream_stats, taus)
    budgets = budget_keys(suite)
    oracles = downstream_oracles(results)
    m = meta["machine"]
    counts = ", ".join(f"{key}: {n}" for key, n in _trace_counts(results).items())
    lines = [f"# {title}", "",
             f"Suite `{suite['id']}` (hash `{suite_hash}`) on `{suite['model']}`: held-out test traces per source "
             f"({counts}); seed {suite['seed']}. Budgets: {', '.join(str(b) for b in budgets)} "
             "(ints: tokens kept per KV head; %: share of the compressed prefix).", "",
             f"Created {meta['created']} on {m['platform']} ({m['processor']}, {m['cpus']} CPUs, torch threads "
             f"{m['torch_threads']}); torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}, "
             f"kvp-gym {meta['versions'].get('kvp-gym')}.", "",
             "Intervals are 95% percentile bootstrap intervals over texts (traces), resampled within each source. "
             "P(beats next) is the bootstrap probability, over the same texts paired, that the policy's mean beats the "
             "next row's. Normalised: 0 = the worse of random and StreamingLLM, 1 = the oracle (ranking: the "
             "future-attention oracle; downstream: the future oracle in the real cache"
             + (": the better of its rows" if len(oracles) > 1 else "" if oracles else ", here not run, so the full cache")
             + ").", "",
             *_headline_section(headline),
             "## Ranking quality (KVEvict-v0, every layer x KV head x prefix)", "",
             "Cost ratio = cost(sigma)/cost(sigma*), lower is better, 1 is the oracle; [95% CI]. Kept@x% = share of the "
             "future attention kept by the top x% of the ranked tokens. Heads won: (layer, KV head) cells where the "
             "policy has the lowest mean cost ratio (oracle excluded). Upper bounds read the true future "
             "(future-only scorers): they are references, not policies." + _twins_note(ranking_twins(results)), ""]
    sources = suite["sources"]
    lines.append("| policy | cost ratio (mean ± std) | 95% CI | " + " | ".join(sources)
                 + " | kept@10% | kept@25% | kept@50% | heads won | P(beats next) | normalised [95% CI] | |")
    lines.append("|---|---|---|" + "---|" * len(sources) + "---|---|---|---|---|---|---|")
    for row in ranking:
        lines.append(f"| {row['policy']} | {row['cost_ratio']:.3f} ± {row['cost_ratio_std']:.3f} | "
                     f"[{row['cost_ratio_low']:.3f}, {row['cost_ratio_high']:.3f}] | "
                     + " | ".join(_with_interval(row, f"cost_ratio_{s}", 3) for s in sources) + " | "
                     + " | ".join(_with_interval(row, f"kept_{p}", 3) for p in (10, 25, 50)) + f" | {row['heads_won']} | "
                     f"{_number(row['p_beats_next'], 2)} | {_with_interval(row, 'normalized', 3)} | "
                     f"{'upper bound (reads the future)' if row['upper_bound'] else ''} |")
    oracle_note = (f" {' and '.join(f'`{row}`' for row in oracles)} evict{'s' if len(oracles) == 1 else ''} by the "
                   "trace's own future attention in the real cache: an upper bound (reads the future), not a policy."
                   + (f" `{ORACLE}` keeps the same budget in every head; `{ORACLE_TUNED}` splits it across heads by the "
                      "shares tuned for it (`agents.share_tuning`), as the `+tuned` policies do theirs." if len(oracles) > 1 else "")
                   if oracles else "")
    if ppl:
        lines += ["", "## Perplexity with the compressed cache (compressed once after the prefill)", "",
                  f"Prefill {suite['ppl_prefix']} tokens, compress to the budget, then score the rest of each "
                  f"{', '.join(suite['ppl_sources'])} test trace. Lower is better; [95% CI].{oracle_note}", ""]
        order = lambda p: ppl[p].get(budgets[0], math.inf)
        lines += _downstream_table(ppl, downstream_stats["perplexity"], budgets, oracles, order)
        lines += _beats_table(downstream_stats["perplexity"], budgets, "perplexity", oracles, order)
    if calibrated["task_accuracy"]:
        threshold = calibrated["threshold"]
        lines += ["", "## RULER calibration (full cache)", "",
                  "Full-cache accuracy per task (both question placements); "
                  + (f"only tasks at >= {threshold:.0%} are scored below." if threshold is not None else "every task is scored."),
                  "", "| task | samples | full-cache accuracy [95% CI] | scored |", "|---|---|---|---|"]
        for task, acc in calibrated["task_accuracy"].items():
            low, high = calibrated["task_accuracy_ci"][task]
            lines.append(f"| {task} | {calibrated['samples'][task]} | {acc:.2f} [{low:.2f}, {high:.2f}] | "
                         f"{'yes' if task in calibrated['scored_tasks'] else 'no'} |")
    for placement, table in accuracy.items():
        if not table:
            continue
        where = "after the compression (not in the compressed prefix)" if placement == "outside" else "inside the compressed prefix"
        cells = downstream_stats["accuracy"].get(placement, {})
        lines += ["", f"## RULER accuracy, question {where}", "", f"Higher is better; [95% CI].{oracle_note}", ""]
        order = lambda p, t=table: -np.mean([t[p].get(b, 0.0) for b in budgets])
        lines += _downstream_table(table, cells, budgets, oracles, order)
        lines += _beats_table(cells, budgets, f"accuracy (question {placement})", oracles, order)
    if closed:
        lines += ["", "## Headroom closed", "",
                  "(best heuristic - policy) / (best heuristic - oracle) at each budget and source [95% CI]: 1 = as good "
                  "as the future oracle (the better of its rows there), 0 = as the best non-learned heuristic there, "
                  "< 0 = worse than it.", "",
                  "| metric | source | budget | best heuristic | oracle | " + " | ".join(
                      sorted({r['policy'] for r in closed})) + " |", "|---|---|---|---|---|" + "---|" * len({r['policy'] for r in closed})]
        names = sorted({r["policy"] for r in closed})
        groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in closed:
            groups[(r["metric"], r["source"], r["budget"])][r["policy"]] = r
        for (metric, source, budget), per in groups.items():
            first = next(iter(per.values()))
            lines.append(f"| {metric} | {source} | {budget} | {first['best_heuristic']} ({first['best_heuristic_value']:.2f}) | "
                         f"{first['oracle']:.2f}{' (+tuned)' if first.get('oracle_row', ORACLE) != ORACLE else ''} | " + " | ".join(_with_interval(per[n], "headroom_closed", 2) if n in per else "-" for n in names) + " |")
    if taus:
        lines += ["", "## How far to trust the env's reward", "",
                  "Kendall's tau, across policies (future-only ones and the full cache left out), between the mean env "
                  "cost ratio on a source's traces and the downstream metric on that source, per budget. tau > 0: the env "
                  "orders the policies as the downstream metric does (1 = the same order, 0 = unrelated, -1 = reversed); "
                  "the p-value tests tau = 0.", "", "| metric | source | budget | tau | p-value | policies |",
                  "|---|---|---|---|---|---|"]
        for row in taus:
            lines.append(f"| {row['metric']} | {row['source']} | {row['budget']} | {_number(row['tau'], 2)} | "
                         f"{_number(row['p_value'], 3)} | {row['policies']} |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += ["", f"Every number: `results.json` / `results.csv`. Versions: {meta['versions']}."]
    path = out / "LEADERBOARD.md"
    write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


def _headline_section(headline: dict[str, Interval]) -> list[str]:
    """The headline table: IQM of the normalised downstream score per policy, best first."""
    if not headline:
        return []
    lines = ["## Headline: normalised downstream score", "",
             "Per policy, the interquartile mean over tasks (every perplexity source and RULER set at every budget) "
             "of the normalised score (0 = the worse of random and StreamingLLM, 1 = the future oracle in the real "
             "cache), with its 95% stratified bootstrap interval over texts (rliable's protocol). Higher is better.", "",
             "| policy | IQM normalised score | 95% CI |", "|---|---|---|"]
    for policy, interval in sorted(headline.items(), key=lambda item: -item[1].estimate):
        lines.append(f"| {policy} | {interval.estimate:.3f} | [{interval.low:.3f}, {interval.high:.3f}] |")
    return lines + [""]


def _with_interval(row: dict[str, Any], key: str, digits: int) -> str:
    """``row[key]`` with its interval (``key_low``, ``key_high``)."""
    return f"{_number(row[key], digits)} [{_number(row[f'{key}_low'], digits)}, {_number(row[f'{key}_high'], digits)}]"


def _trace_counts(results: dict[str, Any]) -> dict[str, int]:
    """Held-out texts per trace set, as the records show them (ranking and downstream)."""
    seen: dict[str, set] = defaultdict(set)
    for record in [*results["ranking"], *results["downstream"]]:
        seen[record["source"]].add(record.get("trace"))
    return {source: len(traces) for source, traces in sorted(seen.items())}


def _downstream_table(table: dict, cells: dict, budgets: list, oracles: list[str], order) -> list[str]:
    """Rows: every policy (by ``order``), then the oracle rows (upper bounds); columns: budgets and the full cache."""
    full = table.get(FULL_CACHE, {}).get("full", math.nan)
    lines = ["| policy | " + " | ".join(f"b={b}" for b in budgets) + " | full cache | |",
             "|---|" + "---|" * (len(budgets) + 2)]
    names = sorted((p for p in table if p != FULL_CACHE and p not in oracles), key=order)
    names += [p for p in oracles if p in table]
    for policy in names:
        lines.append(f"| {policy} | " + " | ".join(_cell(table[policy].get(b, math.nan), cells.get(policy, {}).get(b), 2)
                                                   for b in budgets)
                     + f" | {_cell(full, cells.get(FULL_CACHE, {}).get('full'), 2)} | "
                     f"{'upper bound (reads the future)' if policy in oracles else ''} |")
    return lines


def _number(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _cell(value: float, stats: dict[str, Any] | None, digits: int) -> str:
    """``value [low, high]`` (just the value without statistics)."""
    if stats is None or math.isnan(value):
        return _number(value, digits)
    return f"{value:.{digits}f} [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"


def _beats_table(cells: dict[str, dict[Any, dict]], budgets: list, what: str, oracles: list[str], order) -> list[str]:
    """Per policy (by ``order``, as the table above) and budget: the normalised score with its interval, and
    P(beats the next policy at that budget) with that policy's name (the order can differ between budgets)."""
    policies = [p for p in cells if p != FULL_CACHE and p not in oracles and any(b in cells[p] for b in budgets)]
    if not policies:
        return []
    lines = ["", f"Normalised {what} score [95% CI] · P(beats the next policy at that budget, named):", "",
             "| policy | " + " | ".join(f"b={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]

    def cell(stats: dict) -> str:
        beats = "" if stats["next"] is None else f" · {_number(stats['p_beats_next'], 2)} vs {stats['next']}"
        return _with_interval(stats, "normalized", 2) + beats

    for policy in sorted(policies, key=order):
        row = cells[policy]
        lines.append(f"| {policy} | " + " | ".join("-" if b not in row else cell(row[b]) for b in budgets) + " |")
    return lines


def _write_csv(path: Path, results: dict[str, Any]) -> None:
    columns = ["kind", "policy", "source", "trace", "layer", "kv_head", "n", "budget", "placement", "value"]

    def rows():
        for r in results["ranking"]:
            for layer, head, n, ratio in zip(r["layer"], r["kv_head"], r["n"], r["cost_ratio"]):
                yield ["cost_ratio", r["policy"], r["source"], r["trace"], layer, head, n, "", "", ratio]
        for r in results["downstream"]:
            value = r["nll_sum"] / r["tokens"] if r["kind"] == "ppl" else r["score"]
            yield ["nll" if r["kind"] == "ppl" else "ruler_score", r["policy"], r["source"], r["trace"], "", "", "",
                   r["budget"] if r["budget"] is not None else "full", r["placement"], value]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows())

    write_atomic(path, write)


def _plots(results: dict[str, Any], ranking: list[dict[str, Any]], ppl: dict, accuracy: dict, out: Path,
           stats: dict[str, Any] | None = None, taus: list | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    policies = [row["policy"] for row in ranking]
    colors = {policy: plt.cm.tab20(i % 20) for i, policy in enumerate(sorted(set(policies) | set(ppl)))}

    fig, ax = plt.subplots(figsize=(9, 4))
    sources = results["suite"]["sources"]
    width = 0.8 / len(sources)
    for k, source in enumerate(sources):
        ax.bar(np.arange(len(policies)) + k * width, [row[f"cost_ratio_{source}"] for row in ranking], width, label=source)
    ax.set_xticks(np.arange(len(policies)) + 0.4 - width / 2, policies, rotation=30, ha="right")
    ax.set_ylabel("mean cost ratio (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Ranking cost on held-out traces")
    written.append(_save(fig, out / "ranking_cost.png"))

    curves: dict[str, list[list[float]]] = defaultdict(list)
    for record in results["ranking"]:
        curves[record["policy"]].append(record["curve"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in policies:
        ax.plot(CURVE_FRACTIONS, np.mean(curves[policy], axis=0), label=policy, color=colors[policy])
    ax.set_xlabel("budget (fraction of the ranked tokens kept)")
    ax.set_ylabel("future attention kept")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "kept_attention_curve.png"))

    means, layers, heads = head_means(results)
    contenders = [p for p in policies if p not in results["future_only"]]
    winners = np.nanargmin(np.stack([means[p] for p in contenders]), axis=0)
    fig, ax = plt.subplots(figsize=(max(3, heads * 1.2) + 2.5, 6))
    cmap = matplotlib.colors.ListedColormap([colors[p] for p in contenders])
    ax.imshow(winners, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(contenders) - 0.5, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title("Best policy per head (lowest cost ratio)")
    handles = [matplotlib.patches.Patch(color=colors[p], label=p) for p in contenders if (winners == contenders.index(p)).any()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    written.append(_save(fig, out / "head_winners.png"))

    budgets = budget_keys(results["suite"])
    stats = stats or {"perplexity": {}, "accuracy": {}}
    oracles = downstream_oracles(results)
    colors.setdefault(FULL_CACHE, "black")
    for row, color in zip(oracles, ("dimgray", "darkgray")):
        colors[row] = color
    if ppl and budgets:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _budget_curves(ax, ppl, budgets, colors, stats["perplexity"], oracles)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Perplexity against budget (95% CI bands)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        written.append(_save(fig, out / "perplexity.png"))
    if any(accuracy.values()) and budgets:
        fig, axes = plt.subplots(1, len(accuracy), figsize=(12, 4), sharey=True)
        for ax, (placement, table) in zip(np.atleast_1d(axes), accuracy.items()):
            _budget_curves(ax, table, budgets, colors, stats["accuracy"].get(placement, {}), oracles)
            ax.set_title(f"RULER, question {placement}")
        np.atleast_1d(axes)[0].set_ylabel("accuracy")
        labelled = [ax for ax in np.atleast_1d(axes) if ax.get_legend_handles_labels()[0]]
        if labelled:
            labelled[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        written.append(_save(fig, out / "ruler_accuracy.png"))
    normalized = {policy: [cells[b]["normalized"] for b in budgets if b in cells]
                  for policy, cells in stats["perplexity"].items() if policy != FULL_CACHE and policy not in oracles}
    normalized = {p: float(np.nanmean(v)) for p, v in normalized.items() if v and not all(math.isnan(x) for x in v)}
    if normalized:
        names = sorted(normalized, key=normalized.get, reverse=True)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [normalized[n] for n in names], color=[colors.get(n, "C0") for n in names])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(1, color="dimgray", linestyle="--", linewidth=0.8)
        ax.set_ylabel("normalised perplexity score (mean over budgets)")
        ax.set_title("0 = worse of random/StreamingLLM, 1 = " + ("future oracle" if oracles else "full cache"))
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_ha("right")
        written.append(_save(fig, out / "normalized_score.png"))
    env = {row["policy"]: row["cost_ratio"] for row in ranking if not row["upper_bound"]}
    points = [(p, env[p], cells[b]["estimate"], b) for p, cells in stats["perplexity"].items() if p in env
              for b in budgets if b in cells]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, budget in enumerate(budgets):
            chosen = [(p, x, y) for p, x, y, b in points if b == budget]
            if chosen:
                ax.scatter([x for _, x, _ in chosen], [y for _, _, y in chosen], marker="os^Dv<>"[k % 7], label=f"b={budget}",
                           c=[colors.get(p, "C0") for p, _, _ in chosen])
        for p, x, y, b in points:
            if b == budgets[0]:
                ax.annotate(p, (x, y), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("env mean cost ratio (lower is better)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Env reward against downstream perplexity")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "env_vs_downstream.png"))
    return written


def _budget_curves(ax: Any, table: dict[str, dict[Any, float]], budgets: list, colors: dict[str, Any],
                   cells: dict | None = None, oracles: Sequence[str] = ()) -> None:
    """One line per policy over the budgets, with its 95% CI band; the full cache as a dashed line.

    Token budgets alone are on a log2 axis; with fractional ones the budgets are evenly spaced categories."""
    categorical = any(isinstance(b, str) for b in budgets)
    x = list(range(len(budgets))) if categorical else budgets
    for policy, values in table.items():
        if policy == FULL_CACHE:
            if "full" in values:
                ax.axhline(values["full"], color="black", linestyle="--", label=FULL_CACHE)
            continue
        style = {"linestyle": ":", "marker": "*"} if policy in oracles else {"marker": "o"}
        label = f"{policy} (upper bound)" if policy in oracles else policy
        ax.plot(x, [values.get(b, math.nan) for b in budgets], label=label, color=colors.get(policy, "C0"), **style)
        band = (cells or {}).get(policy, {})
        if band:
            ax.fill_between(x, [band[b]["low"] if b in band else math.nan for b in budgets],
                            [band[b]["high"] if b in band else math.nan for b in budgets], color=colors.get(policy, "C0"), alpha=0.12)
    if categorical:
        ax.set_xticks(x, [str(b) for b in budgets])
        ax.set_xlabel("cache budget (tokens per KV head, or % of the prefix)")
    else:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache budget (tokens per KV head)")


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path.name
