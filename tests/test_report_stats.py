"""The report's statistics on hand-made leaderboard results: intervals, P(beats next), normalised
scores, upper-bound labels and the env-vs-downstream tau table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvp_gym.eval.oracle import ORACLE
from kvp_gym.eval.report import downstream_statistics, headline_scores, ranking_table, write_report


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
    assert table["good"]["normalized_low"] <= table["good"]["normalized"] <= table["good"]["normalized_high"]
    assert table["good"]["p_beats_next"] == 1.0  # good beats streamingllm on every text
    assert math.isnan(table["random"]["p_beats_next"])  # the last row has no next


def test_a_split_ranks_as_its_base_policy(tmp_path):
    """`good+tuned` splits `good`'s ranking across heads: the env ranks within heads, so its records are `good`'s,
    and the ranking table names it instead of repeating the row (or splitting `good`'s heads won)."""
    results = fake_results()
    results["ranking"] += [dict(record, policy="good+tuned") for record in results["ranking"] if record["policy"] == "good"]
    alone = {row["policy"]: row for row in ranking_table(fake_results())}
    table = {row["policy"]: row for row in ranking_table(results)}
    assert set(table) == set(alone) and table["good"]["heads_won"] == alone["good"]["heads_won"] > 0
    markdown = write_report(results, tmp_path).read_text()
    ranking_section = markdown.split("## Ranking quality")[1].split("\n## ")[0]
    assert "`good+tuned` as `good`" in ranking_section and "| good+tuned |" not in ranking_section
    del results["ranking"][: len(fake_results()["ranking"])]  # only the split's records: it keeps its own row
    assert "good+tuned" in {row["policy"] for row in ranking_table(results)}


def test_downstream_statistics_and_report(tmp_path):
    results = fake_results()
    stats = downstream_statistics(results)
    good = stats["perplexity"]["good"][16]
    assert good["low"] <= good["estimate"] <= good["high"]
    assert good["next"] == "streamingllm" and good["p_beats_next"] == 1.0
    assert 0.0 < good["normalized_low"] <= good["normalized"] <= good["normalized_high"] < 1.0
    assert stats["perplexity"]["random"][16]["normalized"] == pytest.approx(0.0)
    markdown = write_report(results, tmp_path).read_text()
    assert "upper bound (reads the future)" in markdown
    assert "How far to trust the env's reward" in markdown and "| perplexity | prose | 16 |" in markdown
    assert "Normalised perplexity score" in markdown and "## Headline: normalised downstream score" in markdown
    beats_rows = markdown.split("Normalised perplexity score")[1].split("\n\n")[1].splitlines()[2:]
    assert [row.split(" | ")[0] for row in beats_rows] == ["| good", "| streamingllm", "| random"]  # the table's order
    assert "· 1.00 vs streamingllm" in beats_rows[0] and "vs" not in beats_rows[2]  # the next policy, named
    saved = json.loads((tmp_path / "results.json").read_text())
    taus = {(row["metric"], row["budget"]): row for row in saved["statistics"]["env_downstream_tau"]}
    assert taus["perplexity", 16]["tau"] == pytest.approx(1.0) and taus["perplexity", 16]["policies"] == 3


def test_the_downstream_oracle_is_nobodys_next_policy():
    """The oracle is an upper bound, not a competitor: a policy that beats it (perplexity does not reward
    the oracle's ranking exactly) is compared with the next policy, and the oracle with none."""
    results = fake_results()
    results["downstream"] += [dict(r, policy=ORACLE, nll_sum=r["nll_sum"] + 5) for r in results["downstream"]
                              if r["kind"] == "ppl" and r["policy"] == "good"]  # 0.1 nats/token above good
    table = downstream_statistics(results)["perplexity"]
    assert table["good"][16]["next"] == "streamingllm" and table["good"][16]["p_beats_next"] == 1.0
    assert table[ORACLE][16]["next"] is None and math.isnan(table[ORACLE][16]["p_beats_next"])


def test_headline_is_the_iqm_of_normalised_task_scores():
    """Four RULER tasks (budgets) where the oracle answers every sample and random and StreamingLLM none:
    policy A's normalised scores are its accuracies 0, 0.5, 1, 1, whose IQM (the middle two) is 0.75.
    Every resample of the 4 texts keeps A's scores at 0 and 1 on two tasks, so the interval brackets 0.75
    and stays within [0.5, 1]."""
    accuracy = {1: [0, 0, 0, 0], 2: [1, 0, 1, 0], 3: [1, 1, 1, 1], 4: [1, 1, 1, 1]}
    downstream = []
    for budget, answers in accuracy.items():
        for trace, right in enumerate(answers):
            for policy, score in ((ORACLE, 1), ("random", 0), ("streamingllm", 0), ("a", right)):
                downstream.append({"kind": "ruler", "policy": policy, "source": "ruler", "trace": trace, "budget": budget,
                                   "placement": "outside", "score": float(score)})
    headline = headline_scores({"downstream": downstream, "future_only": []})
    assert set(headline) == {"a", "random", "streamingllm"}
    assert headline["a"].estimate == pytest.approx(0.75)
    assert 0.5 <= headline["a"].low <= 0.75 <= headline["a"].high <= 1.0 and headline["a"].low < headline["a"].high
    assert headline["random"].estimate == headline["streamingllm"].estimate == 0.0


def test_headline_of_perplexity_matches_the_normalised_pooled_perplexity():
    results = fake_results()
    headline = headline_scores(results)
    # no downstream oracle ran: the full cache is the 1; one perplexity task per budget (the RULER tasks have no 1)
    stats = downstream_statistics(results)["perplexity"]
    expected = np.mean([stats["good"][budget]["normalized"] for budget in (16, 32)])  # IQM of two values: their mean
    assert headline["good"].estimate == pytest.approx(expected)
    assert headline["good"].low <= headline["good"].estimate <= headline["good"].high
