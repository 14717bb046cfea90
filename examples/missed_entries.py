"""What a policy drops that the future oracle keeps, layer by layer: how much of the oracle's future attention it
loses, and whether the entries it gets wrong are the ones the continuation will copy from.

    python examples/missed_entries.py                                  # kvp and h2o-norm, layers 0,7,17,18,20, 25% kept
    python examples/missed_entries.py --policies kvp,tova --layers 18 --budget 10% --texts 16

Held-out prose texts of the ``full-v2`` suite (only that set is made on first use), the real model and cache:
each text's first ``ppl_prefix`` tokens are compressed once, by the oracle (the trace's own future attention)
and by each policy. Per layer, summed over heads and texts: the entries the oracle keeps and the policy evicts
(missed) and the other way round (kept wrongly); the oracle's kept future attention the policy loses (missed
minus kept wrongly, as a share of the oracle's); and, for missed, kept wrongly, oracle-kept and all entries,
the share whose previous token occurs again in the continuation (what an induction head attends to: the token
after an earlier occurrence of the current one) and whose own token does (what a copy head attends to). The
shares read the future, so they explain mistakes; they are not inputs a policy could have.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.eval.downstream import record_prefill, recording_window
from kvp_gym.eval.oracle import TraceOracle, trace_importance
from kvp_gym.eval.suite import get_suite, resolve_budget
from kvp_gym.models import load_model

FEATURES = ("previous token recurs", "token recurs")
GROUPS = ("missed", "kept wrongly", "oracle-kept", "all")


def recurrence(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """[2, prefix] bool: whether entry i's previous token, and its own token, occur in tokens[prefix:]."""
    future = torch.zeros(int(tokens.max()) + 1, dtype=torch.bool)
    future[tokens[prefix:]] = True
    own = future[tokens[:prefix]]
    return torch.stack([torch.cat([own.new_zeros(1), own[:-1]]), own])


def kept_positions(cache: EvictingCache, layer: int) -> list[set[int]]:
    """The positions each KV head of ``layer`` keeps after the (one-shot) compression."""
    cache.flush()
    return [set(row[row >= 0].tolist()) for row in cache.layers[layer].positions[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="kvp,h2o-norm", help="Comma-separated registered scorers.")
    parser.add_argument("--layers", default="0,7,17,18,20", help="Comma-separated layers to look at.")
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--budget", default="25%", help="Tokens kept per KV head, or a share of the prefix (10%%).")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    suite = get_suite("full-v2")
    policies = {name: scorers.get(name) for name in args.policies.split(",") if name}
    layers = [int(layer) for layer in args.layers.split(",")]
    dataset = suite.traces(only=("prose",))["prose"]
    model, _ = load_model(suite.model)
    prefix = suite.ppl_prefix
    budget = resolve_budget(args.budget if args.budget.endswith("%") else int(args.budget), prefix, suite.sink, suite.recent)

    counts: dict[tuple[int, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for index in range(min(args.texts, len(dataset))):
        trace = dataset[index]
        importance = trace_importance(trace, prefix, agg=suite.agg)  # [L, Hkv, prefix]
        features = recurrence(trace.tokens, prefix).float()
        prefill = record_prefill(model, trace.tokens[None, :prefix], recording_window(policies.values()))
        oracle, *compressed = (prefill.fork(scorer, budget, sink=suite.sink, recent=suite.recent)
                               for scorer in (TraceOracle(importance), *policies.values()))
        caches = dict(zip(policies, compressed))
        for layer in layers:
            oracle_kept = kept_positions(oracle, layer)
            for name, cache in caches.items():
                for head, (best, mine) in enumerate(zip(oracle_kept, kept_positions(cache, layer))):
                    mass = importance[layer, head]
                    groups = {"missed": sorted(best - mine), "kept wrongly": sorted(mine - best),
                              "oracle-kept": sorted(best), "all": list(range(prefix))}
                    count = counts[layer, name]
                    count["oracle mass"] += float(mass[groups["oracle-kept"]].sum())
                    count["mass lost"] += float(mass[groups["missed"]].sum() - mass[groups["kept wrongly"]].sum())
                    for group, positions in groups.items():
                        count[group] += len(positions)
                        for feature, values in zip(FEATURES, features):
                            count[group, feature] += float(values[positions].sum())
        print(f"text {index + 1}/{min(args.texts, len(dataset))} done", flush=True)

    heads, texts = dataset.spec.num_kv_heads, min(args.texts, len(dataset))
    print(f"\nprose, {texts} texts, {args.budget} kept ({budget} tokens of {prefix}), {heads} KV heads per layer")
    print("layer | policy | missed per head | oracle's future attention lost | "
          + " | ".join(f"{feature}: {' / '.join(GROUPS)}" for feature in FEATURES))
    for (layer, name), count in sorted(counts.items()):
        shares = [" / ".join(f"{count[group, feature] / max(count[group], 1):.2f}" for group in GROUPS) for feature in FEATURES]
        print(f"{layer} | {name} | {count['missed'] / (heads * texts):.1f} | {100 * count['mass lost'] / count['oracle mass']:.1f}% | "
              + " | ".join(shares))


if __name__ == "__main__":
    main()
