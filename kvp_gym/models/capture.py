"""Record post-RoPE Q, K, V of every layer during an ordinary forward pass.

A tracing attention function is registered with transformers' ``AttentionInterface`` under the name
``kvp_capture``. It hands q/k/v to a store passed as a forward keyword argument and then runs the
stock sdpa attention, so outputs are unchanged. Its mask function is registered under the same name
with ``AttentionMaskInterface``; without it transformers builds no causal mask for the unknown name.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

CAPTURE_ATTENTION = "kvp_capture"


def _capturing_attention(module, query, key, value, attention_mask, kvp_capture=None, **kwargs):
    """sdpa attention that also records query [B, Hq, q, d] and key/value [B, Hkv, kv, d] of the layer."""
    if kvp_capture is not None:
        kvp_capture.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@dataclasses.dataclass
class CapturedQKV:
    """Per-layer tensors of one forward pass, batch row 0 only: q [Hq, T, d], k/v [Hkv, T, d]."""

    q: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    k: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    v: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    dtype: torch.dtype = torch.float16

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        self.q[layer] = query[0].detach().to(self.dtype).contiguous()
        self.k[layer] = key[0].detach().to(self.dtype).contiguous()
        self.v[layer] = value[0].detach().to(self.dtype).contiguous()


def enable_capture(model: PreTrainedModel) -> None:
    """Switch the model to the capturing attention (sdpa plus recording; identical outputs)."""
    if model.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"cannot trace attention of architecture {model.config.model_type!r}")
    if model.config._attn_implementation != CAPTURE_ATTENTION:
        model.set_attn_implementation(CAPTURE_ATTENTION)


@torch.inference_mode()
def capture_qkv(
    model: PreTrainedModel, input_ids: torch.Tensor, dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, CapturedQKV]:
    """Run one forward over ``input_ids [1, T]``; return logits [T, V] (fp32) and the captured Q/K/V."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture_qkv takes input_ids of shape [1, T], got {tuple(input_ids.shape)}")
    enable_capture(model)
    store = CapturedQKV(dtype=dtype)
    output = model(input_ids=input_ids, use_cache=False, kvp_capture=store)
    missing = sorted(set(range(model.config.num_hidden_layers)) - set(store.k))
    if missing:
        raise RuntimeError(f"attention capture saw no call for layers {missing}; is the architecture supported?")
    return output.logits[0].float(), store
