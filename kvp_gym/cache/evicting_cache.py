"""``EvictingCache``: a transformers ``Cache`` that evicts for real, driven by any ``Scorer``.

Design (transformers 5.x, Llama-style attention):

* Equal counts, per-head token sets. After prefill (and, with ``every=L``, whenever L more tokens
  have been appended) every layer keeps, per (batch row, KV head), the ``budget`` entries the scorer
  ranks highest; the first ``sink`` and last ``recent`` real tokens are always kept (within the
  budget). The rest is physically dropped: stored K/V shrink to [B, H, budget, d]. Heads keep
  different tokens but every head of every layer stores the same number of entries, because
  transformers builds one causal mask per forward from layer 0's sizes.
* Head shares (optional, one-shot only). With a ``HeadShares`` (the scorer's ``head_shares``, or given) the heads
  of a layer split its H * budget entries by fixed shares instead, or (model-scope shares) all the model's heads
  split L * H * budget: ragged heads, stored folded into one sequence per layer, which attends with its own per-head
  mask (``EvictingLayer.attend_folded``), so layers may store different lengths. No padded rows.
* Lazy compression. A compression becomes due at the end of a forward and is applied at the start of
  the next one (in each layer's ``update``), so the forward that made it due attended over the full
  K/V, as kvpress compresses after the prefill attention. ``flush()`` applies pending compressions now.
* True positions. ``get_seq_length()`` is the number of tokens seen, so new tokens get their true
  RoPE positions; ``get_mask_sizes`` reports the stored length and offset ``seen - stored``, as
  transformers' sliding-window layer does. Kept entries stay in sequence order.
* Live scorer inputs. The cache switches the model's config to the ``kvp_evict`` attention (sdpa plus
  a hand-off, bit-identical outputs; see ``kvp_gym.cache.attention``): it shows each layer the true
  position ids and the padding of new tokens and, when the scorer needs them, the last
  ``query_window`` queries (SnapKV, TOVA) or the attention each entry has received (H2O, computed only
  then, with the attention's output in the same pass: sdpa's to float32 round-off).
* Padding. Each row is scored on its own real queries (``RealQueriesPerRow``), so a row evicts
  exactly as it would alone. Left-padded entries rank below every real entry. Kept entries stay in
  order, so the padding that must be kept (a row shorter than the budget) sits in the first slots,
  exactly where transformers' 2D-mask offset arithmetic looks for it: batches with left padding
  stay correct.

Scorers get a ``ScoringView`` of a layer: one row per batch row with all KV heads while the heads
hold the same positions (the first compression), else one row per (batch row, KV head) with H = 1.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvp_gym.cache.attention import use_evicting_attention
from kvp_gym.cache.head_shares import HeadShares
from kvp_gym.cache.layer import EvictingLayer, EvictionSettings
from kvp_gym.ranking import DEFAULT_PROTECTED
from kvp_gym.scorers import Scorer, ScoringView

LIVE_INPUTS = frozenset({"queries", "attention"})
DEFAULT_QUERY_WINDOW = 64


class EvictingCache(Cache):
    """A KV cache that keeps the ``budget`` best entries per KV head by ``scorer``.

    Args:
        scorer: any ``kvp_gym.scorers.Scorer`` (heuristic or trained agent).
        budget: entries kept per (layer, batch row, KV head), protected tokens included.
        config: the model's own config object (``model.config``); its attention is switched to
            ``kvp_evict`` (sdpa with a hand-off to this cache; see ``one_pass_attention``).
        sink, recent: the first/last real tokens that are always kept.
        every: None compresses once, after the first forward (the prefill); L re-compresses back to
            the budget whenever L tokens were appended since (the streaming setting): between forwards
            a layer stores at most ``budget + L - 1`` entries.
        query_window: queries kept for scorers that need them (default: the scorer's ``window_size``
            if it has one, else 64).
        use_triton: the compaction kernel (None: Triton on CUDA, torch otherwise).
        one_pass_attention: for a scorer that reads the attention entries received (H2O-style), compute the
            attention in the cache, output and sums in one pass (about sdpa's cost alone: the default), not
            sdpa plus a second pass for the sums (False: sdpa's outputs bit for bit; recordings use it).
        head_shares: split each layer's H * budget entries across its KV heads (or, model-scope shares, all layers'
            L * H * budget across all their heads) by these fixed shares (default: the scorer's ``head_shares``
            attribute, if it has one; None there = equal budgets). One-shot only, no padding.

    Use: ``model.generate(**inputs, cache=EvictingCache(scorer, 256, config=model.config))``.
    """

    def __init__(
        self,
        scorer: Scorer,
        budget: int,
        *,
        config: PreTrainedConfig,
        sink: int = DEFAULT_PROTECTED.sink,
        recent: int = DEFAULT_PROTECTED.recent,
        every: int | None = None,
        query_window: int | None = None,
        use_triton: bool | None = None,
        one_pass_attention: bool = True,
        head_shares: HeadShares | None = None,
    ) -> None:
        text_config = config.get_text_config(decoder=True)
        _check_full_attention(text_config)
        name = type(scorer).__name__
        _check_scorer(scorer, name)
        _check_budget(budget, sink, recent, every)
        window = query_window if query_window is not None else getattr(scorer, "window_size", DEFAULT_QUERY_WINDOW)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"query_window must be a positive int, got {window!r}")
        head_shares = head_shares if head_shares is not None else getattr(scorer, "head_shares", None)
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        _check_head_shares(head_shares, every, text_config.num_hidden_layers, num_kv_heads)
        self.settings = EvictionSettings(
            scorer=RealQueriesPerRow(scorer, name) if "queries" in scorer.needs else scorer,
            scorer_name=name,
            budget=budget,
            sink=sink,
            recent=recent,
            every=every,
            query_window=window,
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=num_kv_heads,
            use_triton=use_triton,
            rope_theta=_plain_rope_theta(text_config),
            one_pass_attention=one_pass_attention,
            head_shares=head_shares,
        )
        super().__init__(layers=[EvictingLayer(i, self.settings) for i in range(self.settings.num_layers)])
        use_evicting_attention(config)
        self.config = config
        self.is_recording = False

    @classmethod
    def recording(cls, config: PreTrainedConfig, query_window: int = DEFAULT_QUERY_WINDOW) -> EvictingCache:
        """A cache that never evicts and records what any scorer needs (the last ``query_window`` queries,
        the attention received), to run a prompt's prefill once and ``fork`` it per scorer and budget."""
        cache = cls(_Recorder(query_window), sys.maxsize, config=config, sink=0, recent=0, query_window=query_window,
                    one_pass_attention=False)
        cache.is_recording = True
        return cache

    def fork(self, scorer: Scorer | None, budget: int | None, *, sink: int = DEFAULT_PROTECTED.sink,
             recent: int = DEFAULT_PROTECTED.recent, use_triton: bool | None = None) -> EvictingCache:
        """A new cache holding this (``recording``) cache's prefill, to compress with ``scorer`` to ``budget``.

        It evicts exactly the entries a fresh ``EvictingCache(scorer, budget, ..., one_pass_attention=False)``
        would after running the same prefill itself (one-shot compression; the default one-pass attention of an
        H2O-style scorer's own prefill gives the same to float32 round-off), so one prefill serves every policy
        and budget. A None ``scorer`` (and budget) keeps every entry: the full cache. This cache is left as it
        is, to fork again.
        """
        if not self.is_recording:
            raise ValueError("only a cache made by EvictingCache.recording(...) can be forked")
        if scorer is None:
            scorer, budget, sink, recent = _Recorder(self.settings.query_window), sys.maxsize, 0, 0
        cache = EvictingCache(scorer, budget, config=self.config, sink=sink, recent=recent, use_triton=use_triton)
        for mine, prefilled in zip(cache.layers, self.layers):
            mine.adopt(prefilled)
        return cache

    @classmethod
    def stack(cls, caches: list[EvictingCache]) -> EvictingCache:
        """One cache whose batch rows are the rows of ``caches``: one-shot caches (``every=None``) that ran
        the same tokens (e.g. forks of one prefill at any budgets), each compressed (pending compressions
        are applied first). Rows that store fewer entries are left-padded with empty slots that attention
        skips. Decoding the stack decodes every cache at once."""
        for cache in caches:
            cache.flush()
        first = caches[0].settings
        budget = max(cache.settings.budget for cache in caches)
        stacked = cls(_Recorder(first.query_window), budget, config=caches[0].config, sink=first.sink, recent=first.recent)
        for index, layer in enumerate(stacked.layers):
            layer.stack([cache.layers[index] for cache in caches])
        return stacked

    def flush(self) -> None:
        """Apply pending compressions now (they otherwise happen at the start of the next forward)."""
        for layer in self.layers:
            if layer.pending:
                layer.compress()

    def report(self) -> CacheReport:
        """What the cache holds and saved (pending compressions are applied first)."""
        self.flush()
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            raise RuntimeError("the cache is empty: run a forward pass first")
        heads = self.settings.num_kv_heads
        bytes_stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
        bytes_full = sum(2 * layer.keys.shape[0] * heads * layer.seen * layer.keys.shape[-1] * layer.keys.element_size()
                         for layer in layers)
        per_head = [layer.keys.shape[-2] / (heads if layer.folded else 1) for layer in layers]  # ragged: a mean
        return CacheReport(
            seen=layers[0].seen,
            stored=round(sum(per_head) / len(per_head)),
            kept=torch.stack([layer.kept_per_head().cpu() for layer in layers]),
            bytes_stored=bytes_stored,
            bytes_full=bytes_full,
            peak_stored=max(layer.peak_stored for layer in layers),
            compressions=layers[0].compressions,
        )


class _Recorder:
    """The scorer of caches that never compress again: a recording cache (it needs every live input, its
    budget is never reached), a full-cache fork of one, or a stack of compressed caches."""

    needs = LIVE_INPUTS

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size

    def score(self, view: ScoringView) -> torch.Tensor:
        raise RuntimeError("a recording cache never compresses")


class RealQueriesPerRow:
    """Shows each view row only its own real queries, so batching never changes a row's eviction.

    The layers give every row the whole query window, left padding included (query position -1, the
    first slots of a row). Rows with the same number of real queries are scored together on a view
    trimmed to them; a row scores exactly as it would alone.
    """

    def __init__(self, scorer: Scorer, name: str) -> None:
        self.scorer = scorer
        self.name = name
        self.needs = scorer.needs

    def score(self, view: ScoringView) -> torch.Tensor:
        real = (view.query_positions >= 0).sum(dim=-1)
        counts = real.unique()
        if len(counts) == 1:
            return self.scorer.score(_last_queries(view, slice(None), int(counts[0])))
        scores = torch.empty(view.shape, device=view.keys.device)
        for count in counts.tolist():
            rows = (real == count).nonzero()[:, 0]
            part = self.scorer.score(_last_queries(view, rows, count))
            if tuple(part.shape) != (len(rows), *view.shape[1:]):
                raise ValueError(
                    f"scorer {self.name!r} returned scores of shape {tuple(part.shape)} for {len(rows)} rows "
                    f"of a view of shape {view.shape}"
                )
            scores[rows] = part.float()
        return scores


def _last_queries(view: ScoringView, rows: slice | torch.Tensor, count: int) -> ScoringView:
    """The view's ``rows`` with only their last ``count`` queries."""
    window = view.query_positions.shape[-1]

    def select(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows]

    return dataclasses.replace(
        view,
        keys=view.keys[rows], values=view.values[rows], positions=view.positions[rows], mask=view.mask[rows],
        layer=view.layer[rows], kv_heads=view.kv_heads[rows],
        queries=view.queries[rows][..., window - count :, :], query_positions=view.query_positions[rows][:, window - count :],
        attention=select(view.attention), future_importance=select(view.future_importance),
    )


@dataclasses.dataclass(frozen=True)
class CacheReport:
    """What an ``EvictingCache`` holds.

    seen:          tokens seen per sequence (padding included)
    stored:        entries stored per (layer, batch row, KV head), kept padding included (the mean over layers and
                   heads, with head shares)
    kept:          [L, B, H] real (non-padding) tokens kept
    bytes_stored:  bytes of the K/V tensors actually stored
    bytes_full:    bytes a full (non-evicting) cache would hold for the same tokens
    peak_stored:   most entries a layer held at once (what attention saw; the prompt during prefill)
    compressions:  compressions applied per layer
    """

    seen: int
    stored: int
    kept: torch.Tensor
    bytes_stored: int
    bytes_full: int
    peak_stored: int
    compressions: int

    @property
    def saved_fraction(self) -> float:
        """Fraction of the full cache's K/V bytes not stored."""
        return 1.0 - self.bytes_stored / self.bytes_full if self.bytes_full else 0.0

    def __str__(self) -> str:
        layers, batch, heads = self.kept.shape
        return (
            f"KV cache: {self.stored} of {self.seen} tokens stored per KV head ({layers} layers x {heads} KV heads"
            f"{f' x {batch} sequences' if batch > 1 else ''}), {_megabytes(self.bytes_stored)} instead of "
            f"{_megabytes(self.bytes_full)}: {self.saved_fraction:.1%} saved"
        )


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _plain_rope_theta(config: PreTrainedConfig) -> float | None:
    """The RoPE base for ``ScoringView.rope_theta``; None when the RoPE is scaled (not a plain rotation)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return None
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    return float(theta)


def _check_full_attention(config: PreTrainedConfig) -> None:
    """Only models whose stock cache is all full-attention layers (no sliding, linear or shared layers)."""
    layers = DynamicCache(config=config).layers
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if other:
        raise ValueError(f"EvictingCache supports full-attention layers only; this model also has {other}")


def _check_scorer(scorer: Scorer, name: str) -> None:
    if not callable(getattr(scorer, "score", None)) or not hasattr(scorer, "needs"):
        raise TypeError(f"{name} is not a Scorer (needs a `needs` set and a `score(view)` method)")
    impossible = set(scorer.needs) - LIVE_INPUTS
    if impossible:
        raise ValueError(
            f"scorer {name} needs {sorted(impossible)}, which an inference cache cannot compute "
            f"(only {sorted(LIVE_INPUTS)} are computed live; future attention is known only from a full trace)"
        )


def _check_head_shares(head_shares: HeadShares | None, every: int | None, num_layers: int, num_kv_heads: int) -> None:
    if head_shares is None:
        return
    if not isinstance(head_shares, HeadShares):
        raise ValueError(f"head_shares must be a HeadShares, got {type(head_shares).__name__}")
    if (head_shares.num_layers, head_shares.num_kv_heads) != (num_layers, num_kv_heads):
        raise ValueError(f"head_shares are for {head_shares.num_layers} layers x {head_shares.num_kv_heads} KV heads, "
                         f"the model has {num_layers} x {num_kv_heads}")
    if every is not None:
        raise ValueError("head_shares split a one-shot compression only (every=None)")


def _check_budget(budget: int, sink: int, recent: int, every: int | None) -> None:
    for arg, value in (("budget", budget), ("sink", sink), ("recent", recent), ("every", every)):
        if not (value is None and arg == "every") and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{arg} must be an int{' or None' if arg == 'every' else ''}, got {value!r}")
    if sink < 0 or recent < 0:
        raise ValueError(f"sink and recent must be >= 0, got sink={sink}, recent={recent}")
    if budget < max(1, sink + recent):
        raise ValueError(
            f"budget={budget} is smaller than the protected tokens (sink={sink} + recent={recent}); "
            f"use budget >= {max(1, sink + recent)} or protect fewer tokens"
        )
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1 decoding steps (or None for one compression), got {every}")
