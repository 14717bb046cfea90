"""Per-head budgets shared within a layer (AdaKV) against equal budgets per head: perplexity through the model.

    python examples/head_budgets.py                                     # 16 validation texts, the default rows
    python examples/head_budgets.py --suite full-v2 --source prose      # the held-out test texts
    python examples/head_budgets.py --rows kvp kvp@oracle h2o-norm h2o-norm@h2o-norm --safeguard 0.5

A row is a ranking, ``X``: every KV head keeps its own top b entries by X's scores (the cache's rule), or
``X@Y``: X ranks within each head and the heads of a layer share one budget of H b, allocated by AdaKV on Y's
scores (``kvp_gym.ranking.shared_head_budgets``: each head keeps at least ``--safeguard`` of b). ``oracle`` is the
future-attention oracle read from the text itself, so ``kvp@oracle`` asks how much a policy would gain from knowing
how to split the budget, not only what to keep. The allocation needs scores comparable across heads (attention
shares, the oracle's future attention); a learned policy's are comparable only within a head, so it takes another
ranking's allocation.

Sink 4 + recent 16 are kept in every head, as in the leaderboard. The shares AdaKV gives vary with every text, so
they are run as masks (the cache runs fixed per-head shares, ``kvp_gym.cache.HeadShares``): the continuation's NLL through the frozen model with the evicted entries' attention
logits at -inf (``agents.finetune``'s soft-eviction attention with a hard mask; a row with equal budgets gives the
leaderboard's perplexity, from the traces' fp16 keys and values, to about 1e-4). Prints, per budget, each row's mean
per-text perplexity ratio - 1 (%) and, for ``X@Y``, the paired bootstrap probability that it beats ``X``.
"""

from __future__ import annotations

import argparse
import math

import torch

from agents.finetune import SOFT_EVICTION, continuation_loss
from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.eval.downstream import record_prefill, recording_window
from kvp_gym.eval.oracle import trace_importance
from kvp_gym.eval.stats import probability_of_improvement
from kvp_gym.eval.suite import get_suite, resolve_budget
from kvp_gym.models import load_model
from kvp_gym.ranking import shared_head_budgets, top_entries
from kvp_gym.scorers import Scorer, ScoringView
from kvp_gym.traces import TraceDataset

DEFAULT_ROWS = ("h2o-norm", "h2o-norm@h2o-norm", "expected-attention", "expected-attention@expected-attention", "snapkv",
                "snapkv@snapkv", "oracle", "oracle@oracle", "kvp", "kvp@snapkv", "kvp@oracle")


class ScoreTap:
    """Wraps a scorer and keeps the scores it gives each layer: ``scores[layer]`` [B, H, N]."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer, self.needs, self.scores = scorer, scorer.needs, {}
        if hasattr(scorer, "window_size"):  # the queries it reads
            self.window_size = scorer.window_size

    def score(self, view: ScoringView) -> torch.Tensor:
        scores = self.scorer.score(view)
        self.scores[int(view.layer[0])] = scores.float()
        return scores


def layer_scores(prefill: EvictingCache, scorer: Scorer) -> torch.Tensor:
    """[L, H, n]: the scorer's scores of every entry of a recorded prefill of n tokens."""
    tap = ScoreTap(scorer)
    prefill.fork(tap, prefill.get_seq_length() - 1).flush()
    return torch.stack([tap.scores[layer][0] for layer in range(len(prefill.layers))])


def kept_entries(ranking: torch.Tensor, allocation: torch.Tensor | None, kept: int, safeguard: float) -> torch.Tensor:
    """keep [L, H, M] bool: in every layer, each head's top entries by ``ranking`` [L, H, M], ``kept`` per head, or
    as many as AdaKV on ``allocation`` [L, H, M] gives it (``shared_head_budgets``)."""
    equal = torch.full((ranking.shape[1],), kept, device=ranking.device)
    return torch.stack([
        top_entries(ranking[layer], equal if allocation is None else shared_head_budgets(allocation[layer], kept, safeguard))
        for layer in range(ranking.shape[0])
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="X or X@Y, X and Y registered scorers or oracle.")
    parser.add_argument("--safeguard", type=float, default=0.2, help="AdaKV's alpha: the share of b each head keeps at least.")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--budgets", default="10%,25%", help="Comma-separated budgets per head (shares of the prefix or tokens).")
    parser.add_argument("--suite", default=None, help="Evaluate on this suite's test texts of --source instead.")
    parser.add_argument("--source", default="prose")
    parser.add_argument("--seed", type=int, default=11, help="The validation texts' seed (without --suite).")
    args = parser.parse_args()
    malformed = [row for row in args.rows if row.count("@") > 1 or not all(row.split("@"))]
    if malformed or not 0.0 <= args.safeguard <= 1.0:
        parser.error(f"--rows must be X or X@Y (got {malformed}) and --safeguard in [0, 1] (got {args.safeguard})")
    torch.set_grad_enabled(False)

    rows = {row: tuple(row.split("@")) if "@" in row else (row, None) for row in args.rows}
    names = sorted({name for ranker, allocator in rows.values() for name in (ranker, allocator) if name} - {"oracle"})
    policies = {name: scorers.get(name) for name in names}  # an unknown name fails here, before any model runs
    suite = get_suite(args.suite or "full-v2")
    dataset: TraceDataset = (suite.traces(only=(args.source,))[args.source] if args.suite
                             else suite.validation_traces(args.source, args.texts, args.seed))
    model, _ = load_model(suite.model)
    prefix, sink, recent = suite.ppl_prefix, suite.sink, suite.recent
    ranked = slice(sink, prefix - recent)
    budgets = {setting: resolve_budget(setting if setting.endswith("%") else int(setting), prefix, sink, recent)
               for setting in args.budgets.split(",")}

    layers = model.config.num_hidden_layers
    ratios: dict[tuple[str, str], list[float]] = {}
    texts = min(args.texts, len(dataset))
    for index in range(texts):
        trace = dataset[index]
        model.config._attn_implementation = "sdpa"  # the recording cache runs on sdpa, the NLL below on masks
        prefill = record_prefill(model, trace.tokens[None, :prefix], recording_window(policies.values()))
        scores = {name: layer_scores(prefill, scorer)[..., ranked] for name, scorer in policies.items()}
        if any("oracle" in pair for pair in rows.values()):
            scores["oracle"] = trace_importance(trace, prefix, agg=suite.agg)[..., ranked]
        model.config._attn_implementation = SOFT_EVICTION

        def nll(keep: torch.Tensor | None) -> float:
            bias = torch.zeros(layers, model.config.num_key_value_heads, prefix)
            if keep is not None:
                bias[..., ranked] = torch.where(keep, 0.0, -math.inf)
            return float(continuation_loss(model, trace, prefix, bias, trace.length - prefix))

        full = nll(None)
        for setting, budget in budgets.items():
            kept = budget - sink - recent
            for row, (ranker, allocator) in rows.items():
                keep = kept_entries(scores[ranker], scores[allocator] if allocator else None, kept, args.safeguard)
                ratios.setdefault((setting, row), []).append(math.exp(nll(keep) - full) - 1)
        print(f"text {index + 1}/{texts} done", flush=True)

    where = f"suite {args.suite}, test" if args.suite else f"validation (train split, seed {args.seed})"
    print(f"\n{args.source}, {texts} texts, {where}, safeguard {args.safeguard}; perplexity ratio - 1 (%), "
          "P(X@Y beats X)")
    width = max(map(len, rows))
    for setting in budgets:
        for row, (ranker, allocator) in rows.items():
            values = ratios[setting, row]
            line = f"{setting:>5} | {row:{width}s} | {100 * sum(values) / len(values):+7.2f}"
            if allocator and (setting, ranker) in ratios:
                line += f" | {probability_of_improvement(values, ratios[setting, ranker]):.2f}"
            print(line)


if __name__ == "__main__":
    main()
