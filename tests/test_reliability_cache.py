"""Batching never changes a prompt's eviction: each row of a left-padded batch keeps exactly the
tokens it keeps alone, with every registered scorer that reads live queries or attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvp_gym.cache import EvictingCache
from kvp_gym.cache.evicting_cache import LIVE_INPUTS
from kvp_gym.scorers import available, get

VOCAB = 256
LENGTH, PAD, NEW = 40, 22, 6  # the padded row has 18 real tokens


def query_reading_scorers() -> list[str]:
    """Registered scorers that read queries or attention (and need no constructor arguments)."""
    names = []
    for name in available():
        try:
            scorer = get(name)
        except TypeError:  # a trainable architecture: needs constructor arguments
            continue
        if isinstance(scorer, torch.nn.Module):  # a learned policy, made for one model's heads (the shipped kvp)
            continue
        if scorer.needs & LIVE_INPUTS and scorer.needs <= LIVE_INPUTS:
            names.append(name)
    return names


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def run(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, cache: EvictingCache) -> torch.Tensor:
    """Greedy generation of NEW tokens; returns the new tokens [B, NEW]."""
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[:, ids.shape[1]:]


def kept_positions(cache: EvictingCache, row: int) -> list[list[list[int]]]:
    """The real token positions each layer and KV head of ``row`` keeps: [layer][head] -> positions."""
    cache.flush()
    return [[[p for p in head.tolist() if p >= 0] for head in layer.positions[row]] for layer in cache.layers]


def test_the_query_reading_scorers_are_covered():
    assert {"snapkv", "tova", "h2o"} <= set(query_reading_scorers())


@pytest.mark.parametrize("name", query_reading_scorers())
@pytest.mark.parametrize("every", [None, 4])
@torch.no_grad()
def test_each_row_of_a_padded_batch_evicts_as_it_would_alone(model, name, every):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    budget = 12
    batched_cache = EvictingCache(get(name), budget, config=model.config, every=every, sink=2, recent=4)
    batched = run(model, ids, mask, batched_cache)
    for row in range(2):
        alone_ids = ids[row : row + 1, int((mask[row] == 0).sum()):]
        alone_cache = EvictingCache(get(name), budget, config=model.config, every=every, sink=2, recent=4)
        alone = run(model, alone_ids, torch.ones_like(alone_ids), alone_cache)
        assert kept_positions(batched_cache, row) == kept_positions(alone_cache, 0), f"{name}: row {row} kept other tokens"
        assert torch.equal(batched[row], alone[0]), f"{name}: row {row} generated other text"
