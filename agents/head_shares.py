"""Fit per-head shares of the budget (``kvp_gym.cache.HeadShares``) on training traces.

    python -m agents.head_shares --traces $KVP_GYM_HOME/recipes/smollm2/prose-train \\
        --traces $KVP_GYM_HOME/recipes/smollm2/dialogue-train-b12 --texts 32 --scope model --out shares.safetensors

For each text, the future-attention oracle's importance at a prefix (``--prefix-share`` of the text) is split by
AdaKV at every ``--fractions`` of the ranked entries, across each layer's KV heads (``--scope layer``) or across all
the model's (``--scope model``); the shares are the mean split over the texts. Texts come in turn from the given sets
(the first ``--texts`` of each). The traces must hold queries.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kvp_gym.cache import HeadShares
from kvp_gym.cache.head_shares import SCOPES
from kvp_gym.eval.oracle import trace_importance
from kvp_gym.ranking import DEFAULT_PROTECTED, Protected
from kvp_gym.traces import TraceDataset

DEFAULT_FRACTIONS = (0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75)


def ranked_importances(sets: Sequence[TraceDataset], texts: int, prefix_share: float, protected: Protected,
                       agg: str = "max") -> Iterator[torch.Tensor]:
    """[L, H, M] per text: the oracle's importance of the ranked (not protected) entries of the prefix."""
    for dataset in sets:
        for index in range(min(texts, len(dataset))):
            trace = dataset[index]
            prefix = int(prefix_share * trace.length)
            yield trace_importance(trace, prefix, agg=agg)[..., protected.sink : prefix - protected.recent]


def fit_head_shares(sets: Sequence[TraceDataset], texts: int, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    prefix_share: float = 0.75, safeguard: float = 0.2, protected: Protected = DEFAULT_PROTECTED,
                    scope: str = "layer") -> HeadShares:
    specs = {(dataset.spec.num_layers, dataset.spec.num_kv_heads) for dataset in sets}
    if len(specs) != 1:
        raise ValueError(f"the trace sets come from models of different shapes (layers, KV heads): {sorted(specs)}")
    if not 0.0 < prefix_share < 1.0:
        raise ValueError(f"prefix_share must lie in (0, 1), got {prefix_share}")
    return HeadShares.fit(ranked_importances(sets, texts, prefix_share, protected), fractions, safeguard, scope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, action="append", required=True, help="a trace set (repeatable)")
    parser.add_argument("--texts", type=int, default=32, help="texts taken from each set")
    parser.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)),
                        help="comma-separated kept shares of the ranked entries to fit at")
    parser.add_argument("--prefix-share", type=float, default=0.75, help="the prefix compressed, as a share of each text")
    parser.add_argument("--safeguard", type=float, default=0.2, help="AdaKV's alpha: each head keeps at least this share")
    parser.add_argument("--scope", choices=SCOPES, default="layer",
                        help="split each layer's budget across its heads, or the model's across all heads")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sets = [TraceDataset(path) for path in args.traces]
    shares = fit_head_shares(sets, args.texts, [float(f) for f in args.fractions.split(",")], args.prefix_share,
                             args.safeguard, scope=args.scope)
    print(f"wrote {shares.save(args.out)}: {shares.num_layers} layers x {shares.num_kv_heads} KV heads, scope "
          f"{shares.scope}, at fractions {shares.fractions.tolist()}")


if __name__ == "__main__":
    main()
