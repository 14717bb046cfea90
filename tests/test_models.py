"""Loading models and capturing post-RoPE Q/K/V without changing what the model computes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from kvp_gym.models import ModelSpec, capture_qkv, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_capture_leaves_logits_unchanged_and_records_cache_tensors(tiny):
    model, _ = tiny
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        reference = model(ids, cache=cache, use_cache=True)
    logits, captured = capture_qkv(model, ids, dtype=torch.float32)
    assert torch.equal(logits, reference.logits[0])
    for layer in range(model.config.num_hidden_layers):
        assert captured.q[layer].shape == (4, 40, 16)
        assert torch.equal(captured.k[layer], cache.layers[layer].keys[0])
        assert torch.equal(captured.v[layer], cache.layers[layer].values[0])


def test_capture_is_causal(tiny):
    # Changing the last token must not change the earlier logits (a non-causal capture would).
    model, _ = tiny
    ids = torch.randint(3, 49152, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = 7
    first, _ = capture_qkv(model, ids)
    second, _ = capture_qkv(model, changed)
    assert torch.equal(first[:-1], second[:-1])
    assert not torch.equal(first[-1], second[-1])


def recomputed_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with a causal mask, written out: q [Hq, T, d], k [Hkv, T, d] -> [Hq, T, T]."""
    group = q.shape[0] // k.shape[0]
    scores = q @ k.repeat_interleave(group, 0).transpose(1, 2) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


@pytest.mark.slow
def test_trace_attention_matches_real_model_eager_attention(real_traces, smol_dir):
    # The attention recomputed from the stored fp16 Q/K equals SmolLM2's own (eager, output_attentions).
    model, _ = load_model("smollm2-135m")
    model.set_attn_implementation("eager")
    trace = real_traces[0]
    with torch.inference_mode():
        output = model(trace.tokens[None], use_cache=False, output_attentions=True)
    worst = 0.0
    for layer in (0, 7, 15, 29):
        error = (recomputed_attention(trace.q(layer), trace.k(layer)) - output.attentions[layer][0]).abs().max()
        worst = max(worst, float(error))
    assert worst < 5e-3, f"max |A_trace - A_model| = {worst}"


@pytest.mark.slow
def test_default_model_is_the_embedded_smollm2(smol_dir):
    model, tokenizer = load_model()
    spec = ModelSpec.from_config(model.config, "smollm2-135m")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_unknown_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(str(tmp_path / "no-such-model"))


def test_untraceable_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path))


def test_spec_mismatch_names_the_difference():
    mine = ModelSpec("a", 30, 9, 3, 64, 1e5)
    other = ModelSpec("b", 2, 4, 2, 16, 1e4)
    with pytest.raises(ValueError, match="num_layers: 2 != 30"):
        mine.check_compatible(other, "trace set x")
    assert json.loads(json.dumps(mine.to_dict())) == mine.to_dict()


def test_growing_cache_decodes_as_the_stock_cache_through_growth_row_selection_and_crop():
    """Appending in place (buffers that double) gives the stock cache's logits bit for bit: a batch decoded past
    several growths, a row dropped, the last entries cropped; the layers' capacity did grow."""
    from kvp_gym.models.growing_cache import GrowingLayer, growing_cache

    model = tiny_llama()
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    caches = [DynamicCache(), growing_cache()]

    def step(tokens, position):
        with torch.no_grad():
            return [model(input_ids=tokens, position_ids=torch.arange(position, position + tokens.shape[1]).expand(len(tokens), -1),
                          cache=cache, use_cache=True).logits for cache in caches]

    stock, growing = step(ids[:, :5], 0)
    assert torch.equal(stock, growing)
    for position in range(5, 30):
        stock, growing = step(ids[:, position : position + 1], position)
        assert torch.equal(stock, growing), position
    for cache in caches:
        cache.batch_select_indices(torch.tensor([0, 2]))
        cache.crop(-4)
    stock, growing = step(ids[[0, 2], 26:36], 26)
    assert torch.equal(stock, growing)
    layer = caches[1].layers[0]
    assert isinstance(layer, GrowingLayer) and layer.keys.shape[-2] == 36 and layer.key_buffer.shape[-2] > 36
