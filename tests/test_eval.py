"""The leaderboard end to end on a tiny model: ranking, downstream, report, resume, reproducibility."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvp_gym.eval.leaderboard import run_leaderboard
from kvp_gym.eval.report import ranking_table, write_report
from kvp_gym.eval.suite import get_suite


def test_leaderboard_end_to_end_resumes_and_reproduces(tiny_suite, tmp_path):
    policies = ["knorm", "snapkv", "random", "oracle"]
    results = run_leaderboard(tiny_suite, tmp_path / "lb", policies, show_progress=False)
    table = {row["policy"]: row for row in ranking_table(results)}
    assert table["oracle"]["cost_ratio"] == 1.0
    assert all(row["cost_ratio"] >= 1.0 for row in table.values())
    assert len(results["ranking"][0]["cost_ratio"]) == 2 * 2 * 2  # layers x KV heads x prefixes
    kinds = {(r["kind"], r["policy"], r["budget"]) for r in results["downstream"]}
    assert ("ppl", "full cache", None) in kinds and ("ruler", "snapkv", 48) in kinds
    assert not any(policy == "oracle" for _, policy, _ in kinds)

    records = sorted((tmp_path / "lb" / "records" / "tiny-v1").glob("*.json"))
    stamps = [path.stat().st_mtime_ns for path in records]
    again = run_leaderboard(tiny_suite, tmp_path / "lb", policies, show_progress=False)
    assert [path.stat().st_mtime_ns for path in records] == stamps
    assert again == results

    (records[0]).unlink()
    redone = run_leaderboard(tiny_suite, tmp_path / "lb", policies, show_progress=False)
    assert redone == results

    markdown = write_report(results, tmp_path / "lb").read_text()
    assert "| oracle | 1.000" in markdown and "Perplexity" in markdown and "RULER accuracy" in markdown
    for name in ("ranking_cost.png", "kept_attention_curve.png", "head_winners.png", "perplexity.png", "ruler_accuracy.png"):
        assert (tmp_path / "lb" / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "lb" / "results.json").read_text())
    assert saved["suite"]["id"] == "tiny-v1" and "torch" in saved["versions"]


def test_an_added_policy_computes_only_its_own_units(tiny_suite, tmp_path, monkeypatch):
    from kvp_gym.eval.leaderboard import DownstreamRunner

    run_leaderboard(tiny_suite, tmp_path / "lb", ["knorm"], show_progress=False)
    records = {path: path.stat().st_mtime_ns for path in (tmp_path / "lb" / "records" / "tiny-v1").glob("*.json")}
    computed: list[tuple] = []
    original = DownstreamRunner.__call__
    monkeypatch.setattr(DownstreamRunner, "__call__", lambda self, batch: computed.extend(batch) or original(self, batch))
    results = run_leaderboard(tiny_suite, tmp_path / "lb", ["knorm", "snapkv"], show_progress=False)
    assert computed and {unit[1] for unit in computed} == {"snapkv"}  # the RULER prompt's other rows are not redone
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in records.items())
    assert {("ruler", "snapkv", 48), ("ruler", "knorm", 48), ("ruler", "full cache", None)} <= {
        (r["kind"], r["policy"], r["budget"]) for r in results["downstream"]}
    alone = run_leaderboard(tiny_suite, tmp_path / "alone", ["snapkv"], downstream=False, show_progress=False)
    assert alone["ranking"] == [r for r in results["ranking"] if r["policy"] == "snapkv"]  # one grid pass, any company


def test_unknown_suite_and_policy(tiny_suite, tmp_path):
    with pytest.raises(KeyError, match="known suites"):
        get_suite("huge")
    with pytest.raises(KeyError, match="known scorers"):
        run_leaderboard(dataclasses.replace(tiny_suite, sources=("prose",)), tmp_path / "lb", ["nope"], downstream=False,
                        show_progress=False)


def test_suite_makes_only_the_trace_sets_asked_for(tiny_suite):
    prose = tiny_suite.traces(show_progress=False, only=("prose",))
    assert list(prose) == ["prose"] and len(prose["prose"]) == 1
    assert not (tiny_suite.directory() / "ruler").exists()
    with pytest.raises(ValueError, match="suite 'tiny' has no trace set 'code'; its sets: ruler, prose"):
        tiny_suite.traces(show_progress=False, only=("code",))


def test_validation_texts_are_training_split_and_made_once(tiny_suite):
    texts = tiny_suite.validation_traces("prose", n=1, seed=11, show_progress=False)
    assert texts.directory.parent.name == "validation" and texts.directory.name == "prose-s11-n1"
    assert texts.manifest["params"] | {"model": None} == {"source": "prose", "split": "train", "n": 1, "length": 256,
                                                          "seed": 11, "model": None}
    again = tiny_suite.validation_traces("prose", n=1, seed=11, show_progress=False)
    assert again.manifest["created"] == texts.manifest["created"]  # reused, not made again


def test_ruler_prompt_ends_with_the_answer_prefix(tiny_suite, tiny_model_dir):
    from transformers import AutoTokenizer

    from kvp_gym.eval.downstream import answer_prefix_end

    trace = tiny_suite.traces(show_progress=False)["ruler"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = answer_prefix_end(tokenizer, trace)
    assert tokenizer.decode(trace.tokens[trace.meta["answer_token"] : end]) == "The special magic number is "
    assert tokenizer.decode(trace.tokens[end:]).startswith(trace.meta["answer"][0])


def test_a_suite_of_held_out_text_only_reports_perplexity(tiny_suite, tmp_path):
    suite = dataclasses.replace(tiny_suite, sources=("drama",), ppl_sources=("drama",), budgets=(),
                                budget_fractions=(0.25,))
    results = run_leaderboard(suite, tmp_path / "lb", ["tova", "oracle"], show_progress=False)
    kinds = {(r["kind"], r["source"], r["policy"], r["budget"]) for r in results["downstream"]}
    assert kinds == {("ppl", "drama", "full cache", None), ("ppl", "drama", "tova", "25%"),
                     ("ppl", "drama", "future oracle", "25%")}
    markdown = write_report(results, tmp_path / "lb").read_text()
    assert "Perplexity" in markdown and "drama" in markdown and "RULER accuracy" not in markdown
