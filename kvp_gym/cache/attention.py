"""The ``kvp_evict`` attention: sdpa plus a hand-off of what an evicting cache layer needs to see.

transformers' Llama-style attention calls ``cache.update(k, v, layer_idx)`` and right after
it the attention function registered under ``config._attn_implementation``, in the same thread, with
nothing that links the two (``generate`` rejects extra keyword arguments). So an ``EvictingLayer``
leaves itself in a thread-local slot at ``update`` and this function picks it up, checks that it
belongs to the same layer, and shows it the queries, the 4D mask (padding) and the true position ids
of the forward before running the stock sdpa attention (a padded stack of caches also hides its empty
slots there), or, for a layer that sums the attention its entries receive, the layer's own one-pass
attention, and for a layer that stores ragged heads (head shares), its own masked attention. Without a pending
layer it *is* sdpa:
outputs are bit-identical to ``attn_implementation="sdpa"`` for any other cache.

The mask function is registered under the same name (transformers builds no causal mask for an
attention implementation it has no mask function for, silently making eager-style attention
non-causal).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

if TYPE_CHECKING:
    from kvp_gym.cache.layer import EvictingLayer

ATTN_IMPLEMENTATION = "kvp_evict"

_handoff = threading.local()
_SDPA_EXTRAS = ("position_bias", "s_aux", "softcap")  # inputs that change sdpa's attention beyond the mask


def hand_off(layer: EvictingLayer) -> None:
    """Called by a layer's ``update``: the next attention call in this thread is that layer's."""
    _handoff.layer = layer


def _evicting_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa attention; first shows query [B, Hq, q, d] and the mask [B, 1, q, kv] to the pending cache layer.

    A layer that sums the attention its entries receive (H2O-style scorers) computes the attention itself
    and returns it: one pass for the output and the sums (``EvictingLayer.attend``), sdpa's output to float32
    round-off. With ``one_pass_attention=False`` (recordings), dropout, or inputs that change sdpa's attention
    beyond the mask (a position bias, sinks), the sums take a pass of their own and the output is sdpa's.
    """
    layer = getattr(_handoff, "layer", None)
    _handoff.layer = None
    if layer is not None and layer.layer_idx == getattr(module, "layer_idx", None) and layer.holds(key):
        layer.observe(query, attention_mask, kwargs.get("position_ids"))
        if layer.folded:
            return layer.attend_folded(query, value, kwargs.get("scaling") or module.scaling), None
        attention_mask = layer.hide_empty_slots(attention_mask, query.shape[-2])
        if layer.accumulates_attention:
            one_pass = layer.settings.one_pass_attention and not kwargs.get("dropout") and all(
                kwargs.get(name) is None for name in _SDPA_EXTRAS)
            output = layer.attend(query, value, attention_mask, kwargs.get("scaling") or module.scaling, output=one_pass)
            if output is not None:
                return output, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _evicting_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_evicting_attention(config) -> None:
    """Switch a model config (the model's own object) to ``kvp_evict``; it must be sdpa-based (or unset)."""
    current = config._attn_implementation
    if current == ATTN_IMPLEMENTATION:
        return
    if current is not None and ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(current) is not sdpa_mask:
        raise ValueError(
            f"EvictingCache runs on sdpa attention, but the model uses attn_implementation={current!r}; "
            "load it with attn_implementation='sdpa'"
        )
    config._attn_implementation = ATTN_IMPLEMENTATION
