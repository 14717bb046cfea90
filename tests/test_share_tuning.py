"""Head shares tuned through the model for one ranking (agents.share_tuning) and the ``+tuned`` scorers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.finetune import FinetuneConfig, continuation_loss, soft_keep_mask
from agents.kvp_scorer import PerHeadKVPScorer
from agents.share_tuning import ShareTuner, heuristic_scores, prefix_view, tune_shares
from kvp_gym.cache import EvictingCache
from kvp_gym.cache.evicting_cache import DEFAULT_QUERY_WINDOW
from kvp_gym.cache.head_shares import HeadShares, default_head_shares, tuned_head_shares, tuned_policies
from kvp_gym.eval.leaderboard import scorer_identity
from kvp_gym.models import load_model
from kvp_gym.ranking import ranking_order
from kvp_gym.scorers import declared_view, get, score_view

PREFIX = 64


def _scorer(traces) -> PerHeadKVPScorer:
    spec = traces.spec
    return PerHeadKVPScorer(spec.num_layers, spec.num_kv_heads, spec.head_dim, width=16,
                            inputs="kv+attention+last+pool", window=8, h2o_layers=(0,))


def _start() -> HeadShares:
    """Model-wide shares for the tiny model (2 layers x 2 KV heads), far from equal, at two fractions."""
    return HeadShares(torch.tensor([0.25, 0.5]), torch.tensor([[0.45, 0.05], [0.3, 0.2]]).expand(2, 2, 2).clone(), "model")


def _tuner(traces, policy: str = "kvp", **options) -> ShareTuner:
    config = FinetuneConfig(prefixes=str(PREFIX), window=8, continuation=24, **options)
    return ShareTuner(_scorer(traces), policy, [traces], _start(), config, lr=0.2)


def test_real_valued_counts_move_the_boundary_between_sorted_scores() -> None:
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    whole = torch.tensor([4, 9, 30])
    assert torch.allclose(soft_keep_mask(scores, whole.float(), 0.1), soft_keep_mask(scores, whole, 0.1))
    counts = whole.float().requires_grad_()
    soft_keep_mask(scores, counts, 0.5).exp().sum().backward()
    assert (counts.grad > 0).all()  # a larger count keeps more of every row
    halfway = soft_keep_mask(scores, whole.float() + 0.5, 1e-3).exp() > 0.5
    assert torch.equal(halfway.sum(-1), whole)  # between k and k + 1: still k kept at a hard cut


def test_the_counts_are_the_caches_and_start_at_the_starting_shares(tiny_traces) -> None:
    tuner = _tuner(tiny_traces)
    assert torch.allclose(tuner.shares().shares, _start().shares)
    with torch.no_grad():
        tuner.delta.copy_(torch.tensor([[0.3, -0.2], [0.1, 0.5]]))
    shares = tuner.shares()
    assert torch.allclose(shares.shares.sum((-2, -1)), torch.ones(2))
    for kept, ranked in [(5, 44), (10, 44), (22, 44)]:
        cache = torch.stack([shares.counts(layer, kept, ranked) for layer in range(2)])
        heads = tuner.agent.heads
        assert torch.equal(tuner.head_counts(kept, ranked).detach().round().long(), cache[heads[:, 0], heads[:, 1]])


def test_an_update_tunes_the_shares_and_nothing_else(tiny_traces) -> None:
    tuner = _tuner(tiny_traces, fractions="0.25,0.5")
    scorer_before = {name: value.clone() for name, value in tuner.agent.scorer.state_dict().items()}
    model_before = [p.clone() for p in tuner.agent.model.parameters()]
    for _ in range(3):
        assert torch.isfinite(torch.tensor(tuner.update()))
    assert tuner.delta.abs().sum() > 0
    assert all(torch.equal(value, scorer_before[name]) for name, value in tuner.agent.scorer.state_dict().items())
    assert all(torch.equal(p, q) for p, q in zip(tuner.agent.model.parameters(), model_before))


@pytest.mark.parametrize("name", ["expected-attention", "snapkv", "tova", "h2o-norm", "h2o"])
def test_the_prefix_view_is_what_the_cache_shows_after_the_prefill(tiny_traces, tiny_model_dir: Path, name: str) -> None:
    """A heuristic's split is tuned on the ranking the cache will give it: the view built from the trace is the
    recording cache's after prefilling the same tokens (to the trace's float16), and so are the scores."""
    model, _ = load_model(str(tiny_model_dir))
    scorer, trace, n = get(name), tiny_traces[1], PREFIX
    window = getattr(scorer, "window_size", DEFAULT_QUERY_WINDOW)
    cache = EvictingCache.recording(model.config, query_window=window)
    with torch.no_grad():
        model(trace.tokens[None, :n].long(), cache=cache, use_cache=True)
    for layer in range(tiny_traces.spec.num_layers):
        ours = declared_view(scorer, prefix_view(trace, layer, n, tiny_traces.spec, scorer.needs, window))
        theirs = declared_view(scorer, cache.layers[layer]._view())
        for field in ("keys", "values", "positions", "mask", "queries", "query_positions", "attention"):
            expected = getattr(theirs, field)
            if expected is None:
                assert getattr(ours, field) is None, field
            else:
                torch.testing.assert_close(getattr(ours, field), expected.to(getattr(ours, field).dtype),
                                           atol=5e-3, rtol=5e-3, msg=f"{name}, layer {layer}: {field}")
        torch.testing.assert_close(score_view(scorer, ours), score_view(scorer, theirs), atol=2e-2, rtol=1e-2)
    heads, entries = torch.tensor([[1, 0], [0, 1]]), torch.arange(4, n - 8)
    ranks = heuristic_scores(scorer, trace, n, heads, entries, tiny_traces.spec)  # M - 1 = kept first, ties by position
    for row, (layer, head) in enumerate(heads.tolist()):
        scores = score_view(scorer, prefix_view(trace, layer, n, tiny_traces.spec, scorer.needs, window))[0, head, entries]
        assert torch.equal(ranks[row].sort().values, torch.arange(len(entries), dtype=torch.float))
        assert torch.equal(ranks[row].argsort(descending=True), ranking_order(scores, torch.ones_like(scores, dtype=torch.bool)))


@pytest.mark.parametrize("policy", ["kvp", "h2o-norm", "oracle", "expected-attention"])
def test_tuning_lowers_the_loss_it_trains_on(tiny_traces, policy: str) -> None:
    """On the fixed examples it draws from (every trace, prefix 64, half the ranked entries kept), the soft-evicted
    continuation loss under the tuned shares is below the starting shares'."""
    tuner = _tuner(tiny_traces, policy, fractions="0.5", temperature=0.5)
    agent, first, last = tuner.agent, tuner.agent.protected.sink, PREFIX - tuner.agent.protected.recent

    def mean_loss() -> float:
        losses = []
        with torch.no_grad():
            for position in range(len(agent.stores[0])):
                trace = tiny_traces[agent.stores[0].indices[position]]
                entries = torch.arange(first, last)
                batch = agent.features(agent.stores[0], position, trace, PREFIX, entries)
                scores = tuner.ranking(batch, trace, PREFIX, entries)
                counts = tuner.head_counts(int(0.5 * PREFIX) - 20, last - first)
                bias = torch.zeros(2, 2, PREFIX)
                bias[agent.heads[:, 0], agent.heads[:, 1], first:last] = soft_keep_mask(scores, counts, 0.5)
                losses.append(continuation_loss(agent.model, trace, PREFIX, bias, 24).item())
        return sum(losses) / len(losses)

    start = mean_loss()
    for _ in range(30):
        tuner.update()
    tuned = mean_loss()
    with torch.no_grad():
        tuner.delta.neg_()
    opposite = mean_loss()
    assert tuned < start < opposite  # the random tiny model barely minds the split: the direction is what is tested


def test_bad_inputs_are_named(tiny_traces, tmp_path: Path) -> None:
    config = FinetuneConfig(prefixes=str(PREFIX), window=8)
    for policy in ("kvp-net", "h2o-norm+shares"):  # a network to train, a heuristic with a split of its own
        with pytest.raises(ValueError, match=re.escape(f"--policy {policy!r}")):
            ShareTuner(_scorer(tiny_traces), policy, [tiny_traces], _start(), config)
    with pytest.raises(KeyError, match="unknown scorer 'tovva'"):
        ShareTuner(_scorer(tiny_traces), "tovva", [tiny_traces], _start(), config)
    with pytest.raises(ValueError, match="scope"):
        ShareTuner(_scorer(tiny_traces), "kvp", [tiny_traces], HeadShares(torch.tensor([0.5]), torch.full((1, 2, 2), 0.5), "layer"),
                   config)
    with pytest.raises(ValueError, match="3 layers"):
        ShareTuner(_scorer(tiny_traces), "kvp", [tiny_traces], HeadShares(torch.tensor([0.5]), torch.full((1, 3, 2), 1 / 6), "model"), config)
    with pytest.raises(ValueError, match="steps"):
        tune_shares("kvp", [str(tiny_traces.directory)], tmp_path / "out.safetensors", steps=0)
    with pytest.raises(ValueError, match="--checkpoint ranks for --policy kvp only"):
        tune_shares("h2o-norm", [str(tiny_traces.directory)], tmp_path / "out.safetensors", checkpoint=tmp_path / "run")
    run = subprocess.run([sys.executable, "-m", "agents.share_tuning", "--policy", "kvp", "--traces", "x", "--out",
                          str(tmp_path / "o"), "--set", "horizon=3"], capture_output=True, text=True)
    assert run.returncode != 0 and "unknown option 'horizon'" in run.stderr


def test_the_tuned_suffix_carries_the_shares_tuned_for_that_policy() -> None:
    assert tuned_policies() == ["expected-attention", "h2o-norm", "kvp", "oracle", "snapkv", "tova"]
    for name in tuned_policies():
        tuned, fitted = get(f"{name}+tuned"), get(f"{name}+shares")
        assert tuned.head_shares is tuned_head_shares(name) and tuned.head_shares.scope == "model"
        assert (tuned.head_shares.num_layers, tuned.head_shares.num_kv_heads) == (30, 3)  # SmolLM2-135M
        assert torch.equal(tuned.head_shares.fractions, default_head_shares().fractions)
        assert not torch.allclose(tuned.head_shares.shares, fitted.head_shares.shares, atol=1e-3)
        assert scorer_identity(tuned) != scorer_identity(fitted)  # the leaderboard keeps their records apart
    with pytest.raises(KeyError, match=r"kvp\+tuned"):
        get("knorm+tuned")


def test_tune_shares_ranks_with_a_given_checkpoint_and_writes_loadable_shares(tiny_traces, tmp_path: Path) -> None:
    """``--checkpoint`` (a trained run, e.g. after fine-tuning) ranks instead of the shipped policy; the file written
    is model-wide shares for the traces' model, a valid ``HeadShares``."""
    from kvp_gym.checkpoint import save_scorer

    scorer = _scorer(tiny_traces)
    save_scorer(scorer, tmp_path / "run", registry_name="kvp-net", config=scorer.config(), model_spec=tiny_traces.spec,
                protected={"sink": 4, "recent": 16}, training={})
    start = tmp_path / "start.safetensors"
    _start().save(start)
    out = tmp_path / "tuned.safetensors"
    shares = tune_shares("kvp", [str(tiny_traces.directory)], out, steps=3, lr=0.2, start=str(start),
                         checkpoint=tmp_path / "run", prefixes=str(PREFIX), window=8, continuation=24, fractions="0.5")
    saved = HeadShares.load(out)
    assert saved.scope == "model" and (saved.num_layers, saved.num_kv_heads) == (2, 2)
    assert torch.allclose(saved.shares, shares.shares) and not torch.allclose(saved.shares, _start().shares)
