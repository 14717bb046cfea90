"""One layer of the evicting cache: stores K/V, the true position of every entry, and what the scorer
needs (recent queries, attention received); compresses to the budget when due.

Shapes: B = batch, H = KV heads, Hq = query heads, G = Hq // H, S = stored entries, q = new tokens,
w = query window, d = head dim.

With head shares (``HeadShares``) a compression keeps a different number of entries in each head. The layer then
stores its heads *folded* into one sequence, keys/values [B, 1, S, d] with ``head_of`` [S] naming each slot's KV
head, and computes its attention itself (``attend_folded``), no padding: H * budget entries, or with model-scope
shares the layer's own part of L * H * budget (so layers differ in length; the causal mask transformers builds from
layer 0's sizes is not used by a folded layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from kvp_gym.cache.attention import ATTN_IMPLEMENTATION, hand_off
from kvp_gym.cache.head_shares import HeadShares
from kvp_gym.kernels import select_and_compact
from kvp_gym.ranking import Protected, top_entries
from kvp_gym.scorers import Scorer, ScoringView, score_view

_FLOAT_MAX = torch.finfo(torch.float32).max
# Queries per softmax block when a layer computes its own attention: bounds memory, and at 64 a block's logits
# stay in a CPU's cache (the sums alone 1.7-1.8x faster than in blocks of 256 at 1k-2k tokens, round 19).
_ATTENTION_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class EvictionSettings:
    """What every layer of one cache shares (validated by ``EvictingCache``)."""

    scorer: Scorer
    scorer_name: str
    budget: int
    sink: int
    recent: int
    every: int | None
    query_window: int
    num_layers: int
    num_kv_heads: int
    use_triton: bool | None
    rope_theta: float | None = None
    one_pass_attention: bool = True
    head_shares: HeadShares | None = None

    @property
    def protected(self) -> Protected:
        return Protected(self.sink, self.recent)

    @property
    def needs_queries(self) -> bool:
        return "queries" in self.scorer.needs

    @property
    def needs_attention(self) -> bool:
        return "attention" in self.scorer.needs


@dataclasses.dataclass
class QueryWindow:
    """The last w queries seen: queries [B, Hq, w, d], positions [B, w] (true; -1 for padding queries)."""

    queries: torch.Tensor
    positions: torch.Tensor

    @staticmethod
    def last(queries: torch.Tensor, positions: torch.Tensor, size: int) -> QueryWindow:
        """The last ``size`` of the given queries, copied (a view would keep the whole forward's queries alive)."""
        return QueryWindow(queries[..., -size:, :].clone(), positions[:, -size:].clone())

    def extend(self, queries: torch.Tensor, positions: torch.Tensor, size: int) -> QueryWindow:
        joined = torch.cat([self.queries, queries], dim=-2), torch.cat([self.positions, positions], dim=-1)
        return QueryWindow.last(*joined, size)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QueryWindow:
        return QueryWindow(fn(self.queries), fn(self.positions))


class EvictingLayer(DynamicLayer):
    """A full-attention cache layer that keeps at most ``budget`` entries per KV head after compressing.

    ``keys``/``values`` [B, H, S, d] hold the kept entries in sequence order; ``positions`` [B, H, S]
    their true positions (-1 for padding). All heads (and all layers) store the same S, except after a compression
    by head shares: then [B, 1, S, d] and [B, 1, S], the heads folded (``head_of``, module docstring). A compression
    becomes due at the end of a forward and is applied lazily, at the start of the next ``update``,
    so the forward that made it due attended over the full K/V.
    """

    is_croppable = False

    def __init__(self, layer_idx: int, settings: EvictionSettings) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.window: QueryWindow | None = None
        self.attention: torch.Tensor | None = None  # [B, Hq, S] attention received, summed over queries
        self.head_of: torch.Tensor | None = None  # [S] KV head of each slot once the heads are folded (head shares)
        self.is_initialized = False
        self.seen = 0
        self.forwards = 0
        self.pending = False
        self.observed = True
        self.peak_stored = 0
        self.compressions = 0
        self.padded = False  # rows stacked from caches of different lengths: some slots hold no entry

    def adopt(self, prefilled: EvictingLayer) -> None:
        """Take over the state another cache's layer has right after its prefill, as if this layer had run it.

        ``prefilled`` must have run exactly one forward with no compression, collecting queries (a window
        at least this layer's) and attention; this layer keeps what its own scorer needs and compresses, when
        due, at the start of the next forward: the same entries, bit for bit, as after its own prefill.
        """
        if prefilled.forwards != 1 or prefilled.compressions:
            raise ValueError(f"layer {self.layer_idx}: can only adopt a cache right after its prefill (one forward, "
                             f"no compression); it has run {prefilled.forwards} forwards, {prefilled.compressions} compressions")
        settings = self.settings
        if settings.needs_queries and (prefilled.window is None or prefilled.window.positions.shape[-1] < min(
                settings.query_window, prefilled.seen)):
            raise ValueError(f"layer {self.layer_idx}: the prefilled cache kept fewer queries than this scorer's "
                             f"window of {settings.query_window}")
        if settings.needs_attention and prefilled.attention is None:
            raise ValueError(f"layer {self.layer_idx}: the prefilled cache did not accumulate attention")
        self.dtype, self.device = prefilled.dtype, prefilled.device
        self.keys, self.values = prefilled.keys, prefilled.values  # never written in place: compress and cat make new ones
        self.positions = prefilled.positions.clone()  # observe writes new entries' positions in place
        self.window = QueryWindow.last(prefilled.window.queries, prefilled.window.positions,
                                       settings.query_window) if settings.needs_queries else None
        self.attention = prefilled.attention if settings.needs_attention else None
        self.is_initialized, self.seen, self.forwards, self.observed = True, prefilled.seen, 1, True
        self.peak_stored = prefilled.peak_stored
        self.pending = self._compression_due()

    def stack(self, layers: list[EvictingLayer]) -> None:
        """Hold the rows of ``layers`` (one-shot caches, compressed, with the same tokens seen) as this
        layer's batch rows, to decode them together; nothing is compressed again. Rows that store fewer
        entries than the longest are left-padded with empty slots (position -1) that no query attends."""
        if any(layer.pending or layer.settings.every is not None or layer.seen != layers[0].seen for layer in layers):
            raise ValueError(f"layer {self.layer_idx}: only compressed one-shot caches with the same tokens seen stack")
        if any(layer.folded for layer in layers):
            raise ValueError(f"layer {self.layer_idx}: a cache with head shares stores ragged heads and decodes alone")
        length = max(layer.keys.shape[-2] for layer in layers)
        self.dtype, self.device = layers[0].dtype, layers[0].device
        self.keys = torch.cat([_left_pad(layer.keys, length, dim=-2) for layer in layers])
        self.values = torch.cat([_left_pad(layer.values, length, dim=-2) for layer in layers])
        self.positions = torch.cat([_left_pad(layer.positions, length, dim=-1, value=-1) for layer in layers])
        self.padded = any(layer.keys.shape[-2] < length for layer in layers)
        self.is_initialized, self.seen, self.observed = True, layers[0].seen, True
        self.forwards = max(layer.forwards for layer in layers)
        self.compressions = max(layer.compressions for layer in layers)
        self.peak_stored = max(layer.peak_stored for layer in layers)
        self.pending = False

    # -- what transformers asks -----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Compress if due, append the new entries [B, H, q, d]; return the K/V this forward attends over."""
        self._check_observed()
        if self.pending:
            self.compress()
        b, h, q, d = key_states.shape
        provisional = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        if self.folded:  # new entries go after the stored ones, head by head
            key_states, value_states = key_states.reshape(b, 1, h * q, d), value_states.reshape(b, 1, h * q, d)
            provisional = provisional.reshape(b, 1, h * q)
            self.head_of = torch.cat([self.head_of, torch.arange(h, device=self.device).repeat_interleave(q)])
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            # contiguous like DynamicLayer's concatenation, so that attention runs the same kernels
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
            self.positions = provisional.clone()
            self.is_initialized = True
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, provisional], dim=-1)
        self.seen += q
        self.forwards += 1
        self.observed = False
        self.peak_stored = max(self.peak_stored, self.entries_per_head)
        self.pending = self._compression_due()
        hand_off(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): the model derives the positions of new tokens from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the next forward, after its pending compression."""
        stored = self.stored_length
        return stored + query_length, self.seen - stored

    @property
    def stored_length(self) -> int:
        """Entries per head the next forward will find (the budget if a compression is pending)."""
        if not self.is_initialized:
            return 0
        return self.settings.budget if self.pending else self.entries_per_head

    @property
    def folded(self) -> bool:
        """Whether the heads are stored folded into one sequence (ragged heads, after a head-shares compression)."""
        return self.head_of is not None

    @property
    def entries_per_head(self) -> int:
        """Stored entries per KV head (on average, when folded)."""
        return self.keys.shape[-2] // self.settings.num_kv_heads if self.folded else self.keys.shape[-2]

    def kept_per_head(self) -> torch.Tensor:
        """[B, H] real entries each KV head stores."""
        real = (self.positions >= 0).long()
        if not self.folded:
            return real.sum(-1)
        per_head = torch.zeros(real.shape[0], self.settings.num_kv_heads, dtype=torch.long, device=self.device)
        return per_head.index_add_(1, self.head_of, real[:, 0])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an EvictingCache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- what the kvp_evict attention shows -----------------------------------------------------
    def holds(self, key: torch.Tensor) -> bool:
        """Whether ``key`` is what this layer just returned from ``update`` (same entry count)."""
        return self.is_initialized and key.shape[-2] == self.keys.shape[-2]

    def observe(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
        """Record true positions and padding of the q new entries, and the queries the scorer needs.

        query [B, Hq, q, d] post-RoPE; attention_mask [B, 1, q, S] (bool, True = attend) or None (causal,
        no padding); position_ids [B or 1, q] (the RoPE positions).
        """
        b, _, q, _ = query.shape
        s = self.keys.shape[-2]
        visible = _as_bool(attention_mask)
        if self.folded:
            if visible is not None and not bool(visible[:, 0, -1, -q:].all()):
                raise ValueError(f"layer {self.layer_idx}: a cache with head shares takes no padding")
            if position_ids is not None:  # the new slots hold the q tokens once per head, head by head
                h = self.settings.num_kv_heads
                self.positions[:, 0, s - h * q :] = position_ids.expand(b, q).repeat(1, h)
            self.observed = True
            return
        positions = self.positions[:, 0, s - q :] if position_ids is None else position_ids.expand(b, q)
        real = torch.ones_like(positions, dtype=torch.bool) if visible is None else visible[:, 0, -1, s - q :]
        if visible is not None:
            if self.forwards == 1:
                _require_left_padding(real)
            positions = positions.masked_fill(~real, -1)
        self.positions[:, :, s - q :] = positions[:, None, :]
        if self._collecting and self.settings.needs_queries:
            self._record_queries(query, positions)
        self.observed = True

    def hide_empty_slots(self, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
        """The forward's 4D mask [B, 1, q, S] (None: causal) with this layer's empty slots (a padded
        stack's) hidden from every query; unchanged if the layer has none."""
        if not self.padded:
            return attention_mask
        filled = self.positions[:, 0, :] >= 0  # [B, S]; the new tokens' slots are real
        visible = _as_bool(attention_mask)
        if visible is None:
            s = filled.shape[-1]
            slots = torch.arange(s, device=self.device)
            visible = slots[None, :] <= s - query_length + torch.arange(query_length, device=self.device)[:, None]
        return visible & filled[:, None, None, :]

    # -- compression -----------------------------------------------------------------------------
    def compress(self) -> None:
        """Keep the top-``budget`` entries of every head by the scorer (sink and recent tokens first)."""
        self._check_observed()
        settings = self.settings
        real = self.positions >= 0
        scores = self._score(real)
        priority = torch.where(real, scores.clamp(-_FLOAT_MAX, _FLOAT_MAX), -math.inf)
        if settings.head_shares is not None:
            self._compress_into_shares(priority, real)
            return
        kept = select_and_compact(
            priority, self.keys, self.values, settings.budget, settings.protected.mask(real), use_triton=settings.use_triton
        )
        self.keys, self.values = kept.keys, kept.values
        self.positions = self.positions.gather(-1, kept.indices)
        if settings.every is None:  # one-shot: nothing will be compressed again
            self.window = self.attention = None
        elif self.attention is not None:
            b, h, budget = kept.indices.shape
            grouped = self.attention.view(b, h, -1, self.attention.shape[-1])
            index = kept.indices[:, :, None, :].expand(b, h, grouped.shape[2], budget)
            self.attention = grouped.gather(-1, index).reshape(b, -1, budget)
        self.pending = False
        self.compressions += 1

    def _compress_into_shares(self, priority: torch.Tensor, real: torch.Tensor) -> None:
        """Keep every head's protected entries and its head-shares count of top-ranked ones; fold the heads.

        priority [B, H, N]. Every row keeps the same count per head, so the folded rows have equal lengths.
        """
        b, h, n, _ = self.keys.shape
        if not bool(real.all()):
            raise ValueError(f"layer {self.layer_idx}: a cache with head shares takes no padding (left-padded rows)")
        protected = self.settings.protected.mask(real)
        held = int(protected[0, 0].sum())
        shares = self.settings.head_shares.counts(self.layer_idx, self.settings.budget - held, n - held)
        counts = held + shares.to(self.device)  # the shares live on the CPU; the ranks they cut are the cache's
        keep = top_entries(torch.where(protected, math.inf, priority).reshape(b * h, n), counts.repeat(b)).view(b, h, n)
        slots = torch.arange(n, device=self.device).expand(b, n)
        indices = [slots[keep[:, head]].view(b, int(counts[head])) for head in range(h)]  # ascending, per head

        def folded(tensor: torch.Tensor) -> torch.Tensor:
            """[B, H, N, e] -> [B, 1, S, e]: each head's kept entries, head after head."""
            return torch.cat([tensor[:, head].gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))
                              for head, index in enumerate(indices)], dim=1)[:, None]

        self.keys, self.values = folded(self.keys), folded(self.values)
        self.positions = folded(self.positions[..., None])[..., 0]
        self.head_of = torch.arange(h, device=self.device).repeat_interleave(counts)
        self.window = self.attention = None
        self.pending = False
        self.compressions += 1

    def attend_folded(self, query: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """The attention output [B, q, Hq, d] of a folded layer: query head j attends the slots of KV head j // G at
        true positions up to its own. query [B, Hq, q, d] post-RoPE, value [B, 1, S, d] (this layer's values)."""
        b, hq, q, d = query.shape
        h, s = self.settings.num_kv_heads, self.keys.shape[-2]
        g = hq // h
        positions = self.positions[:, 0]  # [B, S]
        query_positions = positions[:, s - h * q : s - h * q + q]  # head 0's new slots
        causal = (positions[:, None, :] <= query_positions[:, :, None]) & (positions[:, None, :] >= 0)  # [B, q, S]
        own_head = self.head_of[None, :] == torch.arange(h, device=self.device)[:, None]  # [H, S]
        visible = (own_head[None, :, None, :] & causal[:, None]).repeat(1, 1, g, 1)  # [B, H, G * q, S]
        output = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h, g * q, d), self.keys.expand(b, h, s, d), value.expand(b, h, s, d), attn_mask=visible,
            scale=scaling)
        return output.view(b, hq, q, d).transpose(1, 2).contiguous()

    @property
    def _collecting(self) -> bool:
        """Whether this forward's queries/attention can still feed a compression."""
        return self.settings.every is not None or self.forwards == 1

    def _compression_due(self) -> bool:
        stored, budget, every = self.entries_per_head, self.settings.budget, self.settings.every
        if self.forwards == 1:
            return stored > budget
        return every is not None and stored >= budget + every

    def _score(self, real: torch.Tensor) -> torch.Tensor:
        """Scores [B, H, S] from the scorer, checked for shape and NaN."""
        b, h, s, _ = self.keys.shape
        view = self._view()
        scores = score_view(self.settings.scorer, view)
        if tuple(scores.shape) != tuple(view.shape):
            raise ValueError(
                f"scorer {self.settings.scorer_name!r} returned scores of shape {tuple(scores.shape)} "
                f"for a view of shape {view.shape} (layer {self.layer_idx})"
            )
        scores = scores.float().reshape(b, h, s)
        if bool((scores.isnan() & real).any()):
            raise ValueError(f"scorer {self.settings.scorer_name!r} returned NaN scores at layer {self.layer_idx}")
        return scores

    def _view(self) -> ScoringView:
        """The ScoringView of this layer's entries.

        Shared positions (always true for the first compression): one view row per batch row, all H
        heads. Otherwise (heads kept different tokens): one row per (batch row, head), H = 1.
        """
        b, h, s, d = self.keys.shape
        settings = self.settings
        shared = bool((self.positions == self.positions[:, :1]).all())
        rows, heads = (b, h) if shared else (b * h, 1)
        positions = self.positions[:, 0] if shared else self.positions.reshape(rows, s)
        kv_heads = torch.arange(h, device=self.device)
        queries = query_positions = attention = None
        if settings.needs_queries:  # padding queries have position -1; EvictingCache hides them per row
            w = self.window.positions.shape[-1]
            queries = self.window.queries.reshape(rows, heads, -1, w, d)
            query_positions = self.window.positions
            if not shared:
                query_positions = query_positions.repeat_interleave(h, dim=0)
        if settings.needs_attention:
            attention = self.attention.reshape(rows, heads, -1, s)
        return ScoringView(
            keys=self.keys.reshape(rows, heads, s, d),
            values=self.values.reshape(rows, heads, s, d),
            positions=positions.clamp(min=0),
            mask=positions >= 0,
            layer=torch.full((rows,), self.layer_idx, dtype=torch.long, device=self.device),
            kv_heads=kv_heads.expand(b, h) if shared else kv_heads.repeat(b)[:, None],
            num_layers=settings.num_layers,
            num_kv_heads=settings.num_kv_heads,
            queries=queries,
            query_positions=query_positions,
            attention=attention,
            rope_theta=settings.rope_theta,
        )

    def _record_queries(self, query: torch.Tensor, positions: torch.Tensor) -> None:
        size = self.settings.query_window
        if self.window is None:
            self.window = QueryWindow.last(query, positions, size)
        else:
            self.window = self.window.extend(query, positions, size)

    @property
    def accumulates_attention(self) -> bool:
        """Whether this forward's attention, summed over its queries, feeds a compression (see ``attend``)."""
        return self._collecting and self.settings.needs_attention

    def attend(self, query: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               output: bool = True) -> torch.Tensor | None:
        """Add this forward's softmax attention, summed over its queries, to ``attention`` [B, Hq, S]; with
        ``output``, return the attention's output [B, q, Hq, d] (sdpa's layout, equal to sdpa's to float32
        round-off), computed in the same pass.

        query [B, Hq, q, d] post-RoPE, value [B, H, S, d] (this layer's values), attention_mask [B, 1, q, S] or
        None (causal: new token i sits at slot S - q + i). Queries go in blocks; a block only reaches the slots
        up to its last query. A query that sees no slot (padding) adds nothing and outputs zeros.
        """
        b, hq, q, d = query.shape
        h, s = self.keys.shape[1], self.keys.shape[-2]
        g = hq // h
        visible = _as_bool(attention_mask)
        keys = self.keys.float()
        values = value.float() if output else None
        received = torch.zeros(b, h, g, s, dtype=torch.float32, device=self.device)
        result = torch.empty(b, h, g, q, d, dtype=torch.float32, device=self.device) if output else None
        for start in range(0, q, _ATTENTION_CHUNK):
            stop = min(q, start + _ATTENTION_CHUNK)
            rows, end = stop - start, s - q + stop
            block = query[:, :, start:stop].float().reshape(b, h, g * rows, d)
            logits = torch.matmul(block, keys[:, :, :end].transpose(-1, -2)).mul_(scaling).view(b, h, g, rows, end)
            if visible is None:  # causal: only the block's own slots hold keys some of its queries must not see
                ahead = torch.ones(rows, rows, dtype=torch.bool, device=self.device).triu_(1)
                logits[..., end - rows :].masked_fill_(ahead, -math.inf)
            else:
                logits.masked_fill_(~visible[:, :, start:stop, :end].unsqueeze(2), -math.inf)
            probs = logits.softmax(dim=-1)
            if visible is not None:
                probs.nan_to_num_(0.0)
            received[..., :end] += probs.sum(dim=-2)
            if output:
                result[:, :, :, start:stop] = torch.matmul(probs.view(b, h, g * rows, end), values[:, :, :end]).view(b, h, g, rows, d)
        before = torch.zeros(b, hq, q, dtype=torch.float32, device=self.device)
        if self.attention is not None:
            before = torch.cat([self.attention, before], dim=-1)
        self.attention = before + received.reshape(b, hq, s)
        return result.view(b, hq, q, d).transpose(1, 2).to(query.dtype).contiguous() if output else None

    def _check_observed(self) -> None:
        if not self.observed:
            raise RuntimeError(
                f"EvictingCache layer {self.layer_idx}: the model did not run the {ATTN_IMPLEMENTATION!r} attention, "
                "so the cache cannot see positions, padding or queries. Build the cache with the model's own "
                "config object: EvictingCache(..., config=model.config)"
            )

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (beam reorder, repeat, select) to every per-row tensor."""
        if not self.is_initialized:
            return
        self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)  # head_of: per slot
        if self.attention is not None:
            self.attention = fn(self.attention)
        if self.window is not None:
            self.window = self.window.map(fn)


def _left_pad(tensor: torch.Tensor, length: int, dim: int, value: int = 0) -> torch.Tensor:
    """``tensor`` padded at the start of ``dim`` (-2 or -1) to ``length`` with ``value``."""
    missing = length - tensor.shape[dim]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0) if dim == -2 else (missing, 0), value=value)


def _as_bool(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 4D mask as bool (True = attend); additive float masks use 0 for 'attend'."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def _require_left_padding(real: torch.Tensor) -> None:
    """real [B, q]: padding may only precede the real tokens of a row (decoder-only left padding)."""
    if bool((real[:, 1:] < real[:, :-1]).any()):
        raise ValueError(
            "EvictingCache supports left padding only (padding after real tokens found); "
            "set tokenizer.padding_side = 'left'"
        )
