"""Triton kernels. Imported on first use only, so that ``TRITON_INTERPRET=1`` can be set before the
``@triton.jit`` decorators run (that is how the tests run these kernels on CPU tensors).

The kernels use Triton builtins and their own jit helpers only, none of triton.language's jit-defined
standard functions (``tl.sum``, ``tl.zeros``, ``tl.sigmoid``, ...): those are decorated when ``triton.language`` is first
imported (transformers imports it through torch._dynamo), possibly before the variable was set, and
the interpreter cannot call them then.

Both kernels expect contiguous tensors; the launchers make them so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvp_gym.kernels.reference import ACTIVATIONS

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _mlp_scores_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    H, N, F, K,
    ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program scores BLOCK_N entries of one row r (head r % H): x [R, N, F] -> out [R, N]."""
    row = tl.program_id(0).to(tl.int64)
    head = row % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_n = offs_n < N
    in_k = offs_k < K
    hidden = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        in_f = offs_f < F
        x = tl.load(x_ptr + row * N * F + offs_n[:, None] * F + offs_f[None, :],
                    mask=in_n[:, None] & in_f[None, :], other=0.0)
        w1 = tl.load(w1_ptr + head * F * K + offs_f[:, None] * K + offs_k[None, :],
                     mask=in_f[:, None] & in_k[None, :], other=0.0)
        hidden += tl.dot(x.to(tl.float32), w1.to(tl.float32), input_precision="ieee")
    hidden += tl.load(b1_ptr + head * K + offs_k, mask=in_k, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 0:  # relu
        hidden = tl.maximum(hidden, 0.0)
    elif ACTIVATION == 1:  # gelu (erf)
        hidden = 0.5 * hidden * (1.0 + tl.erf(hidden * 0.7071067811865476))
    else:  # silu
        hidden = hidden / (1.0 + tl.exp(-hidden))
    w2 = tl.load(w2_ptr + head * K + offs_k, mask=in_k, other=0.0).to(tl.float32)
    scores = tl.reduce(hidden * w2[None, :], 1, _add) + tl.load(b2_ptr + head).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, scores, mask=in_n)


@triton.jit
def _gather_entries_kernel(
    k_src, v_src, idx_ptr, k_dst, v_dst,
    N, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program copies BLOCK_M kept entries of one (batch, head) row: [R, N, D] -> [R, M, D]."""
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < M
    inside = in_m[:, None] & (offs_d < D)[None, :]
    index = tl.load(idx_ptr + row * M + offs_m, mask=in_m, other=0).to(tl.int64)
    src = row * N * D + index[:, None] * D + offs_d[None, :]
    dst = row * M * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(k_dst + dst, tl.load(k_src + src, mask=inside), mask=inside)
    tl.store(v_dst + dst, tl.load(v_src + src, mask=inside), mask=inside)


def mlp_scores(
    features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str
) -> torch.Tensor:
    """Triton launch of the per-head MLP: features [..., H, N, F] -> float32 scores [..., H, N]."""
    h, n, f = features.shape[-3:]
    k = w1.shape[-1]
    x = features.reshape(-1, n, f).contiguous()
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=features.device)
    block_n = 64
    grid = (x.shape[0], triton.cdiv(n, block_n))
    _mlp_scores_kernel[grid](
        x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out,
        h, n, f, k,
        ACTIVATION=_ACTIVATION_CODES[activation],
        BLOCK_N=block_n,
        BLOCK_F=min(64, max(16, triton.next_power_of_2(f))),
        BLOCK_K=max(16, triton.next_power_of_2(k)),
    )
    return out.reshape(*features.shape[:-1])


def gather_entries(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch of the K/V gather: keys/values [B, H, N, d], indices [B, H, M] -> [B, H, M, d] each."""
    b, h, n, d = keys.shape
    m = indices.shape[-1]
    keys, values, indices = keys.contiguous(), values.contiguous(), indices.contiguous()
    kept_keys = torch.empty((b, h, m, d), dtype=keys.dtype, device=keys.device)
    kept_values = torch.empty((b, h, m, d), dtype=values.dtype, device=values.device)
    block_m = 64
    grid = (b * h, triton.cdiv(m, block_m))
    _gather_entries_kernel[grid](
        keys, values, indices, kept_keys, kept_values,
        n, m, d,
        BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(d),
    )
    return kept_keys, kept_values
