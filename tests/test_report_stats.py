"""The report's statistics on hand-made leaderboard results: intervals, P(beats next), normalised
scores, upper-bound labels and the env-vs-downstream tau table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvp_gym.eval.report import downstream_statistics, ranking_table, write_report


def fake_results() -> dict:
    rng = np.random.default_rng(0)
    policies = {"oracle": 1.0, "good": 1.3, "random": 2.5, "streamingllm": 2.0}
    nll = {"good": 2.0, "random": 2.6, "streamingllm": 2.3, "full cache": 1.9}
    ranking, downstream = [], []
    for source in ("prose", "ruler"):
        for trace in range(4):
            for name, ratio in policies.items():
                ranking.append({"policy": name, "source": source, "trace": trace, "layer": [0, 0, 1, 1],
                                "kv_head": [0, 1, 0, 1], "n": [32] * 4,
                                "cost_ratio": [float(x) for x in ratio + (np.zeros(4) if name == "oracle" else rng.uniform(0, 0.2, 4))],
                                **{f"kept_fraction_{p}": [float(x) for x in rng.uniform(0, 1, 4)] for p in (10, 25, 50)},
                                "curve": [float(x) for x in np.linspace(0, 1, 20)]})
    for trace in range(4):
        for name, value in nll.items():
            for budget in ([None] if name == "full cache" else [16, 32]):
                downstream.append({"kind": "ppl", "policy": name, "source": "prose", "trace": trace, "budget": budget,
                                   "placement": "-", "nll_sum": (value + rng.uniform(0, 0.05)) * 50, "tokens": 50})
                downstream.append({"kind": "ruler", "policy": name, "source": "ruler", "trace": trace, "budget": budget,
                                   "placement": "outside", "task": "niah", "answer": "x",
                                   "score": float(value < 2.4 or trace % 2 == 0)})
    suite = {"id": "fake-v1", "model": "tiny", "traces_per_source": 4, "length": 64, "sources": ["prose", "ruler"],
             "seed": 0, "budgets": [16, 32], "ppl_prefix": 32, "ppl_sources": ["prose"]}
    return {"suite": suite, "policies": sorted(policies), "future_only": ["oracle"], "ranking": ranking,
            "downstream": downstream}


def test_ranking_table_statistics():
    table = {row["policy"]: row for row in ranking_table(fake_results())}
    assert table["oracle"]["upper_bound"] and not table["good"]["upper_bound"]
    assert table["oracle"]["cost_ratio_low"] == table["oracle"]["cost_ratio_high"] == 1.0
    assert table["good"]["cost_ratio_low"] <= table["good"]["cost_ratio"] <= table["good"]["cost_ratio_high"]
    assert table["good"]["normalized"] == pytest.approx((2.6 - table["good"]["cost_ratio"]) / (2.6 - 1.0), abs=0.1)
    assert table["random"]["normalized"] == pytest.approx(0.0)  # random is the worse of the two floors
    assert table["oracle"]["normalized"] == 1.0
    assert table["good"]["p_beats_next"] == 1.0  # good beats streamingllm on every text
    assert math.isnan(table["random"]["p_beats_next"])  # the last row has no next


def test_downstream_statistics_and_report(tmp_path):
    results = fake_results()
    stats = downstream_statistics(results)
    good = stats["perplexity"]["good"][16]
    assert good["low"] <= good["estimate"] <= good["high"]
    assert good["next"] == "streamingllm" and good["p_beats_next"] == 1.0
    assert 0.0 < good["normalized"] < 1.0
    assert stats["perplexity"]["random"][16]["normalized"] == pytest.approx(0.0)
    markdown = write_report(results, tmp_path).read_text()
    assert "upper bound (reads the future)" in markdown
    assert "How far to trust the env's reward" in markdown and "| perplexity | prose | 16 |" in markdown
    assert "Normalised perplexity score" in markdown
    saved = json.loads((tmp_path / "results.json").read_text())
    taus = {(row["metric"], row["budget"]): row for row in saved["statistics"]["env_downstream_tau"]}
    assert taus["perplexity", 16]["tau"] == pytest.approx(1.0) and taus["perplexity", 16]["policies"] == 3
