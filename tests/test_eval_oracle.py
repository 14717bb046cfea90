"""The downstream oracle (kvp_gym.eval.oracle), fractional budgets and the v2 suites."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hand_traces import HandTrace
from kvp_gym.cache import EvictingCache
from kvp_gym.eval.leaderboard import FULL_CACHE, downstream_units
from kvp_gym.eval.oracle import ORACLE, TraceOracle, trace_importance
from kvp_gym.eval.suite import SUITES, fraction_label, get_suite, resolve_budget
from kvp_gym.scorers import get
from kvp_gym.utility import future_importance

SINK, RECENT = 2, 3


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_the_oracle_keeps_the_top_b_of_the_written_out_importance():
    model, n, budget = tiny_model(), 30, 12
    importance = torch.rand(2, 2, n, generator=torch.Generator().manual_seed(3))  # [L, Hkv, n]
    cache = EvictingCache(TraceOracle(importance), budget, config=model.config, sink=SINK, recent=RECENT)
    model(torch.randint(0, 128, (1, n)), cache=cache, use_cache=True)
    cache.flush()
    for layer in range(2):
        for head in range(2):
            kept = sorted(p for p in cache.layers[layer].positions[0, head].tolist() if p >= 0)
            middle = list(range(SINK, n - RECENT))
            scores = [float(importance[layer, head, i]) for i in middle]
            top = sorted(m for _, m in sorted(zip(scores, middle), reverse=True)[: budget - SINK - RECENT])
            assert kept == sorted([*range(SINK), *top, *range(n - RECENT, n)])


def test_trace_importance_is_the_future_importance_of_every_head():
    torch.manual_seed(1)
    trace = HandTrace(torch.randn(4, 20, 8), torch.randn(2, 20, 8))
    table = trace_importance(trace, 12)
    assert table.shape == (1, 2, 12)
    for head in range(2):
        torch.testing.assert_close(table[0, head], future_importance(trace, 0, head, 12))
    torch.testing.assert_close(trace_importance(trace, 12, chunk=3), table)


def test_the_oracle_reads_no_live_input_and_keeps_positions_past_its_prefix():
    oracle = TraceOracle(torch.tensor([[[0.1, 0.9, 0.5]]]))
    assert oracle.needs == frozenset()
    from kvp_gym.scorers import ScoringView

    view = ScoringView(keys=torch.zeros(1, 1, 4, 2), values=torch.zeros(1, 1, 4, 2), positions=torch.tensor([[0, 1, 2, 3]]),
                       mask=torch.ones(1, 4, dtype=torch.bool), layer=torch.tensor([0]), kv_heads=torch.tensor([[0]]),
                       num_layers=1, num_kv_heads=1)
    scores = oracle.score(view)[0, 0]
    assert scores[:3].tolist() == [0.1, 0.9, 0.5] or torch.allclose(scores[:3], torch.tensor([0.1, 0.9, 0.5]))
    assert scores[3] > scores[:3].max()


def test_fractional_budgets_and_suites():
    assert fraction_label(0.1) == "10%" and fraction_label(0.25) == "25%"
    assert resolve_budget("25%", 768, 4, 16) == 192
    assert resolve_budget("10%", 100, 4, 16) == 20  # never below the protected tokens
    assert resolve_budget(64, 768, 4, 16) == 64
    full, demo = get_suite("full"), get_suite("demo")
    assert full.id == "full-v1" and demo.id == "demo-v1" and full.budget_settings() == [64, 128, 256, 512]
    assert [key for key, *_ in full.trace_sets()] == list(full.sources)
    v2 = get_suite("full-v2")
    assert v2.id == "full-v2" and v2.directory() != full.directory()
    assert v2.trace_count("dialogue") >= 32 and v2.trace_count("prose") >= 32
    assert sum(n for key, source, n, _ in v2.trace_sets() if source == "ruler") >= 120
    assert {"10%", "25%", "50%"} <= set(v2.budget_settings())
    quick = get_suite("quick")
    assert quick.budget_settings() == ["10%", "25%"]
    assert quick.id == "quick-v2" and quick.placements == ("outside",) and get_suite("quick-v1").placements == ("outside", "inside")
    assert len({s.hash() for s in SUITES.values()}) == len(SUITES)


def test_fields_added_later_keep_the_hash_of_earlier_suites():
    import dataclasses
    import hashlib
    import json

    full = get_suite("full")
    later = ("placements", "ruler_tasks", "policies")
    before = {key: value for key, value in full.to_dict().items() if key not in later}  # the fields it was hashed with
    assert full.hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16] == "b003596a6d1c9da7"
    for field, value in zip(later, [("outside",), ("niah_single",), ("snapkv",)]):
        assert dataclasses.replace(full, **{field: value}).hash() != full.hash()
    with pytest.raises(ValueError, match="placements"):
        dataclasses.replace(full, placements=("middle",))


def test_downstream_units_hold_the_oracle_and_every_budget_setting():
    suite = get_suite("quick")
    traces = {"ruler": [0, 1], "prose": [0], "dialogue": []}
    units = downstream_units(suite, traces, {"knorm": get("knorm")}, [ORACLE])
    policies = {unit[1] for unit in units}
    assert policies == {FULL_CACHE, "knorm", ORACLE}
    assert {unit[1] for unit in downstream_units(suite, traces, {"knorm": get("knorm")})} == {FULL_CACHE, "knorm"}
    assert {unit[4] for unit in units if unit[1] == ORACLE} == {"10%", "25%"}
    # quick runs the question outside the compressed part only: 2 budgets x 2 samples x 1 placement
    assert {unit[5] for unit in units if unit[0] == "ruler"} == {"outside"}
    assert len([u for u in units if u[1] == ORACLE and u[0] == "ruler"]) == 2 * 2 * 1
    both = downstream_units(get_suite("quick-v1"), traces, {"knorm": get("knorm")}, [ORACLE])
    assert len([u for u in both if u[1] == ORACLE and u[0] == "ruler"]) == 2 * 2 * 2


def v2_results() -> dict:
    from test_report_stats import fake_results

    results = fake_results()
    extra = []
    for record in results["downstream"]:
        if record["policy"] == "good":  # the oracle: better than every policy; a hard task the full cache fails
            nll = record["nll_sum"] - 10.0 if record["kind"] == "ppl" else None
            extra.append({**record, "policy": ORACLE, **({"nll_sum": nll} if nll is not None else {"score": 1.0})})
    for trace in range(4):
        for name in ("good", "random", "streamingllm", FULL_CACHE, ORACLE):
            for budget in ([None] if name == FULL_CACHE else [16, 32]):
                extra.append({"kind": "ruler", "policy": name, "source": "ruler", "trace": 10 + trace, "budget": budget,
                              "placement": "outside", "task": "hard", "answer": "x", "score": 0.0})
    results["downstream"] += extra
    results["suite"] = {**results["suite"], "min_task_accuracy": 0.8, "hash": "abc123"}
    results["future_only"] = sorted({*results["future_only"], ORACLE})
    results["downstream_oracle"], results["learned"] = ORACLE, ["good"]
    return results


def test_v2_report_oracle_row_headroom_and_calibration(tmp_path):
    import json

    import pytest

    from kvp_gym.eval.report import calibration, downstream_statistics, headroom, write_report

    results = v2_results()
    calibrated = calibration(results)
    assert calibrated["task_accuracy"]["hard"] == 0.0 and calibrated["scored_tasks"] == ["niah"]
    stats = downstream_statistics(results)
    assert stats["perplexity"][ORACLE][16]["normalized"] == pytest.approx(1.0)  # the oracle is the 1
    rows = {(r["metric"], r["budget"], r["policy"]): r for r in headroom(results)}
    good = rows["perplexity", 16, "good"]
    assert good["best_heuristic"] == "streamingllm"  # "good" is learned: never the best heuristic
    assert good["headroom_closed"] == pytest.approx((good["best_heuristic_value"] - good["value"])
                                                    / (good["best_heuristic_value"] - good["oracle"]))
    assert good["headroom_closed_low"] <= good["headroom_closed"] <= good["headroom_closed_high"]
    assert rows["perplexity", 16, "streamingllm"]["headroom_closed"] == pytest.approx(0.0)
    markdown = write_report(results, tmp_path).read_text()
    assert "hash `abc123`" in markdown and "torch threads" in markdown
    assert f"| {ORACLE} |" in markdown and "Headroom closed" in markdown and "RULER calibration" in markdown
    assert "| hard | 4 | 0.00 [0.00, 0.00] | no |" in markdown
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["statistics"]["headroom_closed"] and saved["statistics"]["ruler_calibration"]["scored_tasks"] == ["niah"]
    assert {"perplexity.png", "normalized_score.png", "env_vs_downstream.png", "head_winners.png"} <= {
        p.name for p in tmp_path.glob("*.png")}


def test_v2_report_with_fractional_budgets(tmp_path):
    from kvp_gym.eval.report import write_report

    results = v2_results()
    for record in results["downstream"]:
        if record["budget"] is not None:
            record["budget"] = {16: "10%", 32: "25%"}[record["budget"]]
    results["suite"] = {**results["suite"], "budgets": [], "budget_fractions": [0.1, 0.25]}
    markdown = write_report(results, tmp_path).read_text()
    assert "b=10%" in markdown and "b=25%" in markdown


def test_runner_sharing_one_prefill_per_prompt_gives_each_unit_its_own_record(tiny_suite):
    """A DownstreamRunner forks one prefill per prompt for every policy and budget and answers a RULER
    batch as one batch of rows; a fresh runner per unit prefills and answers for that unit alone. The
    records are identical."""
    from kvp_gym.eval.downstream import recording_window
    from kvp_gym.eval.leaderboard import DownstreamRunner, unit_batches

    traces = tiny_suite.traces(show_progress=False)
    policies = {name: get(name) for name in ("snapkv", "h2o-norm", "streamingllm")}
    units = downstream_units(tiny_suite, traces, policies, [ORACLE])
    prompts = [(unit[0], unit[2], unit[3], unit[5]) for unit in units]
    assert sum(a != b for a, b in zip(prompts, prompts[1:])) == len(set(prompts)) - 1  # grouped by prompt
    batches = unit_batches(units)
    # a RULER batch: the full cache, then every policy and the oracle at every budget
    assert sorted(map(len, batches))[-1] == 1 + (len(policies) + 1) * len(tiny_suite.budget_settings())
    window = recording_window(policies.values())
    shared = DownstreamRunner(tiny_suite, traces, get, window)
    for batch in batches:
        records = shared(batch)
        for unit, record in zip(batch, records, strict=True):
            alone = DownstreamRunner(tiny_suite, traces, get, window)
            alone.model, alone.tokenizer = shared.model, shared.tokenizer  # the same weights object (bit-exact matmuls)
            assert alone([unit]) == [record], unit


def test_the_tuned_oracle_row_runs_where_shares_are_tuned_for_the_model(tiny_suite, monkeypatch):
    """``oracle_rows`` adds ``ORACLE_TUNED`` only for the model the oracle's shares were tuned through; the runner's
    tuned row is the oracle's ranking cut at those shares in the real cache (here far from equal), not the equal
    row's numbers."""
    import kvp_gym.eval.oracle as oracle_module
    from kvp_gym.cache.head_shares import TUNED_MODEL, HeadShares
    from kvp_gym.eval.downstream import continuation_nll, recording_window
    from kvp_gym.eval.leaderboard import DownstreamRunner, oracle_ids
    from kvp_gym.eval.oracle import ORACLE_TUNED, oracle_rows
    from kvp_gym.models import load_model

    traces = tiny_suite.traces(show_progress=False)
    spec = traces["prose"].spec
    assert oracle_rows(spec) == [ORACLE]  # the tiny model has no tuned shares
    monkeypatch.setattr(oracle_module, "tuned_policies", lambda: ["kvp", "oracle"])
    assert oracle_rows(dataclasses.replace(spec, name=TUNED_MODEL)) == [ORACLE, ORACLE_TUNED]
    shares = HeadShares(torch.tensor([0.5]), torch.tensor([[[0.55, 0.05], [0.3, 0.1]]]), "model")  # 2 layers x 2 heads
    monkeypatch.setattr(oracle_module, "tuned_head_shares", lambda policy: shares)
    units = [unit for unit in downstream_units(tiny_suite, traces, {}, [ORACLE, ORACLE_TUNED])
             if unit[0] == "ppl" and unit[4] == 48]
    assert [unit[1] for unit in units] == [ORACLE, ORACLE_TUNED]
    runner = DownstreamRunner(tiny_suite, traces, get, recording_window([]))
    equal, tuned = (runner([unit])[0] for unit in units)
    model, _ = load_model(tiny_suite.model)
    trace = traces["prose"][0]
    oracle = TraceOracle(trace_importance(trace, tiny_suite.ppl_prefix), shares)
    expected, _ = continuation_nll(model, trace, tiny_suite.ppl_prefix, oracle, 48, tiny_suite.sink, tiny_suite.recent)
    assert tuned["nll_sum"] == pytest.approx(expected, rel=1e-5) and tuned["nll_sum"] != pytest.approx(equal["nll_sum"], rel=1e-5)
    ids = oracle_ids(dataclasses.replace(spec, name=TUNED_MODEL))
    assert set(ids) == {ORACLE, ORACLE_TUNED} and ids[ORACLE] != ids[ORACLE_TUNED]


def test_the_upper_bound_of_a_cell_is_the_better_oracle_row(tmp_path):
    """With both oracle rows, each cell's 1 (normalised scores, headroom) is the better of them there."""
    from kvp_gym.eval.oracle import ORACLE_TUNED
    from kvp_gym.eval.report import downstream_statistics, headroom, reference_oracle, write_report

    assert reference_oracle({ORACLE: 4.0, ORACLE_TUNED: 3.9, "a": 3.0}, True) == ORACLE_TUNED
    assert reference_oracle({ORACLE: 0.9, ORACLE_TUNED: 0.8}, False) == ORACLE
    assert reference_oracle({"a": 1.0}, True) is None
    results = v2_results()
    tuned = [{**record, "policy": ORACLE_TUNED, "nll_sum": record["nll_sum"] - (3.0 if record["budget"] == 16 else -3.0)}
             for record in results["downstream"] if record["policy"] == ORACLE and record["kind"] == "ppl"]
    results["downstream"] += tuned
    results["future_only"] = sorted({*results["future_only"], ORACLE_TUNED})
    results["downstream_oracles"] = [ORACLE, ORACLE_TUNED]
    stats = downstream_statistics(results)["perplexity"]
    assert stats[ORACLE_TUNED][16]["normalized"] == pytest.approx(1.0) and stats[ORACLE][16]["normalized"] < 1.0
    assert stats[ORACLE][32]["normalized"] == pytest.approx(1.0) and stats[ORACLE_TUNED][32]["normalized"] < 1.0
    rows = {(r["budget"], r["policy"]): r for r in headroom(results) if r["metric"] == "perplexity"}
    assert rows[16, "good"]["oracle_row"] == ORACLE_TUNED and rows[32, "good"]["oracle_row"] == ORACLE
    assert (16, ORACLE_TUNED) not in rows and (32, ORACLE) not in rows  # the oracle rows are references, not rows
    markdown = write_report(results, tmp_path).read_text()
    assert f"| {ORACLE_TUNED} |" in markdown and "(+tuned)" in markdown
