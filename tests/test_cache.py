"""The evicting inference cache: exactness at full budget, real eviction, true positions, padding, streaming."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvp_gym.cache import ATTN_IMPLEMENTATION, EvictingCache
from kvp_gym.scorers import ScoringView, available, get

from conftest import TINY_VOCAB as VOCAB, tiny_llama


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """The tiny model. Bit-exact comparisons run the reference on this same object (``stock_sdpa``):
    on CPU two copies of the same weights can differ in the last bit of a matmul (memory alignment
    picks the BLAS kernel)."""
    return tiny_llama()


def stock_sdpa(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """``model`` back on transformers' own sdpa attention (an EvictingCache switches it to kvp_evict)."""
    model.set_attn_implementation("sdpa")
    return model


def prompt(batch: int = 1, length: int = 48, pad: int = 0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random input ids [batch, length] and a 2D attention mask; the last row has ``pad`` left-padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[-1, :pad] = 0
    mask[-1, :pad] = 0
    return ids, mask


# -- test scorers: one per kind of live input ---------------------------------------------------
class KeyNorm:
    """Low key norm = keep (needs nothing)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: ScoringView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)


class LastQuery:
    """Attention logit of the last query, max over the group (needs queries)."""

    needs: ClassVar[frozenset[str]] = frozenset({"queries"})

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("last-query", "queries")
        return torch.einsum("bhgd,bhnd->bhgn", view.queries[..., -1, :], view.keys).amax(dim=2)


class Received:
    """Attention received so far, mean over the group (needs attention)."""

    needs: ClassVar[frozenset[str]] = frozenset({"attention"})

    def score(self, view: ScoringView) -> torch.Tensor:
        view.require("received", "attention")
        return view.attention.mean(dim=2)


class Recorder:
    """Wraps a scorer and keeps every view it scored and the scores it gave."""

    def __init__(self, inner, needs: frozenset[str] | None = None) -> None:
        self.inner = inner
        self.needs = inner.needs if needs is None else needs
        self.calls: list[tuple[ScoringView, torch.Tensor]] = []

    def score(self, view: ScoringView) -> torch.Tensor:
        scores = self.inner.score(view)
        self.calls.append((view, scores))
        return scores


class RandomScores:
    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: ScoringView) -> torch.Tensor:
        return torch.rand(view.shape)


SCORERS = [KeyNorm, LastQuery, Received]


def generate(model, ids, mask, cache, *, sample: bool = False, new: int = 8):
    sampling = {"do_sample": True, "top_k": 0} if sample else {"do_sample": False}
    torch.manual_seed(123)
    return model.generate(
        ids, attention_mask=mask, cache=cache, max_new_tokens=new, min_new_tokens=new,
        output_logits=True, return_dict_in_generate=True, **sampling,
    )


# -- exactness with no eviction --------------------------------------------------------------------
EXACTNESS_CASES = [  # (scorer, sampled, batch, left padding of the last row)
    *[(KeyNorm, sample, batch, pad) for sample in (False, True) for batch, pad in ((1, 0), (2, 11))],
    (LastQuery, True, 2, 11),
    (Received, False, 2, 11),
]


@pytest.mark.parametrize("scorer_cls, sample, batch, pad", EXACTNESS_CASES)
@torch.no_grad()
def test_full_budget_equals_dynamic_cache(model, scorer_cls, sample, batch, pad):
    ids, mask = prompt(batch, pad=pad)
    expected = generate(stock_sdpa(model), ids, mask, DynamicCache(config=model.config), sample=sample)
    cache = EvictingCache(scorer_cls(), budget=ids.shape[1] + 8, config=model.config, every=3)
    actual = generate(model, ids, mask, cache, sample=sample)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert torch.equal(actual.sequences, expected.sequences)
    for got, want in zip(actual.logits, expected.logits, strict=True):
        if "attention" in cache.settings.scorer.needs:  # the cache's one-pass attention: sdpa's to round-off
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # sdpa itself
            assert torch.equal(got, want)
    assert cache.report().compressions == 0


@torch.no_grad()
def test_attention_dropout_keeps_sdpa_for_the_output(model):
    """With dropout (a model in training mode), a layer that sums attention leaves the output to sdpa."""
    dropping = copy.deepcopy(model)
    dropping.config.attention_dropout = 0.5
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.5
    dropping.train()
    ids, _ = prompt(length=30)
    torch.manual_seed(0)
    expected = stock_sdpa(dropping)(ids, cache=DynamicCache(config=dropping.config)).logits
    torch.manual_seed(0)
    cache = EvictingCache(Received(), 64, config=dropping.config)
    assert torch.equal(dropping(ids, cache=cache).logits, expected)
    assert cache.layers[0].attention is not None  # the sums were still taken


@torch.no_grad()
def test_prompt_within_budget_is_never_compressed_in_one_shot_mode(model):
    ids, mask = prompt(length=20)
    expected = generate(stock_sdpa(model), ids, mask, DynamicCache(config=model.config), new=30)
    cache = EvictingCache(KeyNorm(), budget=24, config=model.config)
    actual = generate(model, ids, mask, cache, new=30)
    assert torch.equal(actual.sequences, expected.sequences)
    assert cache.report().stored == 20 + 29


@torch.no_grad()
def test_beam_search_at_full_budget(model):
    ids, mask = prompt(length=16)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    expected = stock_sdpa(model).generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    actual = model.generate(ids, cache=EvictingCache(KeyNorm(), 64, config=model.config), **kwargs)
    assert torch.equal(actual, expected)


# -- what is kept ----------------------------------------------------------------------------------
@torch.no_grad()
def test_keeps_top_budget_by_score_plus_protected(model):
    ids, _ = prompt(batch=2, length=40)
    budget, sink, recent = 16, 3, 5
    recorder = Recorder(RandomScores())
    cache = EvictingCache(recorder, budget, config=model.config, sink=sink, recent=recent)
    model(ids, cache=cache)
    cache.flush()
    assert len(recorder.calls) == model.config.num_hidden_layers
    for layer, (view, scores) in zip(cache.layers, recorder.calls, strict=True):
        assert view.shape == (2, 2, 40) and torch.equal(view.positions, torch.arange(40).expand(2, 40))
        assert torch.equal(view.kv_heads, torch.arange(2).expand(2, 2))
        assert view.queries is None and view.attention is None
        middle = scores[..., sink : 40 - recent]
        best = middle.topk(budget - sink - recent, dim=-1).indices + sink
        expected = torch.cat([torch.arange(sink).expand(2, 2, sink), best, torch.arange(40 - recent, 40).expand(2, 2, recent)], -1)
        assert torch.equal(layer.positions, expected.sort(-1).values)


@torch.no_grad()
def test_compression_shrinks_tensors_and_keeps_true_lengths(model):
    ids, _ = prompt(batch=2, length=48)
    cache = EvictingCache(KeyNorm(), 20, config=model.config, recent=4)
    model(ids, cache=cache)
    assert cache.get_seq_length() == 48
    assert cache.get_mask_sizes(1, 0) == (21, 28)  # the next forward sees 20 stored + 1 new, offset 48 - 20
    cache.flush()
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, 2, 20, 16)
        assert layer.positions.shape == (2, 2, 20)
    assert not torch.equal(cache.layers[0].positions[0, 0], cache.layers[0].positions[0, 1])  # per-head sets
    report = cache.report()
    assert (report.seen, report.stored, report.compressions) == (48, 20, 1)
    assert torch.equal(report.kept, torch.full((2, 2, 2), 20))
    per_token = 2 * 2 * 16 * 4 * 2 * 2  # layers, K+V, head dim, fp32 bytes, batch, KV heads
    assert (report.bytes_stored, report.bytes_full) == (20 * per_token, 48 * per_token)
    assert report.saved_fraction == pytest.approx(1 - 20 / 48)
    assert "20 of 48 tokens" in str(report) and "58.3% saved" in str(report)


# -- true positions: compare with full attention that hides the evicted entries ----------------------
_HIDDEN: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T] True = evicted prompt entry


def _hiding_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa over the full cache, with the evicted prompt entries of each (layer, KV head) masked out."""
    hidden = _HIDDEN.get(module.layer_idx)
    if hidden is not None:
        b, hq, q, _ = query.shape
        visible = torch.ones(b, hq, q, key.shape[-2], dtype=torch.bool) if attention_mask is None else attention_mask
        hide = hidden.repeat_interleave(hq // hidden.shape[1], dim=1)[:, :, None, :]
        visible = visible.expand(b, hq, q, key.shape[-2]).clone()
        visible[..., : hidden.shape[-1]] &= ~hide
        attention_mask = visible
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("kvp_test_hiding", _hiding_attention)
AttentionMaskInterface.register("kvp_test_hiding", sdpa_mask)


@pytest.mark.parametrize("scorer_cls", SCORERS)
@torch.no_grad()
def test_compressed_decoding_equals_masked_full_attention(model, scorer_cls):
    hiding = copy.deepcopy(model)
    hiding.set_attn_implementation("kvp_test_hiding")
    ids, _ = prompt(batch=2, length=40)
    steps = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = EvictingCache(scorer_cls(), 14, config=model.config, sink=2, recent=4)
    full = DynamicCache(config=hiding.config)
    _HIDDEN.clear()
    torch.testing.assert_close(model(ids, cache=cache).logits, hiding(ids, cache=full).logits)
    cache.flush()
    for index, layer in enumerate(cache.layers):
        kept = torch.zeros(2, 2, 40, dtype=torch.bool).scatter(-1, layer.positions, True)
        _HIDDEN[index] = ~kept
    try:
        for step in range(steps.shape[1]):
            token = steps[:, step : step + 1]
            got = model(token, cache=cache).logits
            want = hiding(token, cache=full).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        _HIDDEN.clear()
    assert cache.layers[0].positions[0, 0, -6:].tolist() == list(range(40, 46))


# -- live inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("length", [30, 150])  # one block of queries, and three (the last one partial)
@torch.no_grad()
def test_live_queries_and_attention_match_eager_attention_weights(model, length, one_pass):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids, _ = prompt(length=length)
    reference = eager(ids, output_attentions=True)
    weights = reference.attentions  # per layer [1, Hq, T, T]
    recorder = Recorder(Received(), needs=frozenset({"queries", "attention"}))
    cache = EvictingCache(recorder, 24, config=model.config, query_window=8, one_pass_attention=one_pass)
    torch.testing.assert_close(model(ids, cache=cache).logits, reference.logits, atol=1e-5, rtol=1e-5)
    cache.flush()
    for (view, _), attention in zip(recorder.calls, weights, strict=True):
        assert view.queries.shape == (1, 2, 2, 8, 16)
        assert torch.equal(view.query_positions, torch.arange(length - 8, length)[None])
        torch.testing.assert_close(view.attention.reshape(1, 4, length), attention.sum(dim=2), atol=1e-5, rtol=1e-5)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", view.queries, view.keys) / 4.0
        causal = view.positions[:, None, :] <= view.query_positions[:, :, None]
        probs = torch.softmax(logits.masked_fill(~causal[:, None, None], float("-inf")), dim=-1)
        torch.testing.assert_close(probs.reshape(1, 4, 8, length), attention[:, :, -8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scorer_cls", SCORERS)
@torch.no_grad()
def test_left_padded_rows_equal_rows_run_alone(model, scorer_cls):
    """Padding ranks last and stays masked: each row of a padded batch behaves as if run alone."""
    ids, mask = prompt(batch=2, length=40, pad=22)  # the short row has 18 real tokens
    for budget in (12, 24):  # below and above the short row's length (then padding is kept, masked)
        batched = generate(model, ids, mask, EvictingCache(scorer_cls(), budget, config=model.config, every=5, sink=2, recent=4), new=9)
        for row in range(2):
            alone_ids = ids[row : row + 1, int((mask[row] == 0).sum()) :]
            cache = EvictingCache(scorer_cls(), budget, config=model.config, every=5, sink=2, recent=4)
            alone = generate(model, alone_ids, torch.ones_like(alone_ids), cache, new=9)
            assert torch.equal(batched.sequences[row, 40:], alone.sequences[0, alone_ids.shape[1] :])
            for got, want in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(got[row], want[0], atol=1e-4, rtol=1e-4)


# -- streaming ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_every_bounds_stored_length_and_scores_heads_separately(model):
    budget, every = 24, 5
    recorder = Recorder(KeyNorm())
    cache = EvictingCache(recorder, budget, config=model.config, every=every)
    ids, _ = prompt(batch=2, length=40)
    model(ids, cache=cache)
    for step in range(23):
        for layer in cache.layers:
            assert layer.stored_length <= budget + every - 1
        model(torch.full((2, 1), 7 + step), cache=cache)
    report = cache.report()
    assert report.seen == 63 and report.stored <= budget + every - 1
    assert report.peak_stored == 40 and report.compressions == 1 + 23 // every
    assert all(layer.stored_length == budget + 23 % every for layer in cache.layers)
    later = recorder.calls[-1][0]  # heads hold different positions now: one view row per (batch, head)
    assert later.shape == (4, 1, budget + every) and torch.equal(later.kv_heads[:, 0], torch.tensor([0, 1, 0, 1]))
    protected = cache.layers[0].positions[..., -16:]
    assert torch.equal(protected, torch.arange(63 - 16, 63).expand(2, 2, 16))  # the recent tokens survive


# -- errors ------------------------------------------------------------------------------------------
def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="smaller than the protected tokens"):
        EvictingCache(KeyNorm(), 19, config=model.config)
    with pytest.raises(ValueError, match="every must be >= 1"):
        EvictingCache(KeyNorm(), 64, config=model.config, every=0)
    with pytest.raises(TypeError, match="not a Scorer"):
        EvictingCache(object(), 64, config=model.config)

    class Oracle:
        needs: ClassVar[frozenset[str]] = frozenset({"future_importance"})

        def score(self, view):
            raise AssertionError

    with pytest.raises(ValueError, match="future_importance"):
        EvictingCache(Oracle(), 64, config=model.config)


def test_rejects_non_sdpa_models():
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        EvictingCache(KeyNorm(), 64, config=eager.config)


@torch.no_grad()
def test_config_copy_gives_a_clear_error():
    model = tiny_llama()
    cache = EvictingCache(KeyNorm(), 20, config=copy.deepcopy(model.config))  # the model stays on sdpa
    model(prompt()[0], cache=cache)
    with pytest.raises(RuntimeError, match="config=model.config"):
        cache.flush()


@torch.no_grad()
def test_right_padding_is_rejected(model):
    ids, mask = prompt(batch=2, length=20)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model(ids, attention_mask=mask, cache=EvictingCache(KeyNorm(), 20, config=model.config))


@torch.no_grad()
def test_nan_scores_are_rejected(model):

    class NaNScorer:
        needs: ClassVar[frozenset[str]] = frozenset()

        def score(self, view):
            return torch.full(view.shape, float("nan"))

    cache = EvictingCache(NaNScorer(), 20, config=model.config)
    model(prompt()[0], cache=cache)
    with pytest.raises(ValueError, match="NaN scores"):
        cache.flush()


# -- every registered scorer that can run live ----------------------------------------------------------
@torch.no_grad()
def test_registered_scorers_run_in_generate(model):
    ids, mask = prompt(batch=2, length=48, pad=8)
    ran = []
    for name in available():
        try:
            scorer = get(name)
        except TypeError:  # needs constructor arguments (a trainable architecture)
            continue
        if isinstance(scorer, torch.nn.Module):  # a learned policy made for SmolLM2's heads, not this model's
            continue
        if not scorer.needs <= {"queries", "attention"}:
            with pytest.raises(ValueError, match="cannot compute"):
                EvictingCache(scorer, 24, config=model.config)
            continue
        cache = EvictingCache(scorer, 24, config=model.config, every=4)
        out = generate(model, ids, mask, cache, new=6)
        assert out.sequences.shape == (2, 54) and cache.report().stored <= 24 + 3, name
        ran.append(name)
    assert ran, "no registered scorer could run"


# -- one prefill forked per scorer and budget (what the leaderboard does) ------------------------------
@torch.no_grad()
@pytest.mark.parametrize("budget", [12, 30, 64])
def test_forked_prefill_evicts_and_decodes_exactly_as_its_own_prefill(model, budget):
    ids, _ = prompt(length=56)
    recording = EvictingCache.recording(model.config, query_window=40)
    model(ids[:, :40], cache=recording, use_cache=True)
    scorers = [KeyNorm(), LastQuery(), Received(), get("snapkv", window_size=8), get("h2o-norm"), get("tova")]
    for scorer in scorers:
        own = EvictingCache(scorer, budget, config=model.config, sink=2, recent=4, one_pass_attention=False)
        model(ids[:, :40], cache=own, use_cache=True)
        expected = model(ids[:, 40:], cache=own, use_cache=True).logits
        forked = recording.fork(scorer, budget, sink=2, recent=4)
        assert torch.equal(model(ids[:, 40:], cache=forked, use_cache=True).logits, expected), type(scorer).__name__
        assert all(torch.equal(a.positions, b.positions) for a, b in zip(own.layers, forked.layers))
        one_pass = EvictingCache(scorer, budget, config=model.config, sink=2, recent=4)  # the default: to round-off
        model(ids[:, :40], cache=one_pass, use_cache=True)
        torch.testing.assert_close(model(ids[:, 40:], cache=one_pass, use_cache=True).logits, expected, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a.positions, b.positions) for a, b in zip(own.layers, one_pass.layers))
    assert recording.layers[0].keys.shape[-2] == 40 and recording.layers[0].forwards == 1  # left as it was


@torch.no_grad()
def test_a_stack_of_different_budgets_decodes_each_row_as_alone(model):
    """Forks at different budgets, and the full cache, stack into one batch (shorter rows padded with empty
    slots); each row's logits are its own cache's, and the full-cache fork's are a DynamicCache's."""
    ids, _ = prompt(length=56)
    recording = EvictingCache.recording(model.config, query_window=40)
    model(ids[:, :40], cache=recording, use_cache=True)
    rows = [(get("h2o-norm"), 12), (None, None), (KeyNorm(), 30), (get("snapkv", window_size=8), 20)]
    alone, alone_step = [], []
    for scorer, budget in rows:
        cache = recording.fork(scorer, budget, sink=2, recent=4)
        alone.append(model(ids[:, 40:], cache=cache, use_cache=True).logits)
        alone_step.append(model(ids[:, -1:], cache=cache, use_cache=True).logits)  # one more token: q = 1
    full = DynamicCache(config=model.config)
    model(ids[:, :40], cache=full, use_cache=True)
    assert torch.equal(alone[1], model(ids[:, 40:], cache=full, use_cache=True).logits)
    stacked = EvictingCache.stack([recording.fork(scorer, budget, sink=2, recent=4) for scorer, budget in rows])
    assert stacked.layers[0].keys.shape[-2] == 40 and stacked.layers[0].padded
    logits = model(ids[:, 40:].expand(len(rows), -1), cache=stacked, use_cache=True).logits
    step = model(ids[:, -1:].expand(len(rows), -1), cache=stacked, use_cache=True).logits
    for row in range(len(rows)):
        torch.testing.assert_close(logits[row], alone[row][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[row], alone_step[row][0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fork_refuses_what_it_cannot_reproduce(model):
    ids, _ = prompt(length=48)
    plain = EvictingCache(KeyNorm(), 24, config=model.config)
    model(ids, cache=plain, use_cache=True)
    with pytest.raises(ValueError, match="recording"):
        plain.fork(KeyNorm(), 24)
    recording = EvictingCache.recording(model.config, query_window=8)
    model(ids, cache=recording, use_cache=True)
    with pytest.raises(ValueError, match="fewer queries than this scorer's window of 16"):
        recording.fork(get("snapkv", window_size=16), 24)
    model(ids[:, :4], cache=recording, use_cache=True)
    with pytest.raises(ValueError, match="right after its prefill"):
        recording.fork(KeyNorm(), 24)


# -- the CLI ---------------------------------------------------------------------------------------------
def run_cli(*args: str):
    from typer.testing import CliRunner

    from kvp_gym.cache.cli import app

    result = CliRunner().invoke(app, list(args))
    return result, " ".join(result.output.replace("│", " ").split())  # rich boxes wrap error messages


def test_cli_streams_text_and_reports_memory(tiny_model_dir):
    result, output = run_cli(
        "--policy", "snapkv", "--budget", "24", "--every", "4", "--model", str(tiny_model_dir),
        "--prompt", "one two three four " * 10, "--max-new-tokens", "6", "--raw",
    )
    assert result.exit_code == 0, output
    assert "tokens stored per KV head" in output and "saved" in output


def test_cli_checkpoints_are_checked_against_the_model(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from kvp_gym.models import ModelSpec
    from kvp_gym.checkpoint import save_scorer

    spec = ModelSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir), "tiny")
    common = dict(registry_name="knorm", config={}, protected={"sink": 2, "recent": 4}, training={})
    save_scorer(get("knorm"), tmp_path / "mine", model_spec=spec, **common)
    save_scorer(get("knorm"), tmp_path / "other", model_spec=ModelSpec("other", 30, 9, 3, 64, 1e5), **common)
    args = ["--budget", "8", "--model", str(tiny_model_dir), "--prompt", "a b c d e f g h i j k l", "--max-new-tokens", "3"]
    result, output = run_cli("--policy", str(tmp_path / "mine"), *args)  # budget 8 fits its protected 2 + 4
    assert result.exit_code == 0, output
    result, output = run_cli("--policy", str(tmp_path / "other"), *args)
    assert result.exit_code == 2 and "was made for model 'other'" in output
    result, output = run_cli("--policy", "no-such-policy", *args)
    assert result.exit_code == 2 and "unknown scorer 'no-such-policy'" in output


# -- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_exact_at_full_budget_and_generates_at_budget_64():
    from kvp_gym.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain in two sentences why the sky is blue. " * 10}],
        tokenize=False, add_generation_prompt=True,
    )
    inputs = tokenizer(text, return_tensors="pt")
    length = inputs.input_ids.shape[1]
    assert length > 100
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, cache=DynamicCache(config=model.config), **kwargs)
    actual = model.generate(**inputs, cache=EvictingCache(KeyNorm(), length + 8, config=model.config), **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(actual.logits, expected.logits, strict=True))

    cache = EvictingCache(KeyNorm(), 64, config=model.config)
    out = model.generate(**inputs, cache=cache, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, length:], skip_special_tokens=True)
    assert text.strip()
    report = cache.report()
    assert report.stored <= 64 + 24 and report.saved_fraction > 0.3
