"""ModelSpec: the shapes of a causal LM that traces, envs and agents agree on."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Attention geometry of a model. Two trace sets or checkpoints are compatible iff their specs are equal."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, name: str) -> ModelSpec:
        """Read the geometry from a transformers config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})

    def check_compatible(self, other: ModelSpec, what: str) -> None:
        """Raise a clear error if ``other`` (described by ``what``) was made for another model's shapes."""
        mine, theirs = self.to_dict(), other.to_dict()
        diffs = [f"{k}: {theirs[k]!r} != {mine[k]!r}" for k in mine if k != "name" and mine[k] != theirs[k]]
        if diffs:
            raise ValueError(
                f"{what} was made for model {other.name!r}, not {self.name!r} ({'; '.join(diffs)})"
            )
