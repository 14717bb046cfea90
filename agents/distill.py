"""Distillation of the future-attention oracle: supervised regression of every head's ranking target.

ForesightKV's first stage, made cheap: instead of stepping the env, each update reads one
(trace, prefix n) from the importance store (``kvp_gym.utility.store``: the env's target I_n and the
attention statistics the cache has, precomputed once per trace set) and the keys / values from the
trace, and updates all heads at once on ``tokens`` entries drawn from the unprotected prefix:

    log-mse:  mean_i ((s_i - mean s) - (t_i - mean t))^2,  t_i = log(target_i + 1e-3)   (every entry counts)
    listnet:  - sum_i p_i log softmax(s)_i,  p_i = target_i / sum target                (the heavy entries count)
    pairwise: ForesightKV's hinge max(0, m - (s_i - s_j)) over the ordered pairs         (agents.pairwise)

target_i is I_n(i) (``target="imp"``, the env's agg=max reward target), its group mean (``"imp_mean"``)
or I_n(i) ||v_i|| (``"imp_vnorm"``), raised to ``power`` (below 1, ListNet's shares spread from the few heavy
entries toward those near the budgets' boundaries). ``prefixes`` lists the prefix lengths n drawn from (uniformly among a
trace's own); the words ``question`` and ``answer`` among them add, on the traces that have one (RULER,
dialogue), n = the question's first token (a context compressed before a new question) or the answer's (the
question compressed with it; ``kvp_gym.utility.store``). ``set_weights`` draws the rows of each trace set (in
``--traces`` order) that many times as often as the others (default: every row alike). Scores are compared within
a row only, so one ranking per head serves every budget, as in the env. Adam(W), linear warm-up then cosine decay, gradient clipping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from agents.common import ScheduledOptimizer
from agents.kvp_scorer import POOL_KERNEL, PerHeadKVPScorer, attention_features
from agents.pairwise import pairwise_hinge
from baselines._attention import avg_pool_in_position_order
from kvp_gym.ranking import DEFAULT_PROTECTED
from kvp_gym.traces import Trace, TraceDataset
from kvp_gym.utility.store import MARKS, ImportanceStore

LOSSES = ("log-mse", "listnet", "pairwise")
TARGETS = ("imp", "imp_mean", "imp_vnorm")


@dataclasses.dataclass
class DistillConfig:
    """Hyperparameters of one distillation update."""

    loss: str = "log-mse"
    target: str = "imp"
    power: float = 1.0
    prefixes: str = "256,512,768"
    tokens: int = 128
    window: int = 64
    lr: float = 1e-3
    lr_min: float = 1e-6
    warmup: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    margin: float = 0.01
    set_weights: str = ""


def distill_loss(kind: str, scores: torch.Tensor, target: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """The loss of the module docstring: scores, target [R, M] (target >= 0) -> scalar."""
    if kind == "listnet":
        share = target / target.sum(-1, keepdim=True).clamp_min(1e-9)
        return -(share * torch.log_softmax(scores, -1)).sum(-1).mean()
    if kind == "pairwise":
        return pairwise_hinge(scores, target[:, :, None] > target[:, None, :], margin)
    if kind != "log-mse":
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    log_target = torch.log(target + 1e-3)
    return ((scores - scores.mean(-1, keepdim=True)) - (log_target - log_target.mean(-1, keepdim=True))).pow(2).mean()


def build_stores(traces: list[TraceDataset], config: DistillConfig, show_progress: bool = True,
                 workers: int = 0) -> list[ImportanceStore]:
    """The importance store of every trace set at ``config``'s prefixes and window, its missing files
    written first (on ``workers`` Ray workers if > 0)."""
    words = [word.strip() for word in config.prefixes.split(",")]
    marks = [word for word in words if word in MARKS]
    try:
        prefixes = tuple(int(word) for word in words if word not in MARKS)
    except ValueError:
        raise ValueError(f"--set prefixes: expected token counts and optionally {' / '.join(MARKS)}, "
                         f"got {config.prefixes!r}") from None
    return [ImportanceStore.build(dataset, prefixes, config.window, show_progress, marks, workers) for dataset in traces]


def parse_set_weights(text: str, sets: int, option: str = "set_weights") -> list[float] | None:
    """``--set set_weights`` (or another per-set ``option``): "" -> None (every set alike), else one weight >= 0 per
    trace set, not all 0."""
    if not text:
        return None
    try:
        weights = [float(word) for word in text.split(",")]
    except ValueError:
        raise ValueError(f"--set {option}: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != sets or not all(0 <= weight < math.inf for weight in weights) or max(weights) == 0:
        raise ValueError(f"--set {option}: expected one finite weight >= 0 per trace set ({sets} sets), not all 0; "
                         f"got {text!r}")
    return weights


class DistillAgent:
    """Supervised distillation from an importance store; ``update()`` is one gradient step on all heads."""

    env_id = "KVEvict-v0"  # its target is that env's reward target
    protected = DEFAULT_PROTECTED

    def __init__(self, scorer: Any, traces: list[TraceDataset], env_kwargs: dict[str, Any], config: DistillConfig, total_steps: int) -> None:
        if not isinstance(scorer, PerHeadKVPScorer):
            raise ValueError(f"--agent distill / finetune train KVP's network (--arch kvp-net, or --init of a kvp-net run), "
                             f"not {type(scorer).__name__}")
        if config.loss not in LOSSES:
            raise ValueError(f"--set loss: must be one of {LOSSES}, got {config.loss!r}")
        if config.target not in TARGETS:
            raise ValueError(f"--set target: must be one of {TARGETS}, got {config.target!r}")
        weights = parse_set_weights(config.set_weights, len(traces))  # before the stores, which may take minutes
        self.scorer, self.config, self.traces = scorer, config, traces
        self.stores = build_stores(traces, config)
        self.examples = [(s, p) for s, store in enumerate(self.stores) for p in range(len(store))]
        self.example_weights = None if weights is None else torch.tensor([weights[s] for s, _ in self.examples])
        self.heads = torch.tensor(scorer.heads)  # [S, 2] (layer, kv_head) of each agent
        self.optimizer = ScheduledOptimizer(
            scorer.parameters(), lr=config.lr, lr_min=config.lr_min, warmup=config.warmup, total_steps=total_steps,
            max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay,
        )
        self.generator = torch.Generator()

    def reseed(self, seed: int) -> None:
        """Restart the example sampling from ``seed``."""
        self.generator.manual_seed(seed)

    def draw(self) -> tuple[int, int, Trace, int]:
        """One example: (trace set, its store's row, that row's trace, prefix n), uniform over the rows (or by
        ``set_weights``), then over the row's prefixes."""
        if self.example_weights is None:
            pick = int(torch.randint(len(self.examples), (1,), generator=self.generator))
        else:
            pick = int(torch.multinomial(self.example_weights, 1, generator=self.generator))
        store_index, position = self.examples[pick]
        store = self.stores[store_index]
        prefixes = store.prefixes_of(position)
        n = prefixes[int(torch.randint(len(prefixes), (1,), generator=self.generator))]
        return store_index, position, self.traces[store_index][store.indices[position]], n

    def sample(self) -> dict[str, torch.Tensor]:
        """One (trace, prefix) for every agent on ``tokens`` entries drawn from the unprotected prefix (``features``)."""
        trace_set, position, trace, n = self.draw()
        first, last = self.protected.sink, n - self.protected.recent
        entries = torch.randperm(last - first, generator=self.generator)[: self.config.tokens] + first
        return self.features(self.stores[trace_set], position, trace, n, entries)

    def features(self, store: ImportanceStore, position: int, trace: Trace, n: int,
                 entries: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the network reads at prefix n, on the same M ``entries`` [M] of every agent's head: keys / values
        [S, M, d], positions [S, M], the target and the attention statistics the scorer reads ([S, M] each)."""
        layers, kv_heads = self.heads[:, 0], self.heads[:, 1]
        needed = sorted({int(layer) for layer in layers})  # each layer read once, not once per head
        keys = torch.stack([trace.k(layer)[:, entries] for layer in needed])  # [L', Hkv, M, d]
        values = torch.stack([trace.v(layer)[:, entries] for layer in needed])
        row = torch.tensor([needed.index(int(layer)) for layer in layers])
        keys, values = keys[row, kv_heads], values[row, kv_heads]  # [S, M, d]
        stats = store.load(position)

        def pick_rows(name: str) -> torch.Tensor:
            """The store's statistic ``name`` at prefix n for every agent's head, on the drawn entries: [S, M]
            ("window_pool": the window's vote pooled over the whole prefix, then drawn)."""
            if name == "window_pool":  # the same pooling as a cache view of the whole prefix 0..n-1
                vote = stats[f"window.{n}"][layers, kv_heads].float()[None]  # [1, S, n]
                prefix = torch.arange(n)[None]
                return avg_pool_in_position_order(vote, prefix >= 0, prefix, POOL_KERNEL)[0][:, entries]
            return stats[f"{name}.{n}"][layers, kv_heads][:, entries].float()

        target = pick_rows("imp_mean" if self.config.target == "imp_mean" else "imp")
        if self.config.target == "imp_vnorm":
            target = target * values.norm(dim=-1)
        if self.config.power != 1.0:
            target = target.pow(self.config.power)
        return {
            "keys": keys, "values": values, "target": target, "n": torch.tensor(n),
            "positions": entries[None].expand(len(self.heads), -1),
            **{name: pick_rows(name) for name in self.scorer.statistics},
        }

    def network_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scorer's network on a ``features`` batch: [S, M], row s agent s's scores."""
        names = self.scorer.statistics
        extra = attention_features(*(batch[name] for name in names)) if names else None
        return self.scorer.network(torch.arange(len(self.heads)), batch["keys"], batch["values"],
                                   batch["n"] - 1 - batch["positions"], batch["positions"], extra)

    def update(self) -> dict[str, float]:
        batch = self.sample()
        loss = distill_loss(self.config.loss, self.network_scores(batch), batch["target"], self.config.margin)
        grad_norm = self.optimizer.step(loss)
        self.optimizer.advance()
        return {
            "train/distill_loss": loss.item(),
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.lr,
            "env_steps": float(len(self.heads)),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
