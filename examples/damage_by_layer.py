"""Where a policy's mistakes cost perplexity: the future oracle evicts in every layer but one, the policy in that one.

    python examples/damage_by_layer.py                                   # kvp and h2o-norm, 8 full-v2 prose texts, 25% kept
    python examples/damage_by_layer.py --policies kvp,tova --budget 10% --texts 4 --source dialogue
    python examples/damage_by_layer.py --checkpoint runs/kvp             # a trained run as the policy

Held-out test texts of the ``full-v2`` suite (made on first use), the real model and cache: each text's first
``ppl_prefix`` tokens are compressed once, the rest scored. For every layer l, the oracle (the trace's own
future attention) ranks the entries of every layer except l, where the policy ranks them; the table shows
how much each layer's mistakes add to the all-oracle cache's perplexity (mean per-text ratio - 1), next to
the policy alone in every layer. A layer where the policy costs more than a heuristic is where training
should look. Writes the per-text figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from kvp_gym import scorers
from kvp_gym.checkpoint import load_scorer
from kvp_gym.eval.downstream import continuation_nll, record_prefill, recording_window
from kvp_gym.eval.oracle import TraceOracle, trace_importance
from kvp_gym.eval.suite import get_suite, resolve_budget
from kvp_gym.models import load_model
from kvp_gym.scorers import LayerMix, Scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="kvp,h2o-norm", help="Comma-separated registered scorers.")
    parser.add_argument("--checkpoint", action="append", default=[], help="A trained run to include (repeatable).")
    parser.add_argument("--source", default="prose", help="A perplexity source of the suite.")
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--budget", default="25%", help="Tokens kept per KV head, or a share of the prefix (10%%).")
    parser.add_argument("--suite", default="full-v2")
    parser.add_argument("--out", default="damage_by_layer.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    suite = get_suite(args.suite)
    policies: dict[str, Scorer] = {name: scorers.get(name) for name in args.policies.split(",") if name}
    policies |= {Path(path).name: load_scorer(path).eval() for path in args.checkpoint}
    dataset = suite.traces(only=(args.source,))[args.source]
    model, _ = load_model(suite.model)
    budget_setting = args.budget if args.budget.endswith("%") else int(args.budget)
    prefix = suite.ppl_prefix
    tokens = resolve_budget(budget_setting, prefix, suite.sink, suite.recent)
    layers = dataset.spec.num_layers

    texts = []
    for index in range(min(args.texts, len(dataset))):
        trace = dataset[index]
        prefill = record_prefill(model, trace.tokens[None, :prefix], recording_window(policies.values()))
        oracle = TraceOracle(trace_importance(trace, prefix, agg=suite.agg))

        def nll(scorer: Scorer | None, budget: int | None = tokens) -> float:
            total, count = continuation_nll(model, trace, prefix, scorer, budget, suite.sink, suite.recent, prefill)
            return total / count

        full, all_oracle = nll(None, None), nll(oracle)
        text = {"full": full, "oracle": all_oracle, "policies": {}}
        for name, policy in policies.items():
            text["policies"][name] = {"alone": nll(policy), "by_layer": [nll(LayerMix(oracle, policy, [layer])) for layer in range(layers)]}
        texts.append(text)
        print(f"text {index + 1}/{min(args.texts, len(dataset))} done", flush=True)

    def ratio(key: str | None, name: str | None = None, layer: int | None = None) -> float:
        """Mean over texts of exp(nll - reference) - 1: against the full cache (key="full") or the all-oracle cache."""
        values = []
        for text in texts:
            value = text["policies"][name]["by_layer"][layer] if layer is not None else (
                text["policies"][name]["alone"] if name else text["oracle"])
            values.append(math.exp(value - text[key]) - 1)
        return 100 * sum(values) / len(values)

    print(f"\n{args.source}, {len(texts)} texts, {args.budget} kept ({tokens} tokens of {prefix}); perplexity vs full cache:"
          f" oracle {ratio('full'):+.2f}%, " + ", ".join(f"{name} {ratio('full', name):+.2f}%" for name in policies))
    print("added to the all-oracle cache's perplexity (%) by the policy evicting in one layer:")
    print("layer | " + " | ".join(policies))
    for layer in range(layers):
        print(f"{layer:5d} | " + " | ".join(f"{ratio('oracle', name, layer):+6.2f}" for name in policies))
    print("sum   | " + " | ".join(f"{sum(ratio('oracle', name, layer) for layer in range(layers)):+6.2f}" for name in policies))
    print("alone | " + " | ".join(f"{ratio('oracle', name):+6.2f}" for name in policies))
    Path(args.out).write_text(json.dumps({"source": args.source, "budget": args.budget, "budget_tokens": tokens,
                                          "prefix": prefix, "texts": texts}, indent=1))


if __name__ == "__main__":
    main()
