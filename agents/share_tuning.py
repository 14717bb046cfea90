"""Tune the head shares (``kvp_gym.cache.HeadShares``) for one ranking, on the continuation's loss through the model.

    python -m agents.share_tuning --policy kvp --steps 500 --out kvp-shares.safetensors \\
        --traces $KVP_GYM_HOME/recipes/smollm2/prose-train --traces $KVP_GYM_HOME/recipes/smollm2/docs-train ...

The fitted shares (``agents.head_shares``) average the future oracle's split of the budget: right for a ranking
that keeps what the oracle keeps. A real ranking misses in some heads more than in others, and the oracle gives
budget to heads whose attention is wide whether or not the loss needs those entries. This tunes the split for the
ranking it will serve, on what users feel. Each step draws a training example as fine-tuning does (``agents.finetune``:
trace, prefix n, budget fraction f), ranks every head's unprotected entries by the policy (fixed), and cuts each
head's soft keep-mask at its own count:

    shares   = softmax over all L * H heads of (log s(f) + delta)     s(f): the starting shares nearest f
    c        = split_budget(shares, kept, ranked)                    forward: the counts the cache would keep
    dc       = L * H * kept * d shares                               backward: the real-valued counts (straight-through)
    log m_i  = soft_keep_mask(scores, c, temperature)                each head's boundary at its own count

The loss is the continuation's mean NLL with the prefix cache softly evicted by log m. Only delta [L, H], shared by
every fraction, is trained (Adam); the scorer and the model are frozen. The shares written are softmax(log s(f) +
delta) at every fraction of the starting file, model-wide.

Policies: ``kvp`` (the shipped policy; its layers ranked by normalised H2O stay so), ``h2o-norm`` (normalised H2O,
from the importance stores' attention sums), ``oracle`` (the stores' future attention: the split an upper bound
would use), or any other registered heuristic (``expected-attention``, ``snapkv``, ``tova``, ...): its own ``score``
of each layer's view of the trace's prefix, as the cache shows it that layer right after prefilling the prefix
(``prefix_view``), so every heuristic can be compared with its split at its strongest.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from agents.finetune import FinetuneAgent, FinetuneConfig, continuation_loss, load_shares, soft_keep_mask
from agents.kvp_scorer import PerHeadKVPScorer
from kvp_gym import scorers
from kvp_gym.cache.evicting_cache import DEFAULT_QUERY_WINDOW
from kvp_gym.cache.head_shares import HeadShares
from kvp_gym.checkpoint import load_scorer
from kvp_gym.models.spec import ModelSpec
from kvp_gym.progress import progress_bar
from kvp_gym.ranking import ranking_order, split_budget
from kvp_gym.scorers import Scorer, ScoringView, is_future_only, score_view
from kvp_gym.traces import Trace, TraceDataset
from kvp_gym.utility.importance import attention_probs

STORE_POLICIES = ("kvp", "h2o-norm", "oracle")  # ranked from the importance stores; any other heuristic from the trace
OPTION_TYPES = {"prefixes": str, "set_weights": str, "fractions": str, "continuation": int, "temperature": float}


def prefix_view(trace: Trace, layer: int, n: int, spec: ModelSpec, needs: frozenset[str], query_window: int) -> ScoringView:
    """Layer ``layer``'s view of the trace's first ``n`` tokens, as an ``EvictingCache`` shows it to a scorer right after
    prefilling them: keys / values [1, H, n, d], positions 0..n-1, and what ``needs`` asks for: the last
    min(query_window, n) queries [1, H, G, w, d] and the attention each entry received from every query, summed
    [1, H, G, n] (causal softmax of q.k / sqrt(d), as the model attends)."""
    h, d = spec.num_kv_heads, spec.head_dim
    group = spec.num_heads // h
    keys = trace.k(layer)[:, :n].float()  # [H, n, d]
    queries = trace.q(layer).float() if needs & {"queries", "attention"} else None  # [Hq, T, d]
    optional: dict[str, torch.Tensor] = {}
    if "queries" in needs:
        w = min(query_window, n)
        optional["queries"] = queries[:, n - w:n].reshape(1, h, group, w, d)
        optional["query_positions"] = torch.arange(n - w, n)[None]
    if "attention" in needs:
        probs = attention_probs(queries, keys, 0, n, pad=False)  # [Hq, n, n], causal
        optional["attention"] = probs.sum(1).view(1, h, group, n)
    return ScoringView(
        keys=keys[None], values=trace.v(layer)[None, :, :n].float(), positions=torch.arange(n)[None],
        mask=torch.ones(1, n, dtype=torch.bool), layer=torch.tensor([layer]), kv_heads=torch.arange(h)[None],
        num_layers=spec.num_layers, num_kv_heads=h, rope_theta=spec.rope_theta, **optional,
    )


def heuristic_scores(scorer: Scorer, trace: Trace, n: int, heads: torch.Tensor, entries: torch.Tensor,
                     spec: ModelSpec) -> torch.Tensor:
    """``scorer``'s ranking of the heads [S, 2] (layer, KV head) on ``entries`` [M] at prefix n, each layer scored once
    on its ``prefix_view``, as ranks [S, M] (M - 1 for the entry kept first, 0 for the last; ties by position, as
    ``kvp_gym.ranking``): heuristics' scores have every scale (probabilities, norms, pinned entries), ranks give the
    soft keep-mask the same width around every head's cut."""
    window = getattr(scorer, "window_size", DEFAULT_QUERY_WINDOW)
    layers = sorted({int(layer) for layer in heads[:, 0]})
    scores = {layer: score_view(scorer, prefix_view(trace, layer, n, spec, scorer.needs, window))[0].float()
              for layer in layers}  # [H, n] each
    chosen = torch.stack([scores[int(layer)][head, entries] for layer, head in heads.tolist()])
    order = ranking_order(chosen, torch.ones_like(chosen, dtype=torch.bool))
    places = torch.arange(chosen.shape[1] - 1, -1, -1, dtype=torch.float).expand_as(chosen)
    return torch.empty_like(chosen).scatter_(-1, order, places)


class ShareTuner:
    """``update()``: one Adam step of delta (module docstring) on one drawn example; ``shares()``: the tuned split.

    ``scorer``: a KVP network (``agents.kvp_scorer``) reading the attention statistics; it draws and reads the
    examples as fine-tuning does and, for ``policy="kvp"``, ranks them. ``policy``: one of ``STORE_POLICIES`` or
    a registered heuristic's name (module docstring)."""

    def __init__(self, scorer: PerHeadKVPScorer, policy: str, traces: list[TraceDataset], start: HeadShares,
                 config: FinetuneConfig, lr: float = 0.02, seed: int = 0) -> None:
        make = None if policy in STORE_POLICIES else scorers.factory(policy)
        self.heuristic = None if make is None or getattr(make, "trainable", False) else make()
        if make is not None and (self.heuristic is None or is_future_only(self.heuristic) or hasattr(self.heuristic, "head_shares")):
            raise ValueError(f"--policy {policy!r}: expected {', '.join(STORE_POLICIES)} or a heuristic that ranks from "
                             f"the cache alone (no future input, no training, no head shares of its own)")
        if start.scope != "model":
            raise ValueError(f"share tuning starts from model-wide shares, got scope {start.scope!r}")
        scorer.requires_grad_(False)
        self.policy = policy
        self.agent = FinetuneAgent(scorer, traces, {}, config, total_steps=1)
        self.spec = traces[0].spec
        if (start.num_layers, start.num_kv_heads) != (self.spec.num_layers, self.spec.num_kv_heads):
            raise ValueError(f"the starting shares are for {start.num_layers} layers x {start.num_kv_heads} KV heads, "
                             f"the traces' model has {self.spec.num_layers} x {self.spec.num_kv_heads}")
        self.agent.reseed(seed)
        self.start = start
        self.log_start = start.shares.clamp_min(1e-6).log()  # [F, L, H]
        self.delta = torch.zeros(start.num_layers, start.num_kv_heads, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.delta], lr=lr)

    def ranking(self, batch: dict[str, torch.Tensor], trace: Trace, n: int, entries: torch.Tensor) -> torch.Tensor:
        """The policy's scores [S, M] of a ``features`` batch of ``entries`` [M] at prefix n (higher = keep)."""
        if self.heuristic is not None:
            return heuristic_scores(self.heuristic, trace, n, self.agent.heads, entries, self.spec)
        if self.policy == "oracle":
            return torch.log(batch["target"] + 1e-9)
        h2o = torch.log(batch["h2o"] + 1e-6)
        if self.policy == "h2o-norm":
            return h2o
        return torch.where(self.agent.deferred[:, None], h2o, self.agent.network_scores(batch))

    def head_counts(self, kept: int, ranked: int) -> torch.Tensor:
        """counts [S] of the trained heads when they keep ``kept`` of ``ranked`` on average: the cache's integer
        counts under ``shares()``, with the gradient of the real-valued ones (module docstring)."""
        layers, heads = self.delta.shape
        shares = (self.log_start[self.start.nearest_fraction(kept, ranked)] + self.delta).flatten().softmax(0)
        exact = split_budget(shares.detach(), kept, ranked).float()
        continuous = shares * (layers * heads * kept)
        return (exact + continuous - continuous.detach()).view(layers, heads)[self.agent.heads[:, 0], self.agent.heads[:, 1]]

    def update(self) -> float:
        agent = self.agent
        trace_set, position, trace, n = agent.draw()
        fraction = agent.fractions[int(torch.randint(len(agent.fractions), (1,), generator=agent.generator))]
        first, last = agent.protected.sink, n - agent.protected.recent
        counts = self.head_counts(max(1, int(fraction * n) - first - agent.protected.recent), last - first)
        entries = torch.arange(first, last)
        with torch.no_grad():
            scores = self.ranking(agent.features(agent.stores[trace_set], position, trace, n, entries), trace, n, entries)
        layers, heads = self.delta.shape
        bias = torch.zeros(layers, heads, n)
        bias[agent.heads[:, 0], agent.heads[:, 1], first:last] = soft_keep_mask(scores, counts, agent.config.temperature)
        nll = continuation_loss(agent.model, trace, n, bias, agent.config.continuation)
        self.optimizer.zero_grad()
        nll.backward()
        self.optimizer.step()
        return nll.item()

    def shares(self) -> HeadShares:
        tuned = (self.log_start + self.delta.detach()).flatten(1).softmax(-1).view_as(self.start.shares)
        return HeadShares(self.start.fractions, tuned, "model")


def tune_shares(policy: str, traces: Sequence[str | Path], out: str | Path, steps: int = 500, lr: float = 0.02,
                start: str = "default", seed: int = 0, save_every: int = 20, checkpoint: str | Path | None = None,
                **options: object) -> HeadShares:
    """Runs ``steps`` updates, writing the tuned shares to ``out`` every ``save_every`` and at the end.
    ``checkpoint``: the KVP network that ranks for ``policy="kvp"`` (a run directory or checkpoint file; default the
    shipped ``kvp``). ``options``: ``FinetuneConfig`` fields (prefixes, set_weights, fractions, continuation,
    temperature)."""
    if steps < 1 or save_every < 1:
        raise ValueError(f"steps and save_every must be >= 1, got {steps}, {save_every}")
    if checkpoint is not None and policy != "kvp":
        raise ValueError(f"--checkpoint ranks for --policy kvp only, got --policy {policy!r}")
    # the network ranks for "kvp"; for every policy, the examples are read as it reads them
    scorer = scorers.get("kvp") if checkpoint is None else load_scorer(checkpoint)
    tuner = ShareTuner(scorer, policy, [TraceDataset(path) for path in traces], load_shares(start),
                       FinetuneConfig(**options), lr, seed)
    ema = None
    with progress_bar(steps, f"tune shares for {policy}") as bar:
        for step in range(steps):
            nll = tuner.update()
            ema = nll if ema is None else 0.98 * ema + 0.02 * nll
            if (step + 1) % save_every == 0 or step + 1 == steps:
                tuner.shares().save(out)
            bar.advance(status=f"continuation_nll (EMA) {ema:.3f}, mean |delta| {tuner.delta.abs().mean():.3f}")
    return tuner.shares()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True,
                        help=f"{', '.join(STORE_POLICIES)} or a registered heuristic (expected-attention, snapkv, tova, ...)")
    parser.add_argument("--traces", type=Path, action="append", required=True, help="a trace set (repeatable)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--start", default="default", help="the shares to start from: 'default' (the fitted ones) or a file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=20, help="write the shares every K steps (and at the end)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a fine-tuning option ({', '.join(OPTION_TYPES)}; agents.finetune)")
    parser.add_argument("--checkpoint", type=Path, help="with --policy kvp: rank with this trained KVP network (a run "
                        "directory or checkpoint) instead of the shipped kvp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    options: dict[str, object] = {}
    for option in args.set:
        key, _, value = option.partition("=")
        if key not in OPTION_TYPES:
            parser.error(f"--set {option}: unknown option {key!r}; options: {', '.join(OPTION_TYPES)}")
        try:
            options[key] = OPTION_TYPES[key](value)
        except ValueError:
            parser.error(f"--set {option}: {key} must be a {OPTION_TYPES[key].__name__}")
    shares = tune_shares(args.policy, args.traces, args.out, args.steps, args.lr, args.start, args.seed,
                         args.save_every, args.checkpoint, **options)
    print(f"wrote {args.out}: shares for {args.policy}, {shares.num_layers} layers x {shares.num_kv_heads} KV heads, "
          f"model-wide, at fractions {shares.fractions.tolist()}")


if __name__ == "__main__":
    main()
