"""The downstream oracle: future attention, read from the test trace itself, evicting in the real cache.

On a test trace the future is known, so the leaderboard can run the future-attention oracle inside
the real ``EvictingCache``: an upper bound for every downstream table (it reads the future; it is a
reference, not a policy). Only the leaderboard can build it, since it needs the trace:

    importance = trace_importance(trace, prefix)       # [L, Hkv, prefix]
    scorer = TraceOracle(importance)                   # needs = frozenset(): no live input at all

``TraceOracle.score`` looks the importance up by (view.layer, view.kv_heads, view.positions), so the
cache keeps, per (layer, KV head), the protected tokens plus the top entries of I_prefix.

Every head keeps the same budget in the ``ORACLE`` row. A policy whose split of the budget across heads is tuned
(``+tuned``) can beat that, so where shares are tuned for the oracle's own ranking on the suite's model
(``python -m agents.share_tuning --policy oracle``) the leaderboard also runs ``ORACLE_TUNED``, the oracle cut at
those shares (``oracle_rows``); a table's upper bound is the better of the two.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvp_gym.cache.head_shares import TUNED_MODEL, HeadShares, tuned_head_shares, tuned_policies
from kvp_gym.models.spec import ModelSpec
from kvp_gym.scorers import ScoringView
from kvp_gym.traces import Trace
from kvp_gym.utility.importance import _check_agg, _group_aggregate, attention_probs, check_prefix

ORACLE = "future oracle"  # its row name in every downstream table
ORACLE_TUNED = "future oracle+tuned"  # the same ranking with the split of the budget tuned for it
ORACLES = (ORACLE, ORACLE_TUNED)


def oracle_rows(spec: ModelSpec) -> list[str]:
    """The downstream oracle rows for traces of a model: ``ORACLE``, and ``ORACLE_TUNED`` where shares are tuned
    for the oracle on that model."""
    tuned = spec.name == TUNED_MODEL and "oracle" in tuned_policies()
    return [ORACLE, ORACLE_TUNED] if tuned else [ORACLE]


def oracle_shares(row: str) -> HeadShares | None:
    """The head shares an oracle row evicts with: None (equal budgets) for ``ORACLE``, the tuned ones for ``ORACLE_TUNED``."""
    if row not in ORACLES:
        raise ValueError(f"not an oracle row: {row!r}")
    return tuned_head_shares("oracle") if row == ORACLE_TUNED else None


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

    def __init__(self, importance: torch.Tensor, head_shares: HeadShares | None = None) -> None:
        if importance.dim() != 3:
            raise ValueError(f"importance must be [L, Hkv, n], got shape {tuple(importance.shape)}")
        self.importance = importance.float()
        if head_shares is not None:  # the cache splits the budget by the scorer's ``head_shares`` when it has one
            self.head_shares = head_shares

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
