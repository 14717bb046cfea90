"""KVP's per-head network (agents.kvp_scorer), the importance store and the distillation agent."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from agents.distill import DistillAgent, DistillConfig, distill_loss
from agents.kvp_scorer import INPUTS, PerHeadKVPScorer, log_bucket, view_attention_features
from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.checkpoint import load_scorer, read_header, save_scorer
from kvp_gym.models import ModelSpec
from kvp_gym.scorers import ScoringView
from kvp_gym.utility import future_importance
from kvp_gym.utility.store import ImportanceStore, trace_statistics


def view_of(keys: torch.Tensor, layer: int, attention: bool = False) -> ScoringView:
    """A view [1, H, N, d] of one layer with entries at positions 0..N-1."""
    _, h, n, d = keys.shape
    extra = {}
    if attention:
        extra = {
            "attention": torch.rand(1, h, 2, n),
            "queries": torch.randn(1, h, 2, 8, d),
            "query_positions": torch.arange(n - 8, n)[None],
        }
    return ScoringView(
        keys=keys, values=keys.flip(-1), positions=torch.arange(n)[None], mask=torch.ones(1, n, dtype=torch.bool),
        layer=torch.tensor([layer]), kv_heads=torch.arange(h)[None], num_layers=3, num_kv_heads=h, **extra,
    )


def test_shapes_needs_and_parameter_count() -> None:
    scorer = PerHeadKVPScorer(3, 2, 16, width=32)
    assert scorer.trainable and scorer.needs == frozenset()
    assert scorer.score(view_of(torch.randn(1, 2, 40, 16), layer=1)).shape == (1, 2, 40)
    with_attention = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention", window=8)
    assert with_attention.needs == {"attention", "queries"}
    assert with_attention.score(view_of(torch.randn(1, 2, 40, 16), 1, attention=True)).shape == (1, 2, 40)
    # KVP's width on SmolLM2's head_dim: key/value projections, 2 x 256 hidden, 2 x 32 position embeddings
    per_head = sum(p.numel() for p in PerHeadKVPScorer(1, 1, 64).parameters())
    assert per_head == 2 * (64 * 256 + 256) + 2 * 32 * 256 + 2 * (256 * 256 + 256) + 256 + 1
    # with attention inputs, the untrained scorer ranks exactly as normalised H2O plus a near-constant
    untrained = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention", window=8)
    torch.nn.init.zeros_(untrained.out_w)
    view = view_of(torch.randn(1, 2, 40, 16), 1, attention=True)
    h2o = view.attention.mean(2) / (40 - torch.arange(40)).float()
    torch.testing.assert_close(untrained.score(view), torch.log(h2o + 1e-6))
    # the last query's attention is a third input; untrained, the ranking is still normalised H2O
    with_last = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention+last", window=8)
    assert with_last.needs == {"attention", "queries"} and with_last.attention_w.shape == (6, 3, 32)
    torch.nn.init.zeros_(with_last.out_w)
    torch.testing.assert_close(with_last.score(view), torch.log(h2o + 1e-6))
    last = torch.stack([
        torch.stack([torch.softmax(view.queries[0, head, g, -1] @ view.keys[0, head].T / 4.0, -1) for g in range(2)]).mean(0)
        for head in range(2)
    ])  # the last query (position 39) sees all 40 keys; sqrt(head_dim) = 4
    torch.testing.assert_close(view_attention_features(view, 8, ("h2o", "window", "last"))[0, ..., 2],
                               torch.log(last + 1e-6) / 5.0)
    # the window's and the last query's votes alone: no attention sum, and untrained it ranks by the window's vote
    votes_only = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+window+last", window=8)
    assert votes_only.needs == {"queries"} and votes_only.attention_w.shape == (6, 2, 32)
    torch.nn.init.zeros_(votes_only.out_w)
    window = torch.stack([
        torch.stack([torch.softmax(view.queries[0, head, g] @ view.keys[0, head].T / 4.0 + torch.triu(
            torch.full((8, 40), -math.inf), diagonal=33), -1).sum(0) for g in range(2)]).mean(0)
        for head in range(2)
    ])  # query t of the last 8 (positions 32..39) sees keys up to its own position
    torch.testing.assert_close(votes_only.score(view)[0], torch.log(window + 1e-6))
    # the pooled window vote: the mean over the 5 neighbours in position order, zeros beyond the ends
    with_pool = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention+last+pool", window=8)
    assert with_pool.needs == {"attention", "queries"} and with_pool.attention_w.shape == (6, 4, 32)
    padded = torch.cat([torch.zeros(2, 2), window, torch.zeros(2, 2)], -1)
    neighbours = torch.stack([padded[:, i : i + 5].sum(-1) / 5 for i in range(40)], -1)
    torch.testing.assert_close(view_attention_features(view, 8, ("window_pool",))[0, ..., 0],
                               torch.log(neighbours + 1e-6) / 5.0)
    with pytest.raises(ValueError, match="inputs must be one of"):
        PerHeadKVPScorer(3, 2, 16, inputs="queries")


def test_each_head_runs_its_own_agent() -> None:
    scorer = PerHeadKVPScorer(3, 2, 16, width=32, seed=1)
    keys = torch.randn(1, 2, 20, 16)
    both = scorer.score(view_of(keys, layer=2))
    alone = scorer.score(view_of(keys[:, 1:], layer=2).__class__(**{**view_of(keys[:, 1:], layer=2).__dict__, "kv_heads": torch.tensor([[1]]), "num_kv_heads": 2}))
    torch.testing.assert_close(both[:, 1], alone[:, 0])
    assert not torch.allclose(scorer.score(view_of(keys, layer=0)), both)


def test_log_buckets() -> None:
    assert log_bucket(torch.tensor([0, 1, 2, 3, 7, 10**9])).tolist() == [0, 2, 3, 4, 6, 31]


def test_save_load_round_trip(tmp_path: Path) -> None:
    scorer = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention", window=8, heads=[(0, 1), (2, 0)], seed=3)
    spec = ModelSpec(name="toy", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4)
    path = save_scorer(scorer, tmp_path, registry_name=scorer.registry_name, config=scorer.config(), model_spec=spec,
                       protected={"sink": 4, "recent": 16}, training={})
    loaded = load_scorer(path, expect_spec=spec)
    view = view_of(torch.randn(1, 2, 30, 16), layer=2, attention=True)
    view = ScoringView(**{**view.__dict__, "keys": view.keys[:, :1], "values": view.values[:, :1], "attention": view.attention[:, :1],
                          "queries": view.queries[:, :1], "kv_heads": torch.tensor([[0]])})
    torch.testing.assert_close(loaded.score(view), scorer.score(view))
    assert scorers.is_trainable("kvp-net")


def test_h2o_layers_rank_as_normalised_h2o_there_and_ship_in_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.shipped import ship

    torch.manual_seed(0)
    scorer = PerHeadKVPScorer(3, 2, 16, width=32, inputs="kv+attention+last+pool", window=8, seed=1)
    views = [view_of(torch.randn(1, 2, 40, 16), layer, attention=True) for layer in (1, 2)]
    both = ScoringView(**{name: torch.cat([getattr(view, name) for view in views]) for name in
                          ("keys", "values", "positions", "mask", "layer", "kv_heads", "attention", "queries", "query_positions")},
                       num_layers=3, num_kv_heads=2)
    save_scorer(scorer, tmp_path / "run", registry_name=scorer.registry_name, config=scorer.config(),
                model_spec=ModelSpec(name="toy", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4),
                protected={"sink": 4, "recent": 16}, training={})
    deferring = load_scorer(ship(tmp_path / "run", tmp_path / "shipped.safetensors", h2o_layers=[1]))
    assert deferring.h2o_layers == [1] and read_header(tmp_path / "shipped.safetensors").config["h2o_layers"] == [1]
    scores, own = deferring.score(both), scorer.score(both)
    h2o = scorers.get("h2o-norm").score(both)
    torch.testing.assert_close(scores[0], torch.log(h2o[0] + 1e-6))  # layer 1: normalised H2O's ranking
    torch.testing.assert_close(scores[1], own[1], atol=1e-2, rtol=1e-2)  # layer 2: its agents (float16 weights)
    assert not torch.allclose(own[0], torch.log(h2o[0] + 1e-6), atol=1e-2)
    with monkeypatch.context() as patch:  # a view of a deferred layer alone (as the cache scores) runs no agent
        patch.setattr(deferring, "network", None)
        torch.testing.assert_close(deferring.score(views[0]), scores[:1])
    agents_only = deferring.with_h2o_layers([])  # the same weights, its agents in every layer
    torch.testing.assert_close(agents_only.score(both)[0], own[0], atol=1e-2, rtol=1e-2)
    mlp = scorers.get("mlp", num_layers=3, num_kv_heads=2, head_dim=16)
    save_scorer(mlp, tmp_path / "mlp", registry_name="mlp", config=mlp.config(), model_spec=read_header(tmp_path / "run").model_spec,
                protected={"sink": 4, "recent": 16}, training={})
    with pytest.raises(ValueError, match="h2o_layers needs a kvp-net run"):
        ship(tmp_path / "mlp", tmp_path / "other.safetensors", h2o_layers=[0])
    with pytest.raises(ValueError, match="h2o_layers needs inputs that read normalised H2O"):
        PerHeadKVPScorer(3, 2, 16, inputs="kv+window+last", h2o_layers=[0])
    with pytest.raises(ValueError, match=r"h2o_layers must be layers of the model \(0..2\)"):
        PerHeadKVPScorer(3, 2, 16, inputs="kv+attention", h2o_layers=[3])


def test_drives_the_evicting_cache(tiny_model_dir: Path) -> None:
    from kvp_gym.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    spec = ModelSpec.from_config(model.config, "tiny")
    ids = torch.randint(3, 1000, (2, 60), generator=torch.Generator().manual_seed(0))
    for inputs in INPUTS:
        scorer = PerHeadKVPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, width=16, inputs=inputs, window=8)
        cache = EvictingCache(scorer, budget=32, config=model.config)
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)  # the compression happens at the next forward
        assert cache.layers[0].keys.shape[2] == 33
        if "h2o" not in scorer.statistics:  # the prefill summed no attention: that is the second pass it saves
            assert all(layer.attention is None for layer in cache.layers)


def test_trace_statistics_match_their_definitions(tiny_traces) -> None:
    trace = tiny_traces[0]
    stats = trace_statistics(trace, (40, 64), window=8)
    for layer in range(trace.spec.num_layers):
        for head in range(trace.spec.num_kv_heads):
            torch.testing.assert_close(stats["imp.40"][layer, head], future_importance(trace, layer, head, 40, agg="max"))
            torch.testing.assert_close(stats["imp_mean.64"][layer, head], future_importance(trace, layer, head, 64, agg="mean"))
    # normalised H2O and the window vote, written out query by query
    q, k = trace.q(1), trace.k(1)
    group = q.shape[0] // k.shape[0]
    n, head = 40, 1
    h2o, window, last = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for g in range(head * group, (head + 1) * group):
        for j in range(n):
            probs = torch.softmax(q[g, j] @ k[head, : j + 1].T / math.sqrt(q.shape[-1]), -1)
            h2o[: j + 1] += probs / group
            if j >= n - 8:
                window[: j + 1] += probs / group
            if j == n - 1:
                last += probs / group
    torch.testing.assert_close(stats["h2o.40"][1, head], h2o / (n - torch.arange(n)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["window.40"][1, head], window, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["last.40"][1, head], last, rtol=1e-4, atol=1e-6)
    # queries a few at a time, chunk boundaries inside the prefixes and the window: the same sums
    for chunk in (7, 16, 40):
        chunked = trace_statistics(trace, (40, 64), window=8, chunk=chunk)
        for name, value in stats.items():
            torch.testing.assert_close(chunked[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"chunk {chunk} {name}: {m}")


def test_store_is_built_once_and_keeps_each_traces_fitting_prefixes(tiny_traces) -> None:
    store = ImportanceStore.build(tiny_traces, (40, 64), window=8, show_progress=False)
    files = sorted(store.directory.glob("seq_*.safetensors"))
    assert len(store) == len(tiny_traces) == len(files)
    stamp = files[0].stat().st_mtime_ns
    assert ImportanceStore.build(tiny_traces, (64, 40), window=8, show_progress=False).directory == store.directory
    assert files[0].stat().st_mtime_ns == stamp
    assert store.load(0)["imp.64"].shape == (2, 2, 64)
    # a prefix with no future in a trace (the traces have 96 tokens) is left out of that trace's prefixes
    longer = ImportanceStore.build(tiny_traces, (40, 64, 200), window=8, show_progress=False)
    assert [longer.prefixes_of(i) for i in range(len(longer))] == [(40, 64)] * len(tiny_traces)
    assert set(longer.load(0)) == set(store.load(0))
    with pytest.raises(ValueError, match="longer than a prefix of"):
        ImportanceStore.build(tiny_traces, (200,), window=8, show_progress=False)
    with pytest.raises(ValueError, match="prefix 4 is shorter than the query window 8"):
        ImportanceStore.build(tiny_traces, (4, 40), window=8, show_progress=False)


class WithQuestions:
    """A trace set whose traces' questions and answers start at the given tokens (None: none)."""

    def __init__(self, traces, questions: list[int | None], answers: list[int | None], directory: Path) -> None:
        self.traces, self.questions, self.answers, self.directory = traces, questions, answers, directory
        self.spec, self.lengths = traces.spec, traces.lengths

    def __len__(self) -> int:
        return len(self.traces)

    def __getitem__(self, index: int):
        trace = copy.copy(self.traces[index])  # the set's own trace object stays as it is
        trace.meta = {**trace.meta, "question_token": self.questions[index], "answer_token": self.answers[index]}
        return trace


def test_store_marks_add_each_traces_question_and_answer_prefixes(tiny_traces, tmp_path: Path) -> None:
    marked = WithQuestions(tiny_traces, [70, None, 96], [80, None, None], tmp_path)  # 96 = the length: no future
    store = ImportanceStore.build(marked, (40, 64), window=8, show_progress=False, marks=("question",))
    assert [store.prefixes_of(i) for i in range(3)] == [(40, 64, 70), (40, 64), (40, 64)]
    stats = store.load(0)
    reference = trace_statistics(tiny_traces[0], (70,), window=8)
    torch.testing.assert_close(stats["imp.70"].float(), reference["imp.70"], rtol=1e-3, atol=1e-3)
    assert "imp.70" not in store.load(1)
    both = ImportanceStore.build(marked, (40, 64), window=8, show_progress=False, marks=("answer", "question"))
    assert both.prefixes_of(0) == (40, 64, 70, 80) and both.directory != store.directory
    # a store without marks lives in its own directory
    assert ImportanceStore.build(marked, (40, 64), window=8, show_progress=False).directory != store.directory
    with pytest.raises(ValueError, match="marks must be among"):
        ImportanceStore.build(marked, (40, 64), window=8, show_progress=False, marks=("end",))

    agent_config = DistillConfig(prefixes="40,64,question,answer", tokens=16, window=8)
    scorer = PerHeadKVPScorer(2, 2, tiny_traces.spec.head_dim, width=8, inputs="kv+attention+last", window=8)
    agent = DistillAgent(scorer, [marked], {}, agent_config, total_steps=1)
    agent.reseed(0)
    drawn = {int(agent.sample()["n"]) for _ in range(80)}
    assert drawn == {40, 64, 70, 80}
    assert math.isfinite(agent.update()["train/distill_loss"])
    # the pooled window vote is pooled over the whole prefix, then drawn, as a cache view of that prefix pools it
    pooling = PerHeadKVPScorer(2, 2, tiny_traces.spec.head_dim, width=8, inputs="kv+attention+last+pool", window=8)
    pooling_agent = DistillAgent(pooling, [marked], {}, agent_config, total_steps=1)
    pooling_agent.reseed(1)
    batch = pooling_agent.sample()
    pooling_agent.reseed(1)
    pick = int(torch.randint(len(pooling_agent.examples), (1,), generator=pooling_agent.generator))
    window = both.load(pooling_agent.examples[pick][1])[f"window.{int(batch['n'])}"].float()  # [L, Hkv, n]
    padded = torch.nn.functional.pad(window, (2, 2))
    neighbours = torch.stack([padded[..., i : i + 5].mean(-1) for i in range(window.shape[-1])], -1)
    layers, kv_heads = pooling_agent.heads[:, 0], pooling_agent.heads[:, 1]
    torch.testing.assert_close(batch["window_pool"], neighbours[layers, kv_heads][:, batch["positions"][0]])
    assert math.isfinite(pooling_agent.update()["train/distill_loss"])
    with pytest.raises(ValueError, match="prefixes: expected token counts"):
        DistillAgent(scorer, [marked], {}, DistillConfig(prefixes="40,last"), total_steps=1)


def test_set_weights_draw_each_trace_set_that_much_more(tiny_traces) -> None:
    scorer = PerHeadKVPScorer(2, 2, tiny_traces.spec.head_dim, width=8)

    def drawn_sets(weights: str) -> list[int]:
        agent = DistillAgent(scorer, [tiny_traces, tiny_traces], {}, DistillConfig(prefixes="40", window=8, set_weights=weights),
                             total_steps=1)
        agent.reseed(0)
        drawn = [agent.draw()[0] for _ in range(400)]
        return [drawn.count(s) for s in range(2)]

    assert drawn_sets("0,1") == [0, 400]
    assert 265 <= drawn_sets("3,1")[0] <= 335  # 3:1: 300 of 400, +- 4 standard deviations (8.7)
    for bad in ("1", "1,x", "1,-1", "0,0", "1,nan", "1,inf"):
        with pytest.raises(ValueError, match="set_weights"):
            DistillAgent(scorer, [tiny_traces, tiny_traces], {}, DistillConfig(prefixes="40", window=8, set_weights=bad), total_steps=1)


def test_distill_losses() -> None:
    target = torch.tensor([[0.0, 1.0, 3.0, 10.0]])
    perfect = torch.log(target + 1e-3) + 5.0
    assert distill_loss("log-mse", perfect, target) < 1e-10
    assert distill_loss("log-mse", perfect.flip(-1), target) > 1.0
    assert distill_loss("listnet", torch.log(target + 1e-9), target) < distill_loss("listnet", -target, target)
    assert distill_loss("pairwise", target, target) == 0.0
    with pytest.raises(ValueError, match="loss must be one of"):
        distill_loss("mse", perfect, target)


def test_distill_target_power_is_the_target_raised_to_it(tiny_traces) -> None:
    spec = tiny_traces.spec
    scorer = PerHeadKVPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, width=8, inputs="kv", window=8)
    targets = []
    for power in (1.0, 0.5):
        config = DistillConfig(prefixes="48,64", tokens=16, window=8, target="imp_vnorm", power=power)
        agent = DistillAgent(scorer, [tiny_traces], {}, config, total_steps=1)
        agent.reseed(3)
        targets.append(agent.sample()["target"])
    torch.testing.assert_close(targets[1], targets[0].sqrt())


@pytest.mark.parametrize("inputs", INPUTS)
def test_distillation_learns_the_ranking(tiny_traces, inputs: str) -> None:
    spec = tiny_traces.spec
    torch.manual_seed(0)
    scorer = PerHeadKVPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, width=32, inputs=inputs, window=8)
    config = DistillConfig(prefixes="48,64,80", tokens=32, window=8, lr=3e-3, warmup=5)
    agent = DistillAgent(scorer, [tiny_traces], {}, config, total_steps=120)
    agent.reseed(0)
    losses = [agent.update()["train/distill_loss"] for _ in range(120)]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_train_distill_validates_downstream_and_keeps_the_best(tiny_traces, tmp_path: Path) -> None:
    from agents.train import BEST_DIR, TrainConfig, train

    config = TrainConfig(
        agent="distill", traces=str(tiny_traces.directory), out=str(tmp_path / "run"), steps=6, all_heads=True,
        arch="kvp-net", arch_options={"width": 16, "inputs": "kv+attention", "window": 8},
        agent_options={"prefixes": "48,64,80", "tokens": "16", "window": "8"},
        val_traces=str(tiny_traces.directory), val_every=3, val_texts=1, save_every=3, progress=False,
    )
    result = train(config)
    assert sorted(result.evaluations) == [0, 3, 6]  # the starting point, then every val_every steps
    assert all(value > 0 for value in result.evaluations[6].values())
    best_step = min(result.evaluations, key=lambda step: result.evaluations[step]["val/ppl_ratio"])
    assert read_header(tmp_path / "run" / BEST_DIR).training["step"] == best_step
    best = load_scorer(tmp_path / "run" / BEST_DIR)
    assert isinstance(best, PerHeadKVPScorer) and best.inputs == "kv+attention"
    assert train(config).scorer_path == result.scorer_path  # finished: a rerun returns at once
    with pytest.raises(ValueError, match="not a trainable architecture"):
        train(TrainConfig(agent="distill", traces=str(tiny_traces.directory), out=str(tmp_path / "x"), steps=1,
                          all_heads=True, arch="knorm", progress=False))


@pytest.mark.parametrize("name, options", [("h2o-norm", {}), ("snapkv", {"window_size": 80})])
def test_validation_forks_one_prefill_into_what_fresh_prefills_give(tiny_traces, name, options) -> None:
    """The validator runs each prefix once and forks it per budget and validation: its ratios are those of a fresh
    prefill per budget, for a scorer reading attention sums and for one whose query window outgrows the recording's."""
    from agents.validation import DownstreamValidator
    from kvp_gym.eval.downstream import continuation_nll
    from kvp_gym.models import load_model
    from kvp_gym.ranking import Protected

    protected = Protected(sink=2, recent=4)
    validator = DownstreamValidator(tiny_traces, protected, fractions=(0.25, 0.5), texts=2)
    scorer = scorers.get(name, **options)
    model, _ = load_model(tiny_traces.manifest["params"]["model"])

    def fresh(scorer, fraction):
        sums = [continuation_nll(model, trace, prefix, scorer, None if fraction is None else max(6, int(fraction * prefix)), 2, 4)
                for trace, prefix in zip(validator.traces, validator.prefixes)]
        return sum(nll for nll, _ in sums) / sum(count for _, count in sums)

    ratios = validator(scorer)
    for fraction in (0.25, 0.5):
        assert ratios[f"val/ppl_ratio@{fraction:g}"] == pytest.approx(math.exp(fresh(scorer, fraction) - fresh(None, None)), rel=1e-5)
    assert validator(scorer) == ratios


def test_recipes_name_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.recipes as recipes
    from agents.recipes import RECIPES, Recipe, get_recipe

    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    roots, stores = [], []
    monkeypatch.setattr(Recipe, "trace_sets",
                        lambda self, show_progress=True, root=None, workers=0: roots.append(root) or (["/t/prose", "/t/ruler"], "/t/val"))
    monkeypatch.setattr(recipes, "TraceDataset", lambda directory: directory)
    monkeypatch.setattr(recipes, "build_stores", lambda traces, config, show_progress, workers: stores.append((traces, config)))
    config = RECIPES["smollm2"].config("/runs/kvp", progress=False)
    # the importance stores of the training sets are made with the trace sets, at the agent's prefixes
    assert stores[0][0] == ["/t/prose", "/t/ruler"] and stores[0][1].prefixes == "256,512,768,question,answer"
    assert (config.agent, config.arch, config.all_heads, config.val_traces) == ("distill", "kvp-net", True, "/t/val")
    assert config.arch_options == {"width": 112, "inputs": "kv+attention+last+pool", "h2o_layers": (0,)}  # as `kvp` ships
    assert config.traces == ["/t/prose", "/t/ruler"]
    assert config.agent_options["prefixes"] == "256,512,768,question,answer"
    assert config.agent_options["loss"] == "listnet" and config.agent_options["target"] == "imp_vnorm"
    # validation reads every text of the recipe's validation set (the quick one has 2), traces go where asked
    assert config.val_texts == 4 and RECIPES["smollm2-quick"].config("/runs/q", traces_root="/d/traces").val_texts == 2
    assert roots == [None, "/d/traces"]
    # the fast recipe reads no attention sum and trains on the smollm2 recipe's trace sets
    fast = RECIPES["smollm2-fast"]
    fast_config = fast.config("/runs/f")
    assert fast_config.arch_options == {"width": 112, "inputs": "kv+window+last"}
    assert fast_config.agent_options["prefixes"] == "256,512,768,question"  # as kvp-fast was trained
    assert fast.traces_root() == RECIPES["smollm2"].traces_root() != RECIPES["smollm2-quick"].traces_root()
    # kvp-fast's sets are study 7's; kvp's add short RULER tasks
    assert RECIPES["smollm2"].train_sets == (*fast.train_sets, recipes.TrainSet("ruler", 48, seed=2, length=512))
    # the long recipe: kvp's sets plus 2k- and 4k-token prose and docs, prefixes up to 3072 (a 1k trace keeps 256-768)
    long = RECIPES["smollm2-long"]
    assert long.traces_root() == RECIPES["smollm2"].traces_root()
    assert long.train_sets[: len(RECIPES["smollm2"].train_sets)] == RECIPES["smollm2"].train_sets
    assert {spec.length_in(long.length) for spec in long.train_sets} == {512, 1024, 2048, 4096}
    assert long.config("/runs/l").agent_options["prefixes"] == "256,512,768,1024,1536,2048,3072,question,answer"


def test_recipe_sets_of_one_source_differ_by_seed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import agents.recipes as recipes

    made, on_workers = [], []

    def fake_generate(directory, source, n, length, split, model_name, seed=None, show_progress=True, workers=0,
                      dialogue_batch=1):
        made.append((directory.name, source, n, length, seed, split) + ((dialogue_batch,) if dialogue_batch > 1 else ()))
        on_workers.append(workers)
        return type("Made", (), {"directory": directory})()

    monkeypatch.setattr(recipes, "generate_traces", fake_generate)
    recipe = recipes.Recipe("r", train_sets=(recipes.TrainSet("ruler", 8), recipes.TrainSet("ruler", 4, seed=1),
                                             recipes.TrainSet("docs", 2), recipes.TrainSet("ruler", 3, seed=2, length=512),
                                             recipes.TrainSet("prose", 1, length=1024),
                                             recipes.TrainSet("dialogue", 4, seed=1, batch=2)), val_set=("prose", 2), steps=1)
    train, val = recipe.trace_sets(show_progress=False, root=tmp_path, workers=2)
    names = ("ruler-train", "ruler-train-s1", "docs-train", "ruler512-train-s2", "prose-train", "dialogue-train-s1-b2")
    assert train == [str(tmp_path / name) for name in names]
    assert made == [("ruler-train", "ruler", 8, 1024, 0, "train"), ("ruler-train-s1", "ruler", 4, 1024, 1, "train"),
                    ("docs-train", "docs", 2, 1024, 0, "train"), ("ruler512-train-s2", "ruler", 3, 512, 2, "train"),
                    ("prose-train", "prose", 1, 1024, 0, "train"), ("dialogue-train-s1-b2", "dialogue", 4, 1024, 1, "train", 2),
                    ("prose-val", "prose", 2, 1024, 7, "train")]
    assert val == str(tmp_path / "prose-val")
    # the model writes dialogues on the workers; every other set is prefilled in this process, on all its threads
    assert on_workers == [0, 0, 0, 0, 0, 2, 0]


@pytest.mark.slow
def test_shipped_policy_drives_smollm2(real_traces) -> None:
    from kvp_gym.eval.downstream import continuation_nll
    from kvp_gym.models import load_model

    scorer = scorers.get("kvp")
    assert isinstance(scorer, PerHeadKVPScorer) and not scorers.is_trainable("kvp")
    assert scorer.needs == {"attention", "queries"} and len(scorer.heads) == 90
    model, _ = load_model("smollm2-135m")
    trace = real_traces[0]
    full, count = continuation_nll(model, trace, 192, None, None, 4, 16)
    kept, _ = continuation_nll(model, trace, 192, scorer, 48, 4, 16)
    assert math.isfinite(kept) and kept / count < full / count + 1.0


def test_leaderboard_records_follow_the_weights() -> None:
    from kvp_gym.eval.leaderboard import scorer_identity

    first, same = PerHeadKVPScorer(3, 2, 16, width=8), PerHeadKVPScorer(3, 2, 16, width=8)
    assert scorer_identity(first) == scorer_identity(same)
    with torch.no_grad():
        same.out_b += 1.0
    assert scorer_identity(first) != scorer_identity(same)
