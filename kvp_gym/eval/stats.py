"""Statistics for the leaderboard, as pure numpy/scipy functions: bootstrap intervals (plain and
stratified), the probability that one policy beats another, the interquartile mean, normalised
scores, and Kendall's tau between the env's reward and downstream quality.

Shapes: U = units (the independent things resampled: texts/traces, or seeds), R = bootstrap
resamples. ``values [U]`` float; ``strata [U]`` any hashable labels (e.g. the text source);
``weights [U]`` > 0 (e.g. tokens per text, so a weighted mean of per-text mean NLLs is the pooled
NLL). Intervals are percentile bootstrap intervals; every resampling is seeded, so each number is
reproducible.

Stratified bootstrap: each resample draws, within every stratum s, n_s units with replacement
from that stratum's n_s units, and computes the statistic over the pooled draw. Stratum sizes stay
fixed, so the spread reflects variation within sources, not in how many texts of each source were
drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


class Interval(NamedTuple):
    """A point estimate with its bootstrap interval [low, high] at ``confidence``."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def resample_indices(
    strata: Sequence[Hashable] | np.ndarray | None, size: int, n_resamples: int, seed: int
) -> np.ndarray:
    """Indices [R, U] of ``n_resamples`` bootstrap draws of ``size`` units, within each stratum.

    Row r holds, for every stratum, as many draws (with replacement) from that stratum's units as it
    has units, so each row is a full-size resample. strata None = one stratum.
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, size, (n_resamples, size))
    labels = np.asarray(list(strata), dtype=object)
    if len(labels) != size:
        raise ValueError(f"strata has {len(labels)} labels for {size} values")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        groups[label].append(index)
    parts = []
    for members in groups.values():
        members_array = np.asarray(members)
        parts.append(members_array[rng.integers(0, len(members_array), (n_resamples, len(members_array)))])
    return np.concatenate(parts, axis=1)


def _as_values(values: Iterable[float], name: str = "values") -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _percentile_interval(estimate: float, samples: np.ndarray, confidence: float) -> Interval:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    # a constant sample gives low == high == estimate up to rounding; keep the estimate inside
    return Interval(float(estimate), float(min(low, estimate)), float(max(high, estimate)), confidence)


def bootstrap_ci(
    values: Iterable[float],
    strata: Sequence[Hashable] | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    weights: Iterable[float] | None = None,
) -> Interval:
    """The mean of ``values [U]`` with its (stratified) percentile bootstrap interval.

    estimate = sum_u w_u x_u / sum_u w_u (w = 1 without ``weights``); each of the R resamples
    (``resample_indices``, within ``strata`` when given) recomputes it, and the interval is the
    (1 - confidence)/2 and (1 + confidence)/2 quantiles of those R means. Constant values give a
    zero-width interval.
    """
    estimate, means = bootstrap_means(values, strata, n_resamples, seed, weights)
    return _percentile_interval(estimate, means, confidence)


def bootstrap_means(
    values: Iterable[float],
    strata: Sequence[Hashable] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    weights: Iterable[float] | None = None,
) -> tuple[float, np.ndarray]:
    """(the weighted mean of ``values [U]``, its R resampled means [R]), as ``bootstrap_ci`` draws them:
    the same units, strata and seed give the same draws, so the resamples of two policies on the same
    units are paired, and a statistic of several means (a normalised score) can be resampled too."""
    x = _as_values(values)
    w = np.ones_like(x) if weights is None else _as_values(weights, "weights")
    if w.shape != x.shape or (w <= 0).any():
        raise ValueError("weights must be positive, one per value")
    index = resample_indices(strata, len(x), n_resamples, seed)  # [R, U]
    return float((w * x).sum() / w.sum()), (w[index] * x[index]).sum(1) / w[index].sum(1)


def percentile_interval(estimate: float, samples: np.ndarray, confidence: float = 0.95) -> Interval:
    """``estimate`` with the percentile interval of its bootstrap ``samples [R]`` (NaN samples ignored)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(estimate, math.nan, math.nan, confidence)
    return _percentile_interval(estimate, finite, confidence)


def probability_of_improvement(
    a: Iterable[float],
    b: Iterable[float],
    lower_is_better: bool = True,
    strata: Sequence[Hashable] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    weights: Iterable[float] | None = None,
) -> float:
    """P(policy a beats policy b): bootstrap over paired units.

    ``a [U]`` and ``b [U]`` hold the two policies' values on the same units (a[u] and b[u] come from
    the same text/sample). Each resample draws units (within ``strata``) and keeps the pairs
    together; the result is the share of resamples where a's (weighted) mean is better than b's, a
    tie counting one half. 0.5 = indistinguishable; identical inputs give exactly 0.5.
    """
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired (same length), got {x.size} and {y.size}")
    w = np.ones_like(x) if weights is None else _as_values(weights, "weights")
    index = resample_indices(strata, len(x), n_resamples, seed)
    diff = (w[index] * (x[index] - y[index])).sum(1) / w[index].sum(1)  # mean(a) - mean(b) per resample
    better = diff < 0 if lower_is_better else diff > 0
    # differences within rounding of zero are ties
    tie = np.isclose(diff, 0.0, rtol=0.0, atol=1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max())))
    return float(np.where(tie, 0.5, better.astype(np.float64)).mean())


def iqm(values: Iterable[float]) -> float:
    """Interquartile mean (rliable, Agarwal et al. 2021): the mean of the middle 50% of ``values``,
    ``scipy.stats.trim_mean(values, 0.25)`` (25% cut from each end)."""
    return float(scipy_stats.trim_mean(_as_values(values), 0.25))


def iqm_ci(
    values: Iterable[float], confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> Interval:
    """The IQM of ``values [U]`` (e.g. one score per training seed) with its percentile bootstrap
    interval over the units, as rliable reports trained agents over runs."""
    x = _as_values(values)
    index = resample_indices(None, len(x), n_resamples, seed)
    samples = scipy_stats.trim_mean(x[index], 0.25, axis=1)
    return _percentile_interval(iqm(x), samples, confidence)


def normalized_score(value: float, oracle: float, floor: float) -> float:
    """(floor - value) / (floor - oracle): 0 at the floor, 1 at the oracle.

    The floor is the worse of random and StreamingLLM, the oracle the best reference (the ranking's
    future-attention oracle; downstream, where no future-only policy runs, the full cache). The one
    formula serves both orientations: for perplexity or cost ratio (lower is better, floor > oracle)
    and for accuracy (higher is better, floor < oracle) it equals (value - floor) / (oracle - floor).
    Above 1 beats the oracle, below 0 is worse than the floor. NaN when floor == oracle.
    """
    if floor == oracle or any(math.isnan(v) for v in (value, oracle, floor)):
        return math.nan
    return (floor - value) / (floor - oracle) + 0.0  # no -0.0


def worse_of(values: Iterable[float], lower_is_better: bool = True) -> float:
    """The worst of ``values`` (NaN ignored): the max when lower is better, else the min; NaN if none."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan
    return max(finite) if lower_is_better else min(finite)


class Tau(NamedTuple):
    """Kendall's tau-b between two orderings, its two-sided p-value, and how many items were ranked."""

    tau: float
    p_value: float
    n: int


def kendall_tau(x: Iterable[float], y: Iterable[float]) -> Tau:
    """Kendall's tau-b of ``x [K]`` and ``y [K]`` with ``scipy.stats.kendalltau`` (exact p-value for
    small K without ties). NaN when K < 2 or one side is constant."""
    a, b = np.asarray(list(x), dtype=np.float64), np.asarray(list(y), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return Tau(math.nan, math.nan, int(a.size))
    result = scipy_stats.kendalltau(a, b)
    return Tau(float(result.statistic), float(result.pvalue), int(a.size))


def env_downstream_tau(
    results: Mapping[str, Any], exclude: Iterable[str] = ("full cache",)
) -> list[dict[str, Any]]:
    """How far to trust the env's reward: Kendall's tau, across policies, between the mean env cost
    ratio and each downstream metric, per downstream source and budget.

    ``results`` is the leaderboard's: ``ranking`` records (policy, source, cost_ratio [E]) and
    ``downstream`` records (kind "ppl": nll_sum, tokens; kind "ruler": placement, score; with
    source and budget). The env side is the policy's mean cost ratio on the same source's traces
    (all sources when the env has none of that source). Perplexity = exp(sum NLL / sum tokens);
    accuracy is negated first, so for every row tau > 0 means the env orders the policies as the
    downstream metric does (1 = the same order). Future-only policies and ``exclude`` are left out.
    One row per (metric, source, budget): metric, source, budget, tau, p_value, policies.
    """
    skip = set(exclude) | set(results.get("future_only", ()))
    env: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in results.get("ranking", ()):
        env[record["policy"]][record["source"]] += list(record["cost_ratio"])
        env[record["policy"]]["*"] += list(record["cost_ratio"])
    cells: dict[tuple[str, str, Any], dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for record in results.get("downstream", ()):
        if record["policy"] in skip or record["budget"] is None:
            continue
        if record["kind"] == "ppl":
            key = ("perplexity", record["source"], record["budget"])
            cell = cells[key][record["policy"]]
            cell[0] += record["nll_sum"]
            cell[1] += record["tokens"]
        else:
            key = (f"accuracy ({record['placement']})", record["source"], record["budget"])
            cell = cells[key][record["policy"]]
            cell[0] += record["score"]
            cell[1] += 1
    rows = []
    for (metric, source, budget), by_policy in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1], str(item[0][2]))):
        names = sorted(name for name in by_policy if name in env)
        cost = [float(np.mean(env[name][source] if env[name][source] else env[name]["*"])) for name in names]
        if metric == "perplexity":
            downstream = [math.exp(by_policy[name][0] / by_policy[name][1]) for name in names]
        else:
            downstream = [-by_policy[name][0] / by_policy[name][1] for name in names]
        tau = kendall_tau(cost, downstream)
        rows.append({"metric": metric, "source": source, "budget": budget, "tau": tau.tau, "p_value": tau.p_value,
                     "policies": tau.n})
    return rows
