"""Fine-tuning through the model: the continuation's loss with a softly evicted cache, back-propagated to the scores.

Distillation (``agents.distill``) fits the oracle's attention mass; what users feel is the model's loss once the
cache is compressed, and which entries that loss needs is not always where the attention mass is
(docs/learned-eviction.md, rounds 14-19). This agent trains on that loss itself, starting from a distilled
policy (``--init``). Each update draws one (trace, prefix n) as distillation does, a budget fraction f, scores
every unprotected entry of every head, and turns each head's ranking into a soft keep-mask:

    z_i = (s_i - mean s) / std s            over the head's unprotected entries
    m_i = sigmoid((z_i - t) / T)             t = (z_(k) + z_(k+1)) / 2, z_(k) the k-th largest z,
                                             k = budget - sink - recent, budget = f n

Then the frozen model runs the next ``continuation`` tokens with the trace's keys and values of the prefix as its
cache, every query's attention logit to prefix entry i shifted by log m_i (protected entries: m = 1):
a hard top-k eviction as T -> 0. The loss is the continuation's mean NLL (the leaderboard's perplexity, tokens
n + 1 ... n + continuation); its gradient reaches only the scorer. Entries near the head's budget boundary get the
largest gradients: raising one that the continuation needs lowers the loss. Layers the scorer ranks by normalised
H2O (``h2o_layers``) get its hard top-k mask, as ``score`` evicts them.

With ``anchor`` > 0 the loss adds ``anchor`` times distillation's loss (``loss``, ``target``: ``agents.distill``) on
the same scores, which holds the ranking near the attention mass it was distilled from while the NLL moves it. A
faster fine-tune without it forgot a retrieval the distilled policy had (docs/learned-eviction.md, round 20).
``anchor_sets`` scales it per trace set (in ``--traces`` order; default 1 everywhere), e.g. 0 on prose to guard
retrieval on the RULER and dialogue sets only (round 23: that held prose back as much as the anchor everywhere).

With ``shares`` (``default``: the shipped ``kvp_gym.cache.HeadShares``, or a file of them) each head's soft mask is
cut at its own count, the budget that head gets under ``+shares`` (``HeadShares.counts``), instead of one k for all;
the scorer carries the shares, so downstream validation measures it as ``+shares`` evicts.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

from agents.distill import DistillAgent, DistillConfig, distill_loss, parse_set_weights
from kvp_gym.cache.head_shares import HeadShares, default_head_shares
from kvp_gym.models import load_model
from kvp_gym.traces import Trace, TraceDataset

SOFT_EVICTION = "kvp_soft_eviction"
_prefix_bias = threading.local()  # .bias: [L, Hkv, n] log keep-mask of the prefix entries, read per layer


def load_shares(spec: str) -> HeadShares:
    """``default`` -> the shipped head shares; anything else is read as a HeadShares file."""
    if spec == "default":
        return default_head_shares()
    if not Path(spec).is_file():
        raise ValueError(f"--set shares: expected 'default' or a head-shares file, got {spec!r} (no such file)")
    return HeadShares.load(spec)


def soft_eviction_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the pending prefix bias of ``module.layer_idx`` added to the logits of the first n keys.

    query [B, Hq, q, d], key / value [B, Hkv, n + q, d], attention_mask [B, 1, q, n + q] (bool, True = attend)
    -> (output [B, q, Hq, d], attention [B, Hq, q, n + q]). Every query head of a GQA group gets its KV head's bias.
    """
    groups = query.shape[1] // key.shape[1]
    bias = _prefix_bias.bias[module.layer_idx]  # [Hkv, n]
    logits = query @ repeat_kv(key, groups).transpose(-1, -2) * (scaling or module.scaling)
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    n = bias.shape[-1]
    logits = torch.cat([logits[..., :n] + bias.repeat_interleave(groups, 0)[None, :, None], logits[..., n:]], -1)
    attention = logits.softmax(-1)
    return (attention @ repeat_kv(value, groups)).transpose(1, 2).contiguous(), attention


AttentionInterface.register(SOFT_EVICTION, soft_eviction_attention)
AttentionMaskInterface.register(SOFT_EVICTION, sdpa_mask)


def soft_keep_mask(scores: torch.Tensor, kept: int | torch.Tensor, temperature: float) -> torch.Tensor:
    """log m (module docstring): scores [S, M] -> [S, M], the log of each entry's soft keep-mask when ``kept`` of
    the M are kept: one count for every row, or a count per row ([S], 0..M). A row keeping all M (or none) has its
    boundary half a unit of z below its lowest (above its highest) score. A count between integers moves the boundary
    linearly between neighbouring sorted scores, so real-valued counts have a gradient (``agents.share_tuning``)."""
    z = (scores - scores.mean(-1, keepdim=True)) / scores.std(-1, keepdim=True).clamp_min(1e-6)
    ranked = z.sort(-1, descending=True).values
    padded = torch.cat([ranked[:, :1] + 1, ranked, ranked[:, -1:] - 1], -1)  # padded[:, k] = z_(k), the k-th largest
    place = torch.as_tensor(kept, dtype=z.dtype).expand(len(z))[:, None] + 0.5  # between the last kept and the first dropped
    low = place.detach().floor().long().clamp(0, padded.shape[1] - 2)
    weight = place - low
    boundary = (1 - weight) * padded.gather(-1, low) + weight * padded.gather(-1, low + 1)
    return F.logsigmoid((z - boundary) / temperature)


def hard_keep_mask(scores: torch.Tensor, kept: int | torch.Tensor) -> torch.Tensor:
    """0 on each row's ``kept`` highest scores (one count, or [S] counts per row), -inf elsewhere: [S, M] -> [S, M]."""
    order = scores.argsort(-1, descending=True).argsort(-1)  # each entry's place in its row's ranking
    kept = torch.as_tensor(kept, dtype=torch.long).expand(len(scores))[:, None]
    return torch.zeros_like(scores).masked_fill(order >= kept, float("-inf"))


@torch.no_grad()
def prefix_cache(trace: Trace, n: int, config: Any) -> DynamicCache:
    """A DynamicCache holding the trace's keys and values of tokens 0..n-1 in every layer (fp32)."""
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        cache.update(trace.k(layer)[None, :, :n].float(), trace.v(layer)[None, :, :n].float(), layer)
    return cache


def continuation_loss(model: Any, trace: Trace, n: int, bias: torch.Tensor, continuation: int) -> torch.Tensor:
    """Mean NLL of tokens n + 1 .. n + c (c = ``continuation``, or fewer at the trace's end) with the prefix cache
    softly evicted by ``bias`` [L, Hkv, n] (log keep-masks; ``model`` uses the ``SOFT_EVICTION`` attention)."""
    tokens = trace.tokens
    end = min(n + continuation, trace.length - 1)
    _prefix_bias.bias = bias
    try:
        logits = model(tokens[None, n:end], cache=prefix_cache(trace, n, model.config), use_cache=True).logits[0]
    finally:
        _prefix_bias.bias = None
    return F.cross_entropy(logits.float(), tokens[n + 1 : end + 1])


@dataclasses.dataclass
class FinetuneConfig(DistillConfig):
    """Distillation's example sampling and optimiser, plus the eviction the loss sees."""

    fractions: str = "0.1,0.25"
    temperature: float = 0.1
    continuation: int = 256
    lr: float = 1e-4
    warmup: int = 20
    anchor: float = 0.0
    anchor_sets: str = ""
    shares: str = ""


class FinetuneAgent(DistillAgent):
    """``update()``: one gradient step of the continuation's loss (module docstring) on every head at once."""

    def __init__(self, scorer: Any, traces: list[TraceDataset], env_kwargs: dict[str, Any], config: FinetuneConfig,
                 total_steps: int) -> None:
        try:  # every option is checked before the importance stores, which may take minutes
            fractions = [float(word) for word in config.fractions.split(",")]
        except ValueError:
            raise ValueError(f"--set fractions: expected comma-separated budget fractions, got {config.fractions!r}") from None
        if (not all(0 < f < 1 for f in fractions) or config.temperature <= 0 or config.continuation < 1
                or config.anchor < 0):
            raise ValueError(f"--set fractions must lie in (0, 1), temperature > 0, continuation >= 1 and anchor >= 0; "
                             f"got {config.fractions!r}, {config.temperature}, {config.continuation}, {config.anchor}")
        anchor_sets = parse_set_weights(config.anchor_sets, len(traces), "anchor_sets")
        head_shares = load_shares(config.shares) if config.shares else None
        super().__init__(scorer, traces, env_kwargs, config, total_steps)
        self.fractions = fractions
        self.anchor_weights = [config.anchor * weight for weight in anchor_sets or [1.0] * len(traces)]
        self.model, _ = load_model(traces[0].manifest["params"]["model"])
        self.model.requires_grad_(False)
        self.model.config._attn_implementation = SOFT_EVICTION
        self.deferred = torch.isin(self.heads[:, 0], torch.tensor(scorer.h2o_layers, dtype=torch.long))
        if head_shares is not None:
            spec = self.model.config
            if (head_shares.num_layers, head_shares.num_kv_heads) != (spec.num_hidden_layers, spec.num_key_value_heads):
                raise ValueError(f"--set shares={config.shares}: shares for {head_shares.num_layers} layers x "
                                 f"{head_shares.num_kv_heads} KV heads, the model has {spec.num_hidden_layers} x "
                                 f"{spec.num_key_value_heads}")
            scorer.head_shares = head_shares
        self.head_shares = head_shares

    def head_counts(self, kept: int, ranked: int) -> int | torch.Tensor:
        """The ranked entries each trained head keeps ([S] with shares, else ``kept`` for all) when they keep
        ``kept`` of ``ranked`` on average."""
        if self.head_shares is None:
            return kept
        counts = torch.stack([self.head_shares.counts(layer, kept, ranked) for layer in range(self.head_shares.num_layers)])
        return counts[self.heads[:, 0], self.heads[:, 1]]

    def update(self) -> dict[str, float]:
        trace_set, position, trace, n = self.draw()
        fraction = self.fractions[int(torch.randint(len(self.fractions), (1,), generator=self.generator))]
        first, last = self.protected.sink, n - self.protected.recent
        kept = max(1, int(fraction * n) - first - self.protected.recent)  # entries kept besides the protected ones
        batch = self.features(self.stores[trace_set], position, trace, n, torch.arange(first, last))
        scores = self.network_scores(batch)
        counts = self.head_counts(kept, last - first)
        log_mask = soft_keep_mask(scores, counts, self.config.temperature)
        if bool(self.deferred.any()):  # ranked by normalised H2O, hard, as ``score`` evicts them
            log_mask = torch.where(self.deferred[:, None], hard_keep_mask(batch["h2o"], counts), log_mask)
        spec = self.model.config
        bias = torch.zeros(spec.num_hidden_layers, spec.num_key_value_heads, n)
        bias[self.heads[:, 0], self.heads[:, 1], first:last] = log_mask
        nll = continuation_loss(self.model, trace, n, bias, self.config.continuation)
        loss, metrics = nll, {"train/continuation_nll": nll.item()}
        if self.anchor_weights[trace_set]:
            learned = ~self.deferred
            anchor = distill_loss(self.config.loss, scores[learned], batch["target"][learned], self.config.margin)
            loss = nll + self.anchor_weights[trace_set] * anchor
            metrics["train/anchor_loss"] = anchor.item()
        grad_norm = self.optimizer.step(loss)
        self.optimizer.advance()
        return {
            **metrics,
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.lr,
            "env_steps": float(len(self.heads)),
        }
