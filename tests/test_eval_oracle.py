"""The downstream oracle (kvp_gym.eval.oracle), fractional budgets and the v2 suites."""

from __future__ import annotations

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
    assert len({s.hash() for s in SUITES.values()}) == len(SUITES)


def test_downstream_units_hold_the_oracle_and_every_budget_setting():
    suite = get_suite("quick")
    traces = {"ruler": [0, 1], "prose": [0], "dialogue": []}
    units = downstream_units(suite, traces, {"knorm": get("knorm")}, oracle=True)
    policies = {unit[1] for unit in units}
    assert policies == {FULL_CACHE, "knorm", ORACLE}
    assert {unit[4] for unit in units if unit[1] == ORACLE} == {"10%", "25%"}
    assert len([u for u in units if u[1] == ORACLE and u[0] == "ruler"]) == 2 * 2 * 2
