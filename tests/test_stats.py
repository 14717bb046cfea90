"""kvp_gym.eval.stats against known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvp_gym.eval.stats import (
    bootstrap_ci,
    env_downstream_tau,
    iqm,
    iqm_ci,
    kendall_tau,
    normalized_score,
    probability_of_improvement,
    resample_indices,
    worse_of,
)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    draws = 200
    for i in range(draws):
        interval = bootstrap_ci(rng.normal(3.0, 2.0, 60), n_resamples=1000, seed=i)
        covered += interval.low <= 3.0 <= interval.high
    assert 0.88 <= covered / draws <= 0.99  # percentile bootstrap: slightly under 95% at n = 60


def test_bootstrap_constant_values_have_a_zero_width_interval():
    interval = bootstrap_ci([2.5] * 10, strata=["a"] * 5 + ["b"] * 5)
    assert interval.estimate == interval.low == interval.high == 2.5
    single = bootstrap_ci([7.0])
    assert single.low == single.high == 7.0


def test_stratified_bootstrap_resamples_within_strata():
    strata = ["a"] * 20 + ["b"] * 20
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 0.01, 20), rng.normal(10, 0.01, 20)])
    stratified = bootstrap_ci(values, strata=strata)
    plain = bootstrap_ci(values)
    assert stratified.estimate == pytest.approx(plain.estimate)
    assert stratified.high - stratified.low < 0.02 < plain.high - plain.low  # strata sizes stay fixed
    index = resample_indices(strata, 40, 50, seed=0)
    assert index.shape == (50, 40)
    assert ((index < 20).sum(1) == 20).all()  # every resample keeps 20 draws of each stratum


def test_stratified_bootstrap_coverage():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(150):
        values = np.concatenate([rng.normal(0, 1, 30), rng.normal(5, 3, 30)])
        interval = bootstrap_ci(values, strata=["x"] * 30 + ["y"] * 30, n_resamples=800, seed=i)
        covered += interval.low <= 2.5 <= interval.high
    assert 0.87 <= covered / 150 <= 0.99


def test_weighted_mean():
    interval = bootstrap_ci([1.0, 3.0], weights=[3.0, 1.0])
    assert interval.estimate == pytest.approx(1.5)
    assert 1.0 <= interval.low <= interval.high <= 3.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="labels"):
        bootstrap_ci([1.0, 2.0], strata=["a"])
    with pytest.raises(ValueError, match="paired"):
        probability_of_improvement([1.0, 2.0], [1.0])


def test_probability_of_improvement():
    rng = np.random.default_rng(3)
    base = rng.normal(10, 3, 40)  # large spread between texts, small paired differences
    better = base - 0.5 + rng.normal(0, 0.1, 40)
    assert probability_of_improvement(better, base) == 1.0  # lower is better
    assert probability_of_improvement(base, better) == 0.0
    assert probability_of_improvement(better, base, lower_is_better=False) == 0.0
    assert probability_of_improvement(base, base) == 0.5
    noisy = base + rng.normal(0, 1.0, 40)
    assert 0.0 < probability_of_improvement(noisy, base) < 1.0


def test_iqm():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1000]) == pytest.approx(4.5)  # robust to an outlier
    interval = iqm_ci(np.arange(20.0))
    assert interval.estimate == pytest.approx(9.5) and interval.low <= interval.estimate <= interval.high
    constant = iqm_ci([0.3] * 5)
    assert constant.low == constant.high == pytest.approx(0.3)


def test_normalized_score_both_orientations():
    assert normalized_score(15.0, oracle=10.0, floor=20.0) == pytest.approx(0.5)  # perplexity
    assert normalized_score(10.0, oracle=10.0, floor=20.0) == 1.0
    assert normalized_score(20.0, oracle=10.0, floor=20.0) == 0.0
    assert normalized_score(0.5, oracle=0.8, floor=0.2) == pytest.approx(0.5)  # accuracy
    assert normalized_score(0.1, oracle=0.8, floor=0.2) < 0
    assert math.isnan(normalized_score(1.0, oracle=2.0, floor=2.0))
    assert worse_of([12.0, 15.0, math.nan]) == 15.0 and worse_of([0.4, 0.3], lower_is_better=False) == 0.3


def test_kendall_tau():
    same = kendall_tau([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert same.tau == pytest.approx(1.0) and same.p_value == pytest.approx(2 / 120) and same.n == 5
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]).tau == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]).tau == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1.0], [2.0]).tau) and math.isnan(kendall_tau([1, 2], [3, 3]).tau)


def test_env_downstream_tau_from_records():
    ranking = [
        {"policy": name, "source": "prose", "trace": 0, "cost_ratio": [ratio, ratio]}
        for name, ratio in [("a", 1.2), ("b", 1.5), ("c", 2.0), ("oracle", 1.0)]
    ]
    downstream = []
    for name, nll, score in [("a", 1.0, 1.0), ("b", 1.1, 0.0), ("c", 1.3, 0.5), ("full cache", 0.9, 1.0)]:
        downstream.append({"kind": "ppl", "policy": name, "source": "prose", "trace": 0, "budget": 16,
                           "placement": "-", "nll_sum": nll * 10, "tokens": 10})
        downstream.append({"kind": "ruler", "policy": name, "source": "ruler", "trace": 0, "budget": 16,
                           "placement": "outside", "score": score})
    rows = env_downstream_tau({"ranking": ranking, "downstream": downstream, "future_only": ["oracle"]})
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["perplexity"]["tau"] == pytest.approx(1.0) and by_metric["perplexity"]["policies"] == 3
    # accuracy a=1, c=0.5, b=0 against cost a < b < c: one discordant pair of three
    assert by_metric["accuracy (outside)"]["tau"] == pytest.approx(1 / 3)
    assert by_metric["accuracy (outside)"]["source"] == "ruler"
    # a suite with absolute and fractional budgets (full-v2: 128 and "10%") gives a row per budget
    mixed = downstream + [{**record, "budget": "10%"} for record in downstream]
    rows = env_downstream_tau({"ranking": ranking, "downstream": mixed, "future_only": ["oracle"]})
    assert sorted(str(row["budget"]) for row in rows if row["metric"] == "perplexity") == ["10%", "16"]
