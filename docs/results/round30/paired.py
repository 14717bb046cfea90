"""Per-source tables from a leaderboard's results.json: mean per-text perplexity ratio to the full cache - 1 (%),
and paired bootstrap differences between two policies (95% percentile intervals over texts, 10,000 resamples).

    python docs/results/round30/paired.py RESULTS [A B ...]   # pairs (A, B): A - B in points

RESULTS: a leaderboard's results.json, or this folder's results-downstream.json.gz (round 30's downstream units).
"""
import gzip
import json
import math
import sys
from collections import defaultdict

import numpy as np

results = json.load((gzip.open if sys.argv[1].endswith(".gz") else open)(sys.argv[1], "rt"))
pairs = list(zip(sys.argv[2::2], sys.argv[3::2]))
ppl, acc = defaultdict(dict), defaultdict(dict)
for unit in results["downstream"]:
    if unit["kind"] == "ppl":
        ppl[(unit["policy"], unit["source"], unit["budget"])][unit["trace"]] = math.exp(unit["nll_sum"] / unit["tokens"])
    elif unit.get("placement") == "outside":
        acc[(unit["policy"], unit["source"], unit["budget"])][unit["trace"]] = float(unit["score"])
budgets = [128, "10%", "25%", "50%"]
label = {budget: str(budget) for budget in budgets}
rng = np.random.default_rng(0)


def ratios(policy, source, budget):
    full = ppl[("full cache", source, None)]
    row = ppl[(policy, source, budget)]
    return np.array([100 * (row[t] / full[t] - 1) for t in sorted(row)])


def interval(values):
    draws = rng.integers(0, len(values), (10000, len(values)))
    means = values[draws].mean(1)
    return values.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5), (means < 0).mean()


ppl_sources = sorted({source for _, source, _ in ppl}, key=lambda source: (source != "prose", source))  # prose first
acc_sources = sorted({source for _, source, _ in acc})
policies = sorted({p for p, _, b in ppl if b is not None}, key=lambda p: np.mean(ratios(p, ppl_sources[0], "25%")))
for source in ppl_sources:
    print(f"\n{source}: ratio - 1 (%) at " + " / ".join(label[b] for b in budgets))
    for policy in policies:
        print(f"  {policy:<26}" + " / ".join(f"{ratios(policy, source, b).mean():+6.2f}" for b in budgets))
    for a, b in pairs:
        cells = [interval(ratios(a, source, x) - ratios(b, source, x)) for x in budgets]
        print(f"  {a} - {b}: " + " / ".join(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] (P<0 {p:.2f})" for m, lo, hi, p in cells))
for source in acc_sources:
    print(f"\n{source}: accuracy, question outside, at " + " / ".join(label[b] for b in budgets))
    for a, b in pairs:
        cells = []
        for x in budgets:
            ra, rb = acc[(a, source, x)], acc[(b, source, x)]
            cells.append(interval(np.array([ra[t] - rb[t] for t in sorted(ra)])))
        print(f"  {a} - {b}: " + " / ".join(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi, p in cells))
