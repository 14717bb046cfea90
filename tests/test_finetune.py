"""Fine-tuning through the model (agents.finetune): the soft eviction, its hard limit against the real cache, the agent."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from agents.distill import distill_loss
from agents.finetune import FinetuneAgent, FinetuneConfig, continuation_loss, hard_keep_mask, prefix_cache, soft_keep_mask
from agents.kvp_scorer import PerHeadKVPScorer
from agents.mlp_scorer import PerHeadMLPScorer
from agents.train import TrainConfig, train
from kvp_gym.cache.head_shares import HeadShares
from kvp_gym.checkpoint import save_scorer
from kvp_gym.eval.downstream import continuation_nll
from kvp_gym.traces import Trace

PREFIX = 64


def _scorer(traces, h2o_layers=(0,)) -> PerHeadKVPScorer:
    spec = traces.spec
    return PerHeadKVPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, width=16,
                            inputs="kv+attention+last+pool", window=8, h2o_layers=h2o_layers)


def _agent(traces, scorer, **options) -> FinetuneAgent:
    config = FinetuneConfig(prefixes=str(PREFIX), window=8, continuation=24, **options)
    return FinetuneAgent(scorer, [traces], {}, config, total_steps=50)


def _bias(agent: FinetuneAgent, log_mask: torch.Tensor, n: int) -> torch.Tensor:
    spec = agent.model.config
    bias = torch.zeros(spec.num_hidden_layers, spec.num_key_value_heads, n)
    bias[agent.heads[:, 0], agent.heads[:, 1], agent.protected.sink : n - agent.protected.recent] = log_mask
    return bias


def _whole_prefixes(agent: FinetuneAgent, traces) -> list[tuple[Trace, dict[str, torch.Tensor]]]:
    """(trace, ``features`` batch on every unprotected entry of its prefix) for each row of the agent's store."""
    store, first, last = agent.stores[0], agent.protected.sink, PREFIX - agent.protected.recent
    return [(traces[store.indices[index]], agent.features(store, index, traces[store.indices[index]], PREFIX,
                                                          torch.arange(first, last))) for index in range(len(store))]


def test_soft_mask_keeps_the_budget_and_ignores_the_score_scale() -> None:
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    soft = soft_keep_mask(scores, 10, 1e-3)
    assert ((soft.exp() > 0.5).sum(-1) == 10).all()
    assert torch.equal(soft.exp() > 0.5, hard_keep_mask(scores, 10) == 0)
    assert torch.allclose(soft_keep_mask(3.0 * scores - 7.0, 10, 0.1), soft_keep_mask(scores, 10, 0.1), atol=1e-5)
    gentle = soft_keep_mask(scores, 10, 1.0).exp()
    assert ((gentle > 0.01) & (gentle < 0.99)).any()  # a high temperature keeps part of every entry


def test_soft_mask_cuts_each_row_at_its_own_count() -> None:
    scores = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([0, 5, 17, 40])
    soft = soft_keep_mask(scores, counts, 1e-3)
    assert torch.equal((soft.exp() > 0.5).sum(-1), counts)
    assert torch.equal(soft.exp() > 0.5, hard_keep_mask(scores, counts) == 0)
    assert torch.allclose(soft_keep_mask(scores, torch.full((4,), 10), 0.1), soft_keep_mask(scores, 10, 0.1))


def _shares(tmp_path: Path) -> Path:
    """Model-wide shares for the tiny model (2 layers x 2 KV heads), far from equal."""
    shares = torch.tensor([[0.45, 0.05], [0.3, 0.2]]).expand(2, 2, 2)
    return HeadShares(torch.tensor([0.25, 0.5]), shares.clone(), scope="model").save(tmp_path / "shares.safetensors")


def test_without_bias_the_attention_is_the_models_own(tiny_traces) -> None:
    agent = _agent(tiny_traces, _scorer(tiny_traces))
    trace, stock = tiny_traces[0], agent.model.config._attn_implementation
    loss = continuation_loss(agent.model, trace, PREFIX, torch.zeros(2, 2, PREFIX), 24)
    agent.model.config._attn_implementation = "sdpa"
    logits = agent.model(trace.tokens[None, PREFIX : PREFIX + 24], cache=prefix_cache(trace, PREFIX, agent.model.config),
                         use_cache=True).logits[0]
    agent.model.config._attn_implementation = stock
    expected = torch.nn.functional.cross_entropy(logits, trace.tokens[PREFIX + 1 : PREFIX + 25])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("fraction", [0.4, 0.6])
def test_hard_limit_is_the_evicting_cache(tiny_traces, fraction: float) -> None:
    """A -inf bias on the entries the policy drops changes the loss as the real EvictingCache changes the leaderboard's
    (the trace's fp16 keys and values against the prefill's fp32: the same change to 2%)."""
    scorer = _scorer(tiny_traces).eval()
    agent = _agent(tiny_traces, scorer)
    store, trace = agent.stores[0], tiny_traces[agent.stores[0].indices[0]]
    first, last = agent.protected.sink, PREFIX - agent.protected.recent
    budget = int(fraction * PREFIX)
    with torch.no_grad():
        batch = agent.features(store, 0, trace, PREFIX, torch.arange(first, last))
        scores = torch.where(agent.deferred[:, None], torch.log(batch["h2o"] + 1e-6), agent.network_scores(batch))
        bias = _bias(agent, hard_keep_mask(scores, budget - first - agent.protected.recent), PREFIX)
        change = continuation_loss(agent.model, trace, PREFIX, bias, trace.length) - continuation_loss(
            agent.model, trace, PREFIX, torch.zeros_like(bias), trace.length)
    nll, count = continuation_nll(agent.model, trace, PREFIX, scorer, budget, agent.protected.sink, agent.protected.recent)
    full, _ = continuation_nll(agent.model, trace, PREFIX, None, None, agent.protected.sink, agent.protected.recent)
    assert abs(nll - full) / count > 1e-4  # the eviction matters at this budget
    assert change.item() == pytest.approx((nll - full) / count, rel=0.02)


def test_with_shares_the_hard_limit_is_the_cache_with_those_shares(tiny_traces, tmp_path: Path) -> None:
    """``shares``: each head is cut at the count ``+shares`` gives it, so the hard limit is again the real cache's
    change in loss, now with the scorer carrying the shares."""
    scorer = _scorer(tiny_traces, h2o_layers=()).eval()
    agent = _agent(tiny_traces, scorer, shares=str(_shares(tmp_path)))
    assert scorer.head_shares is agent.head_shares
    assert math.isfinite(agent.update()["train/continuation_nll"])  # before the cache below switches the model's attention
    store, trace = agent.stores[0], tiny_traces[agent.stores[0].indices[0]]
    first, last = agent.protected.sink, PREFIX - agent.protected.recent
    budget = int(0.5 * PREFIX)
    counts = agent.head_counts(budget - first - agent.protected.recent, last - first)
    assert len(set(counts.tolist())) > 1 and int(counts.sum()) == len(counts) * (budget - first - agent.protected.recent)
    with torch.no_grad():
        batch = agent.features(store, 0, trace, PREFIX, torch.arange(first, last))
        bias = _bias(agent, hard_keep_mask(agent.network_scores(batch), counts), PREFIX)
        change = continuation_loss(agent.model, trace, PREFIX, bias, trace.length) - continuation_loss(
            agent.model, trace, PREFIX, torch.zeros_like(bias), trace.length)
    nll, count = continuation_nll(agent.model, trace, PREFIX, scorer, budget, agent.protected.sink, agent.protected.recent)
    full, _ = continuation_nll(agent.model, trace, PREFIX, None, None, agent.protected.sink, agent.protected.recent)
    assert change.item() == pytest.approx((nll - full) / count, rel=0.02)


def test_bad_shares_are_named(tiny_traces, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        _agent(tiny_traces, _scorer(tiny_traces), shares=str(tmp_path / "missing.safetensors"))
    wrong = HeadShares(torch.tensor([0.25]), torch.full((1, 3, 2), 1 / 6), scope="model").save(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="3 layers"):
        _agent(tiny_traces, _scorer(tiny_traces), shares=str(wrong))


def test_an_update_trains_the_agents_and_nothing_else(tiny_traces) -> None:
    scorer = _scorer(tiny_traces, h2o_layers=(0,))
    agent = _agent(tiny_traces, scorer, lr=1e-2, warmup=0)
    before = {name: value.clone() for name, value in scorer.state_dict().items()}
    model_before = [p.clone() for p in agent.model.parameters()]
    metrics = agent.update()
    assert math.isfinite(metrics["train/continuation_nll"]) and metrics["train/grad_norm"] > 0
    layer0 = [slot for slot, (layer, _) in enumerate(scorer.heads) if layer == 0]
    others = [slot for slot, (layer, _) in enumerate(scorer.heads) if layer != 0]
    after = scorer.state_dict()
    assert torch.equal(after["hidden1_w"][layer0], before["hidden1_w"][layer0])  # layer 0 is ranked by H2O: no gradient
    assert not torch.equal(after["hidden1_w"][others], before["hidden1_w"][others])
    assert all(torch.equal(p, q) for p, q in zip(agent.model.parameters(), model_before))


def test_finetuning_lowers_the_loss_it_trains_on(tiny_traces) -> None:
    scorer = _scorer(tiny_traces, h2o_layers=())
    agent = _agent(tiny_traces, scorer, lr=3e-3, warmup=0, fractions="0.5", temperature=0.5)

    def mean_loss() -> float:
        with torch.no_grad():
            losses = []
            for trace, batch in _whole_prefixes(agent, tiny_traces):
                log_mask = soft_keep_mask(agent.network_scores(batch), int(0.5 * PREFIX) - 20, 0.5)
                losses.append(continuation_loss(agent.model, trace, PREFIX, _bias(agent, log_mask, PREFIX), 24).item())
            return sum(losses) / len(losses)

    start = mean_loss()
    agent.reseed(0)
    for _ in range(40):
        agent.update()
    end = mean_loss()
    assert end < start - 1e-3


def test_the_anchor_holds_the_ranking_near_its_distillation_target(tiny_traces) -> None:
    """With ``anchor`` the update also descends distillation's loss: after the same updates from the same weights,
    the anchored scorer's ListNet loss on the training examples is lower."""
    def listnet_after(anchor: float) -> tuple[float, dict[str, float]]:
        torch.manual_seed(0)
        scorer = _scorer(tiny_traces, h2o_layers=())
        agent = _agent(tiny_traces, scorer, lr=3e-3, warmup=0, fractions="0.5", loss="listnet", anchor=anchor)
        agent.reseed(0)
        metrics = [agent.update() for _ in range(15)][-1]
        with torch.no_grad():
            losses = [distill_loss("listnet", agent.network_scores(batch), batch["target"]).item()
                      for _, batch in _whole_prefixes(agent, tiny_traces)]
        return sum(losses) / len(losses), metrics

    free, free_metrics = listnet_after(0.0)
    anchored, anchored_metrics = listnet_after(10.0)
    assert "train/anchor_loss" not in free_metrics and anchored_metrics["train/anchor_loss"] > 0
    assert anchored < free - 1e-3


def test_anchor_sets_scale_the_anchor_per_trace_set(tiny_traces) -> None:
    """``anchor_sets=0,1``: the updates that draw set 0 carry no anchor, those that draw set 1 do."""
    def anchored_updates(set_weights: str) -> int:
        config = FinetuneConfig(prefixes=str(PREFIX), window=8, continuation=24, anchor=1.0, anchor_sets="0,1",
                                set_weights=set_weights)
        agent = FinetuneAgent(_scorer(tiny_traces, h2o_layers=()), [tiny_traces, tiny_traces], {}, config, total_steps=5)
        return sum("train/anchor_loss" in agent.update() for _ in range(3))

    assert anchored_updates("1,0") == 0
    assert anchored_updates("0,1") == 3
    for bad in ("1", "0,0", "1,-1", "x,1"):
        with pytest.raises(ValueError, match="anchor_sets"):
            FinetuneAgent(_scorer(tiny_traces), [tiny_traces, tiny_traces], {},
                          FinetuneConfig(prefixes=str(PREFIX), window=8, anchor=1.0, anchor_sets=bad), total_steps=1)


def test_bad_options_are_named(tiny_traces) -> None:
    spec = tiny_traces.spec
    with pytest.raises(ValueError, match="kvp-net"):
        FinetuneAgent(PerHeadMLPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim), [tiny_traces], {},
                      FinetuneConfig(), total_steps=1)
    for options, word in [({"fractions": "0.1,x"}, "fractions"), ({"fractions": "1.5"}, "fractions"),
                          ({"temperature": 0.0}, "temperature"), ({"anchor": -1.0}, "anchor")]:
        with pytest.raises(ValueError, match=word):
            _agent(tiny_traces, _scorer(tiny_traces), **options)


def test_train_finetunes_a_distilled_checkpoint(tiny_traces, tmp_path: Path) -> None:
    """``kvp-gym train --agent finetune --init RUN``: starts from the checkpoint's weights, validates downstream."""
    scorer = _scorer(tiny_traces)
    init = save_scorer(scorer, tmp_path / "init", registry_name=scorer.registry_name, config=scorer.config(),
                       model_spec=tiny_traces.spec, protected={"sink": 4, "recent": 16}, training={}, env="KVEvict-v0")
    result = train(TrainConfig(agent="finetune", traces=str(tiny_traces.directory), out=str(tmp_path / "run"), steps=3,
                               all_heads=True, init=str(init), agent_options={"prefixes": str(PREFIX), "window": "8",
                               "continuation": "24"}, val_traces=str(tiny_traces.directory), val_every=3, val_texts=2,
                               progress=False))
    assert result.scorer_path.exists() and 0 in result.evaluations and 3 in result.evaluations
    assert (tmp_path / "run" / "best").exists()


def test_a_recipe_finetunes_its_distilled_best() -> None:
    from agents.recipes import RECIPES, Recipe, TrainSet

    recipe = Recipe("r", train_sets=(TrainSet("prose", 4), TrainSet("prose", 2, length=2048), TrainSet("ruler", 3, length=512)),
                    val_set=("prose", 2), steps=10, finetune_steps=7)
    distilled = TrainConfig(agent="distill", traces=["/t/prose", "/t/prose2048", "/t/ruler512"], out="/runs/r", steps=10,
                            all_heads=True, arch="kvp-net", arch_options={"width": 112}, agent_options={"prefixes": "256,question"},
                            val_traces="/t/val", val_every=5, val_texts=2)
    config = recipe.finetune_config(distilled)
    assert (config.agent, config.init, config.out, config.steps) == ("finetune", "/runs/r/best", "/runs/r/finetune", 7)
    assert config.traces == ["/t/prose", "/t/ruler512"]  # the sets of at most the recipe's 1024 tokens
    assert config.agent_options == {"prefixes": "256,question"}  # the distilled run's stores; FinetuneConfig's defaults
    assert (config.val_traces, config.val_texts, config.all_heads) == ("/t/val", 2, True)
    assert RECIPES["smollm2"].finetune_config(distilled) is None
