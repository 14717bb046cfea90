"""The per-head MLP scorer and the scorer checkpoint format (kvp_gym.checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from agents.mlp_scorer import PerHeadMLPScorer, position_features
from kvp_gym import scorers
from kvp_gym.models import ModelSpec
from kvp_gym.checkpoint import CheckpointError, load_scorer, read_header, save_scorer
from kvp_gym.scorers import ScoringView

SPEC = ModelSpec(name="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
PROTECTED = {"sink": 4, "recent": 16}


def make_view(batch: int = 3, heads: int = 2, n: int = 12, dim: int = 16, seed: int = 0) -> ScoringView:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, -3:] = False
    return ScoringView(
        keys=torch.randn(batch, heads, n, dim, generator=generator) * 5,
        values=torch.randn(batch, heads, n, dim, generator=generator),
        positions=torch.arange(n).expand(batch, n) * 2,
        mask=mask,
        layer=torch.tensor([0, 1, 1])[:batch],
        kv_heads=torch.arange(heads).expand(batch, heads),
        num_layers=2,
        num_kv_heads=2,
    )


def save(scorer: PerHeadMLPScorer, path: Path, spec: ModelSpec = SPEC) -> Path:
    return save_scorer(
        scorer, path, registry_name="mlp", config=scorer.config(), model_spec=spec,
        protected=PROTECTED, training={"agent": "kvp", "steps": 0}, env="KVEvict-v0",
    )


def test_scorer_contract_and_registry() -> None:
    scorer = scorers.get("mlp", num_layers=2, num_kv_heads=2, head_dim=16)
    assert isinstance(scorer, PerHeadMLPScorer) and isinstance(scorer, scorers.Scorer)
    view = make_view()
    scores = scorer.score(view)
    assert scores.shape == (3, 2, 12) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # each (layer, head) has its own MLP: the same inputs give different scores on another head
    swapped = dataclasses.replace(view, kv_heads=view.kv_heads.flip(-1))
    assert not torch.allclose(scorer.score(swapped), scores.flip(1))
    # padding does not change the scores of real entries (position features use the newest real entry)
    padded = make_view(n=12)
    padded.mask[1, -3:] = False
    trimmed = ScoringView(
        keys=padded.keys[1:2, :, :9], values=padded.values[1:2, :, :9], positions=padded.positions[1:2, :9],
        mask=padded.mask[1:2, :9], layer=padded.layer[1:2], kv_heads=padded.kv_heads[1:2], num_layers=2, num_kv_heads=2,
    )
    assert torch.allclose(scorer.score(padded)[1, :, :9], scorer.score(trimmed)[0], atol=1e-6)


def test_construction_is_seeded() -> None:
    a, b = PerHeadMLPScorer(2, 2, 16, seed=3), PerHeadMLPScorer(2, 2, 16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_position_features() -> None:
    positions = torch.tensor([[0, 5, 9, 0]])
    mask = torch.tensor([[True, True, True, False]])
    features = position_features(positions, mask)
    assert features.shape == (1, 4, 7)
    assert features[0, 2, 1] == 0  # the newest real entry has recency 0
    assert features[0, 0, 2] == 0 and features[0, 2, 2] == pytest.approx(0.9)


def test_save_load_round_trip(tmp_path: Path) -> None:
    scorer = PerHeadMLPScorer(2, 2, 16, hidden=8, seed=1)
    with torch.no_grad():
        scorer.feature_shift.normal_()
    file = save(scorer, tmp_path / "run")
    assert file == tmp_path / "run" / "scorer.safetensors"
    loaded = load_scorer(tmp_path / "run", expect_spec=SPEC)
    assert isinstance(loaded, PerHeadMLPScorer) and not loaded.training
    view = make_view()
    assert torch.equal(loaded.score(view), scorer.score(view))
    header = read_header(file)
    assert header.registry_name == "mlp" and header.model_spec == SPEC and header.protected == PROTECTED
    assert header.env == "KVEvict-v0" and header.training["agent"] == "kvp" and "torch" in header.versions


def test_ship_stores_float16_weights_that_load_as_float32(tmp_path: Path) -> None:
    from safetensors import safe_open

    from agents.shipped import ship

    scorer = PerHeadMLPScorer(2, 2, 16, hidden=8, seed=1)
    save(scorer, tmp_path / "run")
    shipped = ship(tmp_path / "run", tmp_path / "shipped.safetensors")
    with safe_open(str(shipped), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} <= {torch.float16, torch.int64}
    assert shipped.stat().st_size < (tmp_path / "run" / "scorer.safetensors").stat().st_size
    loaded = load_scorer(shipped)
    for name, tensor in scorer.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert loaded.state_dict()[name].dtype == tensor.dtype and torch.equal(loaded.state_dict()[name], expected), name
    assert read_header(shipped).training == read_header(tmp_path / "run").training


def test_ship_averages_the_weights_of_several_runs(tmp_path: Path) -> None:
    from agents.shipped import ship

    first, second = PerHeadMLPScorer(2, 2, 16, hidden=8, seed=1), PerHeadMLPScorer(2, 2, 16, hidden=8, seed=1)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(torch.randn_like(parameter))
    save(first, tmp_path / "a")
    save(second, tmp_path / "b")
    shipped = ship([tmp_path / "a", tmp_path / "b"], tmp_path / "mean.safetensors")
    loaded = load_scorer(shipped).state_dict()
    for name, tensor in first.state_dict().items():
        expected = ((tensor + second.state_dict()[name]) / 2).half().float() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(loaded[name], expected, rtol=0, atol=0)
    assert read_header(shipped).training["average_of"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    save(PerHeadMLPScorer(2, 2, 16, hidden=4, seed=1), tmp_path / "narrow")
    with pytest.raises(ValueError, match="share one architecture"):
        ship([tmp_path / "a", tmp_path / "narrow"], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_partial_heads_round_trip_and_missing_head(tmp_path: Path) -> None:
    scorer = PerHeadMLPScorer(2, 2, 16, heads=[(1, 0)])
    loaded = load_scorer(save(scorer, tmp_path / "one.safetensors"))
    view = make_view(batch=2, heads=1)
    view = dataclasses.replace(view, layer=torch.tensor([1, 1]))
    assert torch.equal(loaded.score(view), scorer.score(view))
    with pytest.raises(ValueError, match=r"no agent for \(layer, kv_head\) \[\(0, 0\)\]"):
        loaded.score(make_view(batch=1, heads=1))


def test_wrong_model_checkpoint_refused(tmp_path: Path) -> None:
    save(PerHeadMLPScorer(2, 2, 16), tmp_path / "run")
    smollm = ModelSpec(name="smollm2-135m", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0)
    with pytest.raises(ValueError, match="was made for model 'tiny', not 'smollm2-135m'.*num_layers: 2 != 30"):
        load_scorer(tmp_path / "run", expect_spec=smollm)
    with pytest.raises(CheckpointError, match="head_dim=16 but the model"):
        save(PerHeadMLPScorer(2, 2, 16), tmp_path / "bad", spec=dataclasses.replace(SPEC, head_dim=64))


def test_heuristic_checkpoint(tmp_path: Path) -> None:
    file = save_scorer(
        scorers.get("streamingllm", n_sink=2), tmp_path / "h.safetensors", registry_name="streamingllm",
        config={"n_sink": 2}, model_spec=SPEC, protected=PROTECTED, training={},
    )
    loaded = load_scorer(file)
    assert loaded.n_sink == 2


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no scorer checkpoint"):
        load_scorer(tmp_path / "missing")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_scorer(corrupt)
    scorer = PerHeadMLPScorer(2, 2, 16)
    with torch.no_grad():
        scorer.w2[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_scorer(save(scorer, tmp_path / "nan"))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_fit_normalization(tiny_traces) -> None:
    scorer = PerHeadMLPScorer(2, 2, 16, heads=[(0, 1)])
    scorer.fit_normalization([tiny_traces[0], tiny_traces[1]])
    keys = torch.cat([tiny_traces[0].k(0)[1], tiny_traces[1].k(0)[1]])
    assert torch.allclose(scorer.feature_shift[0, :16], keys.mean(0), atol=1e-5)
    assert torch.allclose(scorer.feature_scale[0, :16], keys.std(0), atol=1e-5)
    assert torch.equal(scorer.feature_shift[0, 32:], torch.zeros(7))
