"""A policy with a heuristic's ranking in some layers: does it lose less perplexity than the policy alone?

    python examples/layer_fallback.py                                   # kvp's agents with h2o-norm in layer 0, 16 validation texts
    python examples/layer_fallback.py --layers 0 0,18 0,17,18           # several layer sets at once
    python examples/layer_fallback.py --source prose --suite full-v2    # the held-out test texts (after choosing!)

Without ``--suite`` the texts are validation texts: training-split prose windows drawn with a seed no recipe
uses (``--seed``, default 11), made once under $KVP_GYM_HOME/validation/. Choose the layers there, then check
the choice once on a suite's test texts. Each text's first ``ppl_prefix`` tokens are compressed once, the rest
scored, as in the leaderboard. Prints, per budget, the mean per-text perplexity ratio - 1 of the future oracle,
the policy, the heuristic and each mix (``kvp_gym.scorers.LayerMix``), and the paired bootstrap probability
that the mix beats the policy alone (``kvp_gym.eval.stats.probability_of_improvement``). A ``kvp-net`` policy is
compared by its own agents in every layer: the shipped ``kvp`` already ranks layer 0 by normalised H2O (this
example chose that; ``h2o_layers`` in its config).
"""

from __future__ import annotations

import argparse
import math

import torch

from agents.kvp_scorer import PerHeadKVPScorer
from kvp_gym import scorers
from kvp_gym.eval.downstream import continuation_nll, record_prefill, recording_window
from kvp_gym.eval.oracle import TraceOracle, trace_importance
from kvp_gym.eval.stats import probability_of_improvement
from kvp_gym.eval.suite import get_suite, resolve_budget
from kvp_gym.models import load_model
from kvp_gym.scorers import LayerMix, Scorer
from kvp_gym.traces import TraceDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="kvp", help="A registered scorer.")
    parser.add_argument("--fallback", default="h2o-norm", help="The registered scorer that ranks in --layers.")
    parser.add_argument("--layers", nargs="+", default=["0"], help="Layer sets, each comma-separated (0,18).")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--budgets", default="10%,25%", help="Comma-separated budgets (shares of the prefix or tokens).")
    parser.add_argument("--suite", default=None, help="Evaluate on this suite's test texts of --source instead.")
    parser.add_argument("--source", default="prose")
    parser.add_argument("--seed", type=int, default=11, help="The validation texts' seed (without --suite).")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    suite = get_suite(args.suite or "full-v2")
    dataset: TraceDataset = (suite.traces(only=(args.source,))[args.source] if args.suite
                             else suite.validation_traces(args.source, args.texts, args.seed))
    policy, fallback = scorers.get(args.policy), scorers.get(args.fallback)
    if isinstance(policy, PerHeadKVPScorer):
        policy = policy.with_h2o_layers([])
    policies: dict[str, Scorer] = {args.policy: policy, args.fallback: fallback}
    policies |= {f"{args.policy} + {args.fallback} in {layers}": LayerMix(policy, fallback, map(int, layers.split(",")))
                 for layers in args.layers}
    model, _ = load_model(suite.model)
    prefix = suite.ppl_prefix
    budgets = {setting: resolve_budget(setting if setting.endswith("%") else int(setting), prefix, suite.sink, suite.recent)
               for setting in args.budgets.split(",")}

    ratios: dict[tuple[str, str], list[float]] = {}
    texts = min(args.texts, len(dataset))
    for index in range(texts):
        trace = dataset[index]
        prefill = record_prefill(model, trace.tokens[None, :prefix], recording_window(policies.values()))
        oracle = TraceOracle(trace_importance(trace, prefix, agg=suite.agg))

        def nll(scorer: Scorer | None, budget: int | None) -> float:
            total, count = continuation_nll(model, trace, prefix, scorer, budget, suite.sink, suite.recent, prefill)
            return total / count

        full = nll(None, None)
        for setting, budget in budgets.items():
            for name, scorer in {"oracle": oracle, **policies}.items():
                ratios.setdefault((setting, name), []).append(math.exp(nll(scorer, budget) - full) - 1)
        print(f"text {index + 1}/{texts} done", flush=True)

    where = f"suite {args.suite}, test" if args.suite else f"validation (train split, seed {args.seed})"
    print(f"\n{args.source}, {texts} texts, {where}; perplexity ratio - 1 (%), P(better than {args.policy} alone)")
    for setting in budgets:
        for name in ("oracle", *policies):
            values = ratios[setting, name]
            line = f"{setting:>5} | {name:40s} | {100 * sum(values) / len(values):+7.2f}"
            if name not in ("oracle", args.policy):
                line += f" | {probability_of_improvement(values, ratios[setting, args.policy]):.2f}"
            print(line)


if __name__ == "__main__":
    main()
