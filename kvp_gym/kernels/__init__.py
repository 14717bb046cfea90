"""Hot paths of the inference cache: the per-head scoring MLP and the top-budget K/V compaction.

Each function has a plain torch path (the reference, used on CPU) and a Triton path, used
automatically for CUDA tensors. ``use_triton=True`` forces Triton, which on CPU tensors only runs
under the Triton interpreter: set ``TRITON_INTERPRET=1`` before the first call (the Triton module is
imported lazily, on first use, so that the variable is seen by its ``@triton.jit`` decorators).
"""

from __future__ import annotations

import os

import torch

from kvp_gym.kernels.reference import (
    ACTIVATIONS,
    Compacted,
    select_indices,
    torch_gather_entries,
    torch_mlp_scores,
    torch_select_and_compact,
)

__all__ = [
    "ACTIVATIONS",
    "Compacted",
    "mlp_scores",
    "select_and_compact",
    "select_indices",
    "torch_mlp_scores",
    "torch_select_and_compact",
    "triton_available",
]


def triton_available(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_triton(use_triton: bool | None, device: torch.device) -> bool:
    """None -> Triton on CUDA when available; True -> Triton or a clear error; False -> torch."""
    if use_triton is None:
        return device.type == "cuda" and triton_available(device)
    if use_triton and not triton_available(device):
        raise RuntimeError(
            f"use_triton=True but Triton cannot run on {device} tensors here (CPU tensors need TRITON_INTERPRET=1 "
            "set before the first kernel call, and triton must be installed)"
        )
    return use_triton


def mlp_scores(
    features: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "relu",
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Score every entry with its head's 2-layer MLP, all heads of a layer in one kernel.

    features [..., H, N, F] (any leading batch dims), w1 [H, F, K], b1 [H, K], w2 [H, K], b2 [H];
    activation in ``ACTIVATIONS``. Returns float32 scores [..., H, N]:
        s[h, n] = w2[h] . act(features[h, n] @ w1[h] + b1[h]) + b2[h]
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if features.dim() < 3:
        raise ValueError(f"features must be [..., H, N, F], got shape {tuple(features.shape)}")
    h, _, f = features.shape[-3:]
    k = w1.shape[-1]
    expected = {"w1": (h, f, k), "b1": (h, k), "w2": (h, k), "b2": (h,)}
    for name, tensor in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for features {tuple(features.shape)}, "
                             f"got {tuple(tensor.shape)}")
    if _resolve_triton(use_triton, features.device):
        from kvp_gym.kernels import _triton

        return _triton.mlp_scores(features, w1, b1, w2, b2, activation)
    return torch_mlp_scores(features, w1, b1, w2, b2, activation)


def select_and_compact(
    scores: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    budget: int,
    protected_mask: torch.Tensor | None = None,
    *,
    use_triton: bool | None = None,
) -> Compacted:
    """Keep the top-``budget`` entries of every (batch, head) row and compact K/V to them.

    scores [B, H, N] (higher = keep, no NaN), keys/values [B, H, N, d], protected_mask [B, H, N] or
    [B, N] (always kept, counted within the budget). Returns keys/values [B, H, budget, d] and the
    kept indices [B, H, budget], sorted ascending so that cache order is preserved. Selection is
    kvp_gym.ranking.ranking_order; the gather is a Triton kernel when Triton is used.
    """
    if keys.dim() != 4 or values.shape != keys.shape or tuple(scores.shape) != tuple(keys.shape[:3]):
        raise ValueError(
            f"need scores [B, H, N] and keys/values [B, H, N, d] of equal shape, got scores "
            f"{tuple(scores.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    indices = select_indices(scores, budget, protected_mask)
    if _resolve_triton(use_triton, keys.device):
        from kvp_gym.kernels import _triton

        kept_keys, kept_values = _triton.gather_entries(keys, values, indices)
    else:
        kept_keys, kept_values = torch_gather_entries(keys, values, indices)
    return Compacted(kept_keys, kept_values, indices)
