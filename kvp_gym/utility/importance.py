"""Future attention: what each cached token will be worth to the rest of the true sequence.

For a cache prefix of length n on KV head h, the importance of cached token i < n is

    I_n(i) = sum_{n <= j < n + f} agg_{g in group(h)} A_g[j, i],
    A_g[j, :] = softmax(q_j . K[:j+1] / sqrt(d))   (full causal attention of query head g)

with agg = max (KVP) or mean (ForesightKV) and horizon f (None = the rest of the trace).
All prefix lengths n of a (trace, layer) come from one table of suffix sums over queries,
built in query chunks so that memory stays O(H * T * chunk) while computing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kvp_gym.traces.dataset import Trace

AGGREGATIONS = ("max", "mean")


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def attention_probs(q: torch.Tensor, k: torch.Tensor, start: int, stop: int, pad: bool = True) -> torch.Tensor:
    """Causal softmax attention of queries start..stop-1 over all keys.

    q [Hq, T, d], k [Hkv, T, d] -> A [Hq, stop - start, T] (zeros above the diagonal), fp32; with
    ``pad=False`` only the keys the queries can see: [Hq, stop - start, stop].
    Only the keys a query can see (positions < stop) are multiplied.
    """
    num_heads, length, dim = q.shape
    group = num_heads // k.shape[0]
    keys = k[:, :stop].repeat_interleave(group, dim=0)
    scores = torch.matmul(q[:, start:stop], keys.transpose(1, 2)).div_(math.sqrt(dim))
    future_key = torch.ones(stop - start, stop - start, dtype=torch.bool).triu_(1)  # only the diagonal block has any
    scores[:, :, start:stop].masked_fill_(future_key, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs if stop == length or not pad else torch.nn.functional.pad(probs, (0, length - stop))


def _group_aggregate(probs: torch.Tensor, num_kv_heads: int, agg: str) -> torch.Tensor:
    """[Hq, c, T] -> [Hkv, c, T], max or mean over the query heads of each KV head's group."""
    grouped = probs.view(num_kv_heads, -1, *probs.shape[1:])
    return grouped.amax(dim=1) if agg == "max" else grouped.mean(dim=1)


def _attention_chunks(trace: Trace, layer: int, chunk: int, reverse: bool = False,
                      pad: bool = True) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, A [Hq, stop - start, T]) over query chunks of one layer (``pad=False``: only the
    keys the chunk sees, A [Hq, stop - start, stop])."""
    q, k = trace.q(layer), trace.k(layer)
    length = q.shape[1]
    starts = list(range(0, length, chunk))
    for start in reversed(starts) if reverse else starts:
        stop = min(start + chunk, length)
        yield start, stop, attention_probs(q, k, start, stop, pad)


def importance_table(trace: Trace, layer: int, agg: str = "max", chunk: int = 256) -> torch.Tensor:
    """Suffix sums of group-aggregated attention over queries: S [Hkv, T + 1, T].

    S[h, n, i] = sum_{j >= n} agg_g A_g[j, i], so I_n(i) = S[h, n, i] - S[h, n + f, i] for i < n.
    """
    _check_agg(agg)
    num_kv_heads, length = trace.spec.num_kv_heads, trace.length
    table = torch.zeros(num_kv_heads, length + 1, length)
    for start, stop, probs in _attention_chunks(trace, layer, chunk, reverse=True):
        rows = _group_aggregate(probs, num_kv_heads, agg)
        suffix = rows.flip(1).cumsum(1).flip(1)
        table[:, start:stop] = suffix + table[:, stop : stop + 1]
    return table


def importance_from_table(table: torch.Tensor, n: int, horizon: int | None = None) -> torch.Tensor:
    """I_n for every KV head of a table: [Hkv, T + 1, T] -> [Hkv, n]."""
    length = table.shape[2]
    end = length if horizon is None else min(n + horizon, length)
    return table[:, n, :n] - table[:, end, :n]


def check_prefix(trace: Trace, n: int) -> None:
    if not 1 <= n < trace.length:
        raise ValueError(f"n must be in [1, {trace.length}) for {trace!r} (T={trace.length}), got {n}")


def future_importance(
    trace: Trace, layer: int, kv_head: int, n: int, agg: str = "max", horizon: int | None = None
) -> torch.Tensor:
    """I [n]: attention each cached token i < n receives from the true future queries j >= n."""
    _check_agg(agg)
    check_prefix(trace, n)
    if not 0 <= kv_head < trace.spec.num_kv_heads:
        raise IndexError(f"kv_head {kv_head} out of range [0, {trace.spec.num_kv_heads})")
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be a positive number of queries or None, got {horizon}")
    q, k = trace.q(layer), trace.k(layer)
    end = trace.length if horizon is None else min(n + horizon, trace.length)
    group = trace.spec.group_size
    heads = slice(kv_head * group, (kv_head + 1) * group)
    probs = attention_probs(q[heads], k[kv_head : kv_head + 1], n, end)[:, :, :n]
    return _group_aggregate(probs, 1, agg)[0].sum(0)


def attention_received(trace: Trace, layer: int, n: int, chunk: int = 256) -> torch.Tensor:
    """Attention each token i < n has received from the past queries j < n, per query head: [Hkv, G, n].

    What H2O accumulates: sum_{j < n} A_g[j, i], with each softmax over the query's causal prefix.
    """
    check_prefix(trace, n)
    q, k = trace.q(layer)[:, :n], trace.k(layer)[:, :n]
    total = torch.zeros(q.shape[0], n)
    for start in range(0, n, chunk):
        total += attention_probs(q, k, start, min(start + chunk, n)).sum(1)
    return total.view(trace.spec.num_kv_heads, trace.spec.group_size, n)


def importance_rows(table: torch.Tensor, ns: torch.Tensor, horizon: int | None, width: int) -> torch.Tensor:
    """``importance_from_table`` at many prefix lengths: table [Hkv, T + 1, T], ns [R] -> [Hkv, R, min(width, T)].

    Row r holds I_n(i) for n = ns[r] and the first ``width`` tokens i (0 for i >= n; ns[r] = T gives
    zeros), clamped at 0 against float round-off.
    """
    length = table.shape[2]
    ns = ns.clamp(max=length)
    ends = ns.new_full(ns.shape, length) if horizon is None else (ns + horizon).clamp(max=length)
    cols = min(width, length)
    rows = (table[:, ns, :cols] - table[:, ends, :cols]).clamp_(min=0)
    return rows.masked_fill_(torch.arange(cols)[None, None, :] >= ns[None, :, None], 0.0)


def received_rows(trace: Trace, layer: int, ns: torch.Tensor, width: int, chunk: int = 256) -> torch.Tensor:
    """``attention_received`` at many prefix lengths, per query head: [Hkv, R, min(width, max n), G].

    Entry [h, r, i, g] = sum_{j < n} A_g[j, i] for n = ns[r] and the first ``width`` tokens i.
    """
    spec = trace.spec
    top = int(ns.clamp(max=trace.length).max())
    q, k = trace.q(layer)[:, :top], trace.k(layer)[:, :top]
    cols = min(width, top)
    out = torch.zeros(spec.num_heads, len(ns), cols)
    running = torch.zeros(spec.num_heads, 1, top)
    for start in range(0, top, chunk):
        stop = min(start + chunk, top)
        cumulative = running + attention_probs(q, k, start, stop).cumsum(1)  # row r: queries j <= start + r
        hits = ((ns > start) & (ns <= stop)).nonzero()[:, 0]
        out[:, hits] = cumulative[:, ns[hits] - start - 1, :cols]
        running = cumulative[:, -1:]
    return out.view(spec.num_kv_heads, spec.group_size, len(ns), cols).permute(0, 2, 3, 1)
