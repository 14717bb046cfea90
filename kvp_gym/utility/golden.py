"""ForesightKV's golden eviction: the greedy schedule that evicts what the future attends to least.

Setting: the cache holds `budget` (B) entries; each step appends the next `step` (L) tokens, then
evicts L of the B older entries (the L just appended are protected). Future score of a cached key i
at a step whose appended chunk ends at e: alpha(i) = max over the future query blocks (blocks of L
queries, aligned to multiples of L, starting at or after e) of the block's attention to i, averaged
over the block's queries and the group's query heads. Evict the L lowest alpha, greedily, step by step.
"""

from __future__ import annotations

import dataclasses

import torch

from kvp_gym.traces.dataset import Trace
from kvp_gym.utility.importance import _attention_chunks, _group_aggregate


@dataclasses.dataclass
class GoldenSchedule:
    """evicted [steps, Hkv, L]: token positions evicted at each step, ascending per row.

    Step t appends tokens [B + t L, B + (t + 1) L) and then evicts; chunk_ends[t] = B + (t + 1) L.
    """

    budget: int
    step: int
    evicted: torch.Tensor
    chunk_ends: list[int]


def num_stream_steps(length: int, budget: int, step: int) -> int:
    """Eviction steps in a trace of ``length``: every step must leave at least one full future block."""
    return max(0, (length - budget) // step - 1)


def block_future_scores(trace: Trace, layer: int, step: int, chunk: int = 256) -> torch.Tensor:
    """Suffix max over query blocks of the block-mean attention: [Hkv, num_blocks + 1, T].

    Row b holds max_{b' >= b} mean_{q in block b', g in group} A_g[q, i]; the last row is zeros.
    """
    length, num_kv_heads = trace.length, trace.spec.num_kv_heads
    num_blocks = -(-length // step)
    block_sums = torch.zeros(num_kv_heads, num_blocks, length)
    counts = torch.zeros(num_blocks)
    for start, stop, probs in _attention_chunks(trace, layer, chunk):
        rows = _group_aggregate(probs, num_kv_heads, "mean")
        block_index = torch.arange(start, stop) // step
        block_sums.index_add_(1, block_index, rows)
        counts.index_add_(0, block_index, torch.ones(stop - start))
    means = block_sums / counts[None, :, None]
    suffix_max = torch.cat([means, torch.zeros(num_kv_heads, 1, length)], dim=1)
    suffix_max = suffix_max.flip(1).cummax(dim=1).values.flip(1)
    return suffix_max


def golden_eviction_schedule(trace: Trace, layer: int, budget: int, step: int) -> GoldenSchedule:
    """The golden schedule for every KV head of one layer (ForesightKV, collect_eviction_schedule)."""
    if step < 1 or budget < step:
        raise ValueError(f"need 1 <= step <= budget, got budget={budget}, step={step}")
    steps = num_stream_steps(trace.length, budget, step)
    if steps < 1:
        raise ValueError(
            f"trace of {trace.length} tokens is too short for budget {budget} and step {step} "
            f"(needs at least budget + 2 * step = {budget + 2 * step})"
        )
    future = block_future_scores(trace, layer, step)
    num_kv_heads = trace.spec.num_kv_heads
    cache = torch.arange(budget).expand(num_kv_heads, budget).clone()
    evicted, ends = [], []
    for t in range(steps):
        end = budget + (t + 1) * step
        first_future_block = -(-end // step)
        alpha = future[:, first_future_block].gather(1, cache)
        drop = alpha.topk(step, dim=1, largest=False).indices
        keep = torch.ones_like(cache, dtype=torch.bool).scatter_(1, drop, False)
        evicted.append(cache.gather(1, drop).sort(dim=1).values)
        appended = torch.arange(end - step, end).expand(num_kv_heads, step)
        cache = torch.cat([cache[keep].view(num_kv_heads, budget - step), appended], dim=1)
        ends.append(end)
    return GoldenSchedule(budget=budget, step=step, evicted=torch.stack(evicted), chunk_ends=ends)
