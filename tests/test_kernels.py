"""Triton kernels against their torch reference, run on CPU tensors under the Triton interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before kvp_gym.kernels imports Triton (it does so lazily)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvp_gym.kernels import (  # noqa: E402
    ACTIVATIONS,
    mlp_scores,
    select_and_compact,
    torch_mlp_scores,
    torch_select_and_compact,
)


def mlp_weights(heads: int, features: int, hidden: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(heads, features, hidden, generator=generator) / features**0.5,
        torch.randn(heads, hidden, generator=generator),
        torch.randn(heads, hidden, generator=generator),
        torch.randn(heads, generator=generator),
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 70, 130, 32), (2, 5, 9, 20)], ids=["smollm-like", "ragged"])
def test_mlp_scores_triton_matches_torch(activation, shape):
    heads, entries, features, hidden = shape
    x = torch.randn(heads, entries, features, generator=torch.Generator().manual_seed(1))
    weights = mlp_weights(heads, features, hidden)
    expected = torch_mlp_scores(x, *weights, activation)
    assert expected.shape == (heads, entries)
    torch.testing.assert_close(mlp_scores(x, *weights, activation, use_triton=True), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(mlp_scores(x, *weights, activation, use_triton=False), expected)


def test_mlp_scores_leading_batch_dims_and_half_inputs():
    x = torch.randn(2, 3, 40, 24).half()
    weights = mlp_weights(3, 24, 16)
    expected = torch.stack([torch_mlp_scores(x[i], *weights) for i in range(2)])
    got = mlp_scores(x, *weights, use_triton=True)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_mlp_scores_checks_shapes_and_activation():
    weights = mlp_weights(3, 24, 16)
    with pytest.raises(ValueError, match="w1 must have shape"):
        mlp_scores(torch.randn(2, 40, 24), *weights)
    with pytest.raises(ValueError, match="unknown activation"):
        mlp_scores(torch.randn(3, 40, 24), *weights, activation="tanh")


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    entries=st.integers(2, 90),
    dim=st.sampled_from([8, 16, 24]),
    data=st.data(),
)
def test_select_and_compact_triton_matches_torch(batch, heads, entries, dim, data):
    budget = data.draw(st.integers(1, entries))
    generator = torch.Generator().manual_seed(entries * 31 + budget)
    scores = torch.randn(batch, heads, entries, generator=generator)
    keys = torch.randn(batch, heads, entries, dim, generator=generator)
    values = torch.randn(batch, heads, entries, dim, generator=generator)
    protected = torch.zeros(batch, entries, dtype=torch.bool)
    protected[:, : min(budget, 2)] = True
    expected = torch_select_and_compact(scores, keys, values, budget, protected)
    got = select_and_compact(scores, keys, values, budget, protected, use_triton=True)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_select_and_compact_keeps_protected_then_best_in_order():
    scores = torch.tensor([[[5.0, 1.0, 9.0, -3.0, 7.0, 0.0]]])
    keys = torch.arange(6.0).reshape(1, 1, 6, 1).expand(1, 1, 6, 4)
    protected = torch.tensor([[[False, False, False, True, False, False]]])
    kept = select_and_compact(scores, keys, keys + 10, 3, protected, use_triton=False)
    assert kept.indices.tolist() == [[[2, 3, 4]]]
    assert kept.keys[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert kept.values[0, 0, :, 0].tolist() == [12.0, 13.0, 14.0]
    with pytest.raises(ValueError, match="budget must be in"):
        select_and_compact(scores, keys, keys, 7)


def test_forcing_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mlp_scores(torch.randn(3, 4, 24), *mlp_weights(3, 24, 16), use_triton=True)
