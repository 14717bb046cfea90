"""The downstream oracle: future attention, read from the test trace itself, evicting in the real cache.

On a test trace the future is known, so the leaderboard can run the future-attention oracle inside
the real ``EvictingCache``: an upper bound for every downstream table (it reads the future; it is a
reference, not a policy). Only the leaderboard can build it, since it needs the trace:

    importance = trace_importance(trace, prefix)       # [L, Hkv, prefix]
    scorer = TraceOracle(importance)                   # needs = frozenset(): no live input at all

``TraceOracle.score`` looks the importance up by (view.layer, view.kv_heads, view.positions), so the
cache keeps, per (layer, KV head), the protected tokens plus the top entries of I_prefix.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvp_gym.scorers import ScoringView
from kvp_gym.traces import Trace
from kvp_gym.utility.importance import _check_agg, _group_aggregate, attention_probs, check_prefix

ORACLE = "future oracle"  # its row name in every downstream table


def trace_importance(trace: Trace, prefix: int, agg: str = "max", chunk: int = 256) -> torch.Tensor:
    """I_prefix [L, Hkv, prefix]: attention each token i < prefix receives from the true future j >= prefix,
    aggregated (``agg``: max or mean) over the query heads of each KV head's group, summed over j.

    The same number as ``kvp_gym.utility.future_importance`` (and the importance store's ``imp.<n>``),
    for every layer and KV head in one pass.
    """
    _check_agg(agg)
    check_prefix(trace, prefix)
    spec = trace.spec
    out = torch.zeros(spec.num_layers, spec.num_kv_heads, prefix)
    for layer in range(spec.num_layers):
        q, k = trace.q(layer), trace.k(layer)
        for start in range(prefix, trace.length, chunk):
            stop = min(start + chunk, trace.length)
            probs = attention_probs(q, k, start, stop)[:, :, :prefix]  # [Hq, c, prefix]
            out[layer] += _group_aggregate(probs, spec.num_kv_heads, agg).sum(1)
    return out


class TraceOracle:
    """Scores = the true future importance of one trace at one prefix: ``importance [L, Hkv, n]``.

    Reads nothing live (``needs`` is empty): the future is held, not given by the consumer. Entries at
    positions >= n (none when compressing once after an n-token prefill) score above every cached one.
    Every batch row of a view is taken to be the same trace.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    upper_bound: ClassVar[bool] = True  # reads the future: a reference row, not a policy

    def __init__(self, importance: torch.Tensor) -> None:
        if importance.dim() != 3:
            raise ValueError(f"importance must be [L, Hkv, n], got shape {tuple(importance.shape)}")
        self.importance = importance.float()

    def score(self, view: ScoringView) -> torch.Tensor:
        table = self.importance.to(view.keys.device)
        layers, kv_heads, n = table.shape
        b, h, _ = view.shape
        if int(view.layer.max()) >= layers or int(view.kv_heads.max()) >= kv_heads:
            raise ValueError(f"the view's layers/KV heads exceed the oracle's importance table {tuple(table.shape)}")
        per_head = table[view.layer[:, None], view.kv_heads]  # [B, H, n]
        positions = view.positions.clamp(min=0)
        inside = positions < n
        index = positions.clamp(max=n - 1)[:, None, :].expand(b, h, -1)  # [B, H, N]
        scores = per_head.gather(2, index)
        top = float(table.max()) + 1.0
        return torch.where(inside[:, None, :], scores, torch.full_like(scores, top))
