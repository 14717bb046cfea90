"""Every registered heuristic (and the oracle) on the same KVEvict-v0 episodes of held-out test traces.

    python examples/heuristics_table.py --traces DIR [DIR ...]

The episodes are every (layer, KV head) of every trace at prefixes of 25/50/75% of its length (the
leaderboard's grid); every scorer sees the same observations, but only the optional inputs it declares:
the last 64 queries (SnapKV, TOVA, ExpectedAttention), the attention received so far (H2O, h2o-norm),
the true future (oracle only).
"""

import argparse
import dataclasses

import numpy as np

from kvp_gym import scorers
from kvp_gym.eval.ranking import SuiteRanking
from kvp_gym.eval.suite import get_suite
from kvp_gym.traces import TraceDataset

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--traces", nargs="+", required=True, help="test trace directories")
parser.add_argument("--agg", default="max", choices=["max", "mean"])
args = parser.parse_args()

suite = dataclasses.replace(get_suite("full"), agg=args.agg)
policies = {name: scorers.get(name) for name in scorers.available() if name != "mlp"}  # mlp: untrained
ratios = {name: {} for name in policies}
for directory in args.traces:
    dataset = TraceDataset(directory)
    source = dataset.manifest["params"]["source"]
    evaluator = SuiteRanking(suite, source, dataset)
    for trace in range(len(dataset)):
        for record in evaluator.evaluate(trace, policies):
            ratios[record["policy"]].setdefault(source, []).extend(record["cost_ratio"])

sources = sorted({source for per_source in ratios.values() for source in per_source})
print(f"mean cost ratio over every layer x KV head x prefix (lower is better, oracle = 1); agg={args.agg}")
print(f"{'scorer':<14}{'all':>10}" + "".join(f"{source:>10}" for source in sources))
overall = {name: np.mean([r for values in per_source.values() for r in values]) for name, per_source in ratios.items()}
for name in sorted(policies, key=overall.get):
    print(f"{name:<14}{overall[name]:>10.3f}" + "".join(f"{np.mean(ratios[name][s]):>10.3f}" for s in sources))
