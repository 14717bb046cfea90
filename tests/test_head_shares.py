"""Head shares: a layer's budget split across its KV heads by fixed shares, stored as ragged (folded) heads."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from agents.head_shares import fit_head_shares
from kvp_gym.cache import EvictingCache, HeadShares
from kvp_gym.cache.head_shares import default_head_shares
from kvp_gym.eval.downstream import decode_groups
from kvp_gym.eval.leaderboard import scorer_identity
from kvp_gym.eval.oracle import trace_importance
from kvp_gym.ranking import shared_head_budgets, split_budget
from kvp_gym.scorers import get

from test_cache import _HIDDEN, KeyNorm, LastQuery, Received, model, prompt  # noqa: F401  (model: the fixture)

SHARES = HeadShares(torch.tensor([0.25, 0.5]), torch.tensor([[[0.7, 0.3], [0.5, 0.5]], [[0.2, 0.8], [0.6, 0.4]]]))
# all 2 x 2 heads of the test model share one budget: layer 0 keeps about twice what layer 1 does
MODEL_SHARES = HeadShares(torch.tensor([0.25, 0.5]), torch.tensor([[[0.5, 0.2], [0.2, 0.1]], [[0.1, 0.4], [0.3, 0.2]]]),
                          scope="model")


# -- the split ---------------------------------------------------------------------------------------
def split_by_loop(shares: list[float], kept: int, capacity: int) -> list[int]:
    """split_budget's definition, one entry at a time: each goes to the open head furthest below its quota."""
    counts, total = [0] * len(shares), len(shares) * kept
    open_heads = set(range(len(shares)))
    while True:  # the quotas of the open heads, after the closed ones took their capacity
        left = total - sum(counts[h] for h in range(len(shares)) if h not in open_heads)
        weight = sum(shares[h] for h in open_heads) or len(open_heads)
        quota = {h: (shares[h] if sum(shares[i] for i in open_heads) else 1) * left / weight for h in open_heads}
        share = {h: int(quota[h]) for h in open_heads}
        for h in sorted(open_heads, key=lambda h: (-(quota[h] - share[h]), h))[: left - sum(share.values())]:
            share[h] += 1
        over = {h for h in open_heads if share[h] > capacity}
        if not over:
            return [share[h] if h in open_heads else counts[h] for h in range(len(shares))]
        for h in over:
            counts[h] = capacity
        open_heads -= over


@pytest.mark.parametrize("seed", range(8))
def test_split_budget_matches_its_loop_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 6, (1,), generator=generator))
    shares = torch.rand(heads, generator=generator) ** 3  # uneven: some heads hit the capacity
    capacity = int(torch.randint(1, 40, (1,), generator=generator))
    for kept in (0, 1, capacity // 2, capacity):
        counts = split_budget(shares, kept, capacity)
        assert counts.tolist() == split_by_loop(shares.double().tolist(), kept, capacity)
        assert int(counts.sum()) == heads * kept and int(counts.max()) <= capacity


def test_split_budget_rejects_bad_input():
    with pytest.raises(ValueError, match="kept must lie"):
        split_budget(torch.ones(3), 5, 4)
    with pytest.raises(ValueError, match="shares be finite"):
        split_budget(torch.tensor([1.0, -1.0]), 1, 4)


def test_fit_averages_the_oracles_split_and_counts_pick_the_nearest_fraction():
    generator = torch.Generator().manual_seed(3)
    importances = [torch.rand(2, 3, 40, generator=generator) * torch.tensor([1.0, 4.0, 0.2])[:, None] for _ in range(4)]
    shares = HeadShares.fit(importances, fractions=[0.5, 0.1], safeguard=0.2)
    assert shares.fractions.tolist() == pytest.approx([0.1, 0.5])
    want = torch.stack([torch.stack([torch.stack([shared_head_budgets(imp[layer], kept, 0.2) for layer in range(2)])
                                     for kept in (4, 20)]).double() for imp in importances])
    want = (want / want.sum(-1, keepdim=True)).mean(0).float()
    torch.testing.assert_close(shares.shares, want)
    assert shares.counts(1, 5, 40).tolist() == split_budget(want[0, 1], 5, 40).tolist()  # 5/40 is nearest 0.1
    assert shares.counts(1, 16, 40).tolist() == split_budget(want[1, 1], 16, 40).tolist()
    assert shares.counts(0, 0, 40).tolist() == [0, 0, 0]  # a budget of only the protected tokens


def test_model_scope_fits_the_oracles_split_across_all_layers_and_counts_cut_it():
    generator = torch.Generator().manual_seed(4)
    importances = [torch.rand(3, 2, 30, generator=generator) * torch.tensor([6.0, 1.0, 0.3])[:, None, None] for _ in range(3)]
    shares = HeadShares.fit(importances, fractions=[0.2], safeguard=0.2, scope="model")
    want = torch.stack([shared_head_budgets(imp.reshape(6, 30), 6, 0.2).view(3, 2).double() for imp in importances])
    want = (want / want.sum((-2, -1), keepdim=True)).mean(0).float()
    torch.testing.assert_close(shares.shares[0], want)
    assert shares.scope == "model" and float(shares.shares.sum()) == pytest.approx(1.0)
    model_counts = split_budget(want.flatten(), 6, 30).view(3, 2)
    counts = torch.stack([shares.counts(layer, 6, 30) for layer in range(3)])
    assert counts.tolist() == model_counts.tolist() and int(counts.sum()) == 3 * 2 * 6
    assert counts[0].sum() > 2 * 6 > counts[2].sum()  # the layer whose entries the future attends most keeps more


def test_save_load_and_bad_shares(tmp_path):
    loaded = HeadShares.load(SHARES.save(tmp_path / "shares.safetensors"))
    assert torch.equal(loaded.shares, SHARES.shares) and torch.equal(loaded.fractions, SHARES.fractions)
    assert HeadShares.load(MODEL_SHARES.save(tmp_path / "model.safetensors")).scope == "model"
    save_file({"fractions": SHARES.fractions, "shares": SHARES.shares}, str(tmp_path / "old.safetensors"))
    assert HeadShares.load(tmp_path / "old.safetensors").scope == "layer"  # files written before scopes existed
    with pytest.raises(ValueError, match="sum to 1"):
        HeadShares(torch.tensor([0.5]), torch.tensor([[[0.5, 0.6]]]))
    with pytest.raises(ValueError, match="sum to 1 over all"):
        HeadShares(torch.tensor([0.5]), torch.full((1, 2, 2), 0.5), scope="model")
    with pytest.raises(ValueError, match="scope must be one of"):
        HeadShares(torch.tensor([0.5]), torch.full((1, 2, 2), 0.5), scope="head")
    with pytest.raises(ValueError, match="ascend"):
        HeadShares(torch.tensor([0.5, 0.2]), torch.full((2, 1, 2), 0.5))


# -- the cache -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_equal_shares_decode_as_equal_budgets(model):
    """Folded heads with equal counts keep the same entries and give the same logits as the unfolded cache."""
    equal = HeadShares(torch.tensor([0.5]), torch.full((1, 2, 2), 0.5))
    ids, _ = prompt(batch=2, length=40)
    steps = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(2))
    plain = EvictingCache(KeyNorm(), 14, config=model.config, sink=2, recent=4)
    folded = EvictingCache(KeyNorm(), 14, config=model.config, sink=2, recent=4, head_shares=equal)
    torch.testing.assert_close(model(ids, cache=plain).logits, model(ids, cache=folded).logits)
    for step in range(steps.shape[1]):
        token = steps[:, step : step + 1]
        torch.testing.assert_close(model(token, cache=plain).logits, model(token, cache=folded).logits, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(folded.layers, plain.layers):
        assert mine.folded and mine.keys.shape == (2, 1, 2 * 19, 16)
        for head in range(2):
            torch.testing.assert_close(mine.positions[:, 0, mine.head_of == head], theirs.positions[:, head])


@pytest.mark.parametrize("scorer_cls,shares", [(KeyNorm, SHARES), (LastQuery, SHARES), (Received, SHARES),
                                               (KeyNorm, MODEL_SHARES), (Received, MODEL_SHARES)])
@torch.no_grad()
def test_ragged_heads_decode_as_full_attention_hiding_the_evicted(model, scorer_cls, shares):
    hiding = copy.deepcopy(model)
    hiding.set_attn_implementation("kvp_test_hiding")
    ids, _ = prompt(batch=2, length=40)
    steps = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = EvictingCache(scorer_cls(), 14, config=model.config, sink=2, recent=4, head_shares=shares)
    full = DynamicCache(config=hiding.config)
    _HIDDEN.clear()
    torch.testing.assert_close(model(ids, cache=cache).logits, hiding(ids, cache=full).logits)
    cache.flush()
    for index, layer in enumerate(cache.layers):
        ranked = 40 - 6
        counts = 6 + shares.counts(index, 14 - 6, ranked)  # 8 / 34 is nearest 0.25
        assert layer.kept_per_head().tolist() == [counts.tolist()] * 2
        kept = torch.zeros(2, 2, 40, dtype=torch.bool)
        for head in range(2):
            kept[:, head].scatter_(-1, layer.positions[:, 0, layer.head_of == head], True)
        assert kept[..., :2].all() and kept[..., -4:].all()  # sink and recent in every head
        _HIDDEN[index] = ~kept
    try:
        for step in range(steps.shape[1]):
            token = steps[:, step : step + 1]
            torch.testing.assert_close(model(token, cache=cache).logits, hiding(token, cache=full).logits, atol=1e-5, rtol=1e-5)
    finally:
        _HIDDEN.clear()
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    assert len(lengths) == (2 if shares.scope == "model" else 1)  # model scope: the layers store different lengths
    report = cache.report()
    assert (report.seen, report.stored) == (46, 20)  # 14 + 6 per head on average: the memory of equal budgets
    assert report.bytes_stored == 2 * 2 * 2 * 20 * 16 * 4 * 2  # layers, K+V, heads, entries, head dim, bytes, batch
    assert report.bytes_full == 2 * 2 * 2 * 46 * 16 * 4 * 2


@torch.no_grad()
def test_a_scorer_carries_its_head_shares_into_the_cache_and_generate(model):
    scorer = KeyNorm()
    scorer.head_shares = SHARES
    ids, mask = prompt(batch=1, length=40)
    cache = EvictingCache(scorer, 14, config=model.config, sink=2, recent=4)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 45) and all(layer.folded for layer in cache.layers)


def test_head_shares_refuse_what_they_cannot_run(model):
    with pytest.raises(ValueError, match="one-shot"):
        EvictingCache(KeyNorm(), 24, config=model.config, every=4, head_shares=SHARES)
    with pytest.raises(ValueError, match="3 layers x 2"):
        EvictingCache(KeyNorm(), 24, config=model.config,
                      head_shares=HeadShares(torch.tensor([0.5]), torch.full((1, 3, 2), 0.5)))
    ids, mask = prompt(batch=2, length=40, pad=5)
    cache = EvictingCache(KeyNorm(), 24, config=model.config, head_shares=SHARES)
    with pytest.raises(ValueError, match="no padding"), torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        model(ids[:, -1:], attention_mask=mask[:, -1:], cache=cache)
    folded = EvictingCache(KeyNorm(), 24, config=model.config, head_shares=SHARES)
    with torch.no_grad():
        model(prompt(length=40)[0], cache=folded)
    folded.flush()
    with pytest.raises(ValueError, match="decodes alone"):
        EvictingCache.stack([folded, copy.deepcopy(folded)])


def test_rows_with_head_shares_decode_alone():
    assert decode_groups([10, 12, 30, 11, 100], alone=set()) == [[0, 3, 1], [2], [4]]
    assert decode_groups([10, 12, 30, 11, 100], alone={1, 3}) == [[0], [2], [4], [1], [3]]


def test_the_shares_suffix_gives_any_registered_scorer_the_default_models_shares():
    shared, plain = get("h2o-norm+shares"), get("h2o-norm")
    assert shared.head_shares is default_head_shares() and getattr(plain, "head_shares", None) is None
    assert (default_head_shares().num_layers, default_head_shares().num_kv_heads) == (30, 3)  # SmolLM2-135M
    assert scorer_identity(shared) != scorer_identity(plain)  # the leaderboard keeps their records apart
    with pytest.raises(KeyError, match="unknown scorer 'nope'"):
        get("nope+shares")


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_the_fitter_reads_the_oracle_from_traces(tiny_traces, scope):
    shares = fit_head_shares([tiny_traces], texts=2, fractions=[0.25], prefix_share=0.75, scope=scope)
    ranked = [trace_importance(tiny_traces[index], 72)[..., 4 : 72 - 16] for index in range(2)]
    want = HeadShares.fit(ranked, [0.25], scope=scope)
    assert shares.scope == scope and torch.equal(shares.shares, want.shares)
    with pytest.raises(ValueError, match="prefix_share"):
        fit_head_shares([tiny_traces], texts=2, prefix_share=1.0)
