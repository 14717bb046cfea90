"""The Scorer contract and the scorer registry.

Every eviction policy, heuristic or learned, is a ``Scorer``: it reads a ``ScoringView`` of cached
entries and returns one score per entry, higher = keep. The env, the leaderboard and the inference
cache call scorers only through this contract, so the same object works in all three.

Third-party scorers register through the ``kvp_gym.scorers`` entry-point group (see pyproject.toml)
or at run time with ``register(name, factory)``. Any name plus ``+shares`` (``kvp+shares``, ``h2o-norm+shares``) is
that scorer carrying the default model's fitted head shares (``kvp_gym.cache.HeadShares``): an evicting cache then
splits the budget across the KV heads by them instead of equally (since round 27 across all the model's heads).
``+tuned`` (``kvp+tuned``, ``h2o-norm+tuned``) carries instead the shares tuned through the model for that policy's
own ranking (round 28; ``kvp_gym.cache.head_shares.tuned_head_shares``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

OPTIONAL_INPUTS = ("queries", "attention", "future_importance")


@dataclasses.dataclass
class ScoringView:
    """What a scorer sees of a cache. B = batch, H = KV heads in the view, N = cached entries.

    keys, values:        [B, H, N, d]   post-RoPE, as the attention kernel sees them
    positions:           [B, N]         true token positions of the entries (long)
    mask:                [B, N]         True for real entries, False for padding
    layer:               [B]            layer index of each batch row (long)
    kv_heads:            [B, H]         KV-head index of each head in the view (long)
    num_layers:          int            layers of the model the view comes from
    num_kv_heads:        int            KV heads per layer of that model

    Optional inputs (None unless the scorer declares it needs them and the caller can give them):
    queries:             [B, H, G, w, d] the last w queries of each KV head's group (post-RoPE), in
                                         ascending position order: the last one is the current token
    query_positions:     [B, w]          their true positions (long); causal: query p sees keys <= p
    attention:           [B, H, G, N]    attention each entry has received so far, summed over all
                                         past queries, per query head of the group
    future_importance:   [B, H, N]       true future attention (only where the future is known)

    Every consumer hands a scorer only the optional inputs it declares (``declared_view``): an
    undeclared input is None even where the consumer computed it for another scorer.

    Model geometry (not an input; every consumer that knows the model fills it):
    rope_theta:          float | None   the RoPE base of the model (plain RoPE, no scaling), so a
                                        scorer can undo the rotation of post-RoPE queries/keys

    Padded entries (mask False) hold arbitrary keys, values and positions; scorers must not trust them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    layer: torch.Tensor
    kv_heads: torch.Tensor
    num_layers: int
    num_kv_heads: int
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    future_importance: torch.Tensor | None = None
    rope_theta: float | None = None

    def __post_init__(self) -> None:
        if self.keys.dim() != 4:
            raise ValueError(f"ScoringView.keys must be [B, H, N, d], got shape {tuple(self.keys.shape)}")
        if self.values.shape[:3] != self.keys.shape[:3]:
            raise ValueError(
                f"ScoringView.values {tuple(self.values.shape)} does not match keys {tuple(self.keys.shape)}"
            )
        b, h, n, _ = self.keys.shape
        if tuple(self.positions.shape) != (b, n):
            raise ValueError(f"ScoringView.positions must be [B, N] = {(b, n)}, got {tuple(self.positions.shape)}")
        if tuple(self.mask.shape) != (b, n):
            raise ValueError(f"ScoringView.mask must be [B, N] = {(b, n)}, got {tuple(self.mask.shape)}")
        if tuple(self.kv_heads.shape) != (b, h):
            raise ValueError(f"ScoringView.kv_heads must be [B, H] = {(b, h)}, got {tuple(self.kv_heads.shape)}")
        if tuple(self.layer.shape) != (b,):
            raise ValueError(f"ScoringView.layer must be [B] = {(b,)}, got {tuple(self.layer.shape)}")
        d = self.keys.shape[3]
        if self.queries is not None:
            if self.queries.dim() != 5 or self.queries.shape[:2] != (b, h) or self.queries.shape[4] != d:
                raise ValueError(f"ScoringView.queries must be [B, H, G, w, d] = [{b}, {h}, G, w, {d}], got {tuple(self.queries.shape)}")
            w = self.queries.shape[3]
            if self.query_positions is not None and tuple(self.query_positions.shape) != (b, w):
                raise ValueError(f"ScoringView.query_positions must be [B, w] = {(b, w)}, got {tuple(self.query_positions.shape)}")
        if self.attention is not None and (self.attention.dim() != 4 or self.attention.shape[:2] != (b, h) or self.attention.shape[3] != n):
            raise ValueError(f"ScoringView.attention must be [B, H, G, N] = [{b}, {h}, G, {n}], got {tuple(self.attention.shape)}")
        if self.future_importance is not None and tuple(self.future_importance.shape) != (b, h, n):
            raise ValueError(f"ScoringView.future_importance must be [B, H, N] = {(b, h, n)}, got {tuple(self.future_importance.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, H, N)."""
        b, h, n, _ = self.keys.shape
        return b, h, n

    def require(self, scorer_name: str, *inputs: str) -> None:
        """Raise a clear error if any of the named optional inputs is missing."""
        missing = [name for name in inputs if getattr(self, name) is None]
        if "queries" in inputs and self.queries is not None and self.query_positions is None:
            missing.append("query_positions")
        if missing:
            raise MissingInputError(
                f"scorer {scorer_name!r} needs the input(s) {missing}, which the caller did not provide "
                f"(env: pass obs_queries=w / obs_attention=True; cache: the input must be computable live)"
            )


class MissingInputError(ValueError):
    """A scorer was called without an optional input it declared it needs."""


@runtime_checkable
class Scorer(Protocol):
    """Scores cached entries; higher = keep. ``needs`` lists the optional ScoringView inputs it reads.

    Traits the consumers read (never the scorer's name):
    - future-only: ``"future_importance" in needs`` (an upper bound that needs the true future; it
      plays the env and the ranking leaderboard, never a real cache);
    - trainable: a class attribute ``trainable: ClassVar[bool] = True`` marks an architecture that
      is not a policy until trained (the leaderboard takes it only as a checkpoint). Absent = False.
    """

    needs: ClassVar[frozenset[str]]

    def score(self, view: ScoringView) -> torch.Tensor:
        """Return scores [B, H, N] (float). Scores of padded entries are ignored by every consumer."""
        ...


def is_future_only(scorer: Scorer) -> bool:
    """Whether the scorer needs the true future (see ``Scorer``)."""
    return "future_importance" in scorer.needs


def declared_view(scorer: Scorer, view: ScoringView) -> ScoringView:
    """The view with every optional input the scorer does not declare in ``needs`` set to None.

    The one gate every consumer (env adapters and their training loops, the leaderboard's ranking,
    the inference cache) passes a view through: a scorer sees exactly the optional inputs
    (``OPTIONAL_INPUTS``) it declares, never more, so only a scorer that declares
    ``"future_importance"`` (a future-only upper bound) can read the future.
    ``query_positions`` travels with ``queries``. The view itself is not changed.
    """
    needs = scorer.needs
    hidden = {name: None for name in OPTIONAL_INPUTS if name not in needs and getattr(view, name) is not None}
    if "queries" not in needs and view.query_positions is not None:
        hidden["query_positions"] = None
    return dataclasses.replace(view, **hidden) if hidden else view


def score_view(scorer: Scorer, view: ScoringView) -> torch.Tensor:
    """``scorer.score`` of the declared part of ``view`` (``declared_view``): scores [B, H, N]."""
    return scorer.score(declared_view(scorer, view))


def score_one_head(scorer: Scorer, view: ScoringView) -> torch.Tensor:
    """Scores [B, N] of a view with one KV head (H = 1), as the envs take them (through ``declared_view``)."""
    return score_view(scorer, view)[:, 0]


class LayerMix:
    """``other``'s scores in ``layers``, ``base``'s in every other layer. Rankings are per row and head, so the
    two scales never meet: a policy with a heuristic's ranking in the layers where validation texts prefer it,
    or the oracle in every layer but one, to see what that layer's mistakes cost. Each part is handed only
    the inputs it declares; the mix declares both parts' and reads the wider query window."""

    def __init__(self, base: Scorer, other: Scorer, layers: Iterable[int]) -> None:
        self.base, self.other = base, other
        self.layers = torch.tensor(sorted(set(layers)), dtype=torch.long)
        self.needs = frozenset(base.needs | other.needs)
        windows = [part.window_size for part in (base, other) if hasattr(part, "window_size")]
        if windows:
            self.window_size = max(windows)

    def score(self, view: ScoringView) -> torch.Tensor:
        """Scores [B, H, N]: ``other``'s on the rows whose ``view.layer`` is in ``layers``, ``base``'s elsewhere."""
        theirs = torch.isin(view.layer, self.layers.to(view.layer.device))
        if not bool(theirs.any()):  # a part that has no row here is not called
            return score_view(self.base, view).float()
        if bool(theirs.all()):
            return score_view(self.other, view).float()
        return torch.where(theirs[:, None, None], score_view(self.other, view).float(), score_view(self.base, view).float())


_registry: dict[str, Callable[..., Scorer]] = {}
_entry_points_loaded = False
HEAD_SHARES_SUFFIX = "+shares"
TUNED_SHARES_SUFFIX = "+tuned"


def register(name: str, factory: Callable[..., Scorer], *, overwrite: bool = False) -> None:
    """Register a scorer factory (a class or a function returning a Scorer) under ``name``."""
    _load_entry_points()
    key = name.lower()
    if key in _registry and not overwrite and _registry[key] is not factory:
        raise ValueError(f"a scorer named {name!r} is already registered ({_registry[key]!r})")
    _registry[key] = factory


def available() -> list[str]:
    """Names of all registered scorers, sorted."""
    _load_entry_points()
    return sorted(_registry)


def split_base(name: str) -> str | None:
    """The scorer whose ranking ``name`` splits across heads by shares (``kvp`` for ``kvp+shares`` or ``kvp+tuned``),
    or None when ``name`` is no such split (a scorer registered under a name with that suffix included)."""
    _load_entry_points()
    key = name.lower()
    if key in _registry:
        return None
    return next((key[: -len(suffix)] for suffix in (HEAD_SHARES_SUFFIX, TUNED_SHARES_SUFFIX) if key.endswith(suffix)), None)


def factory(name: str) -> Callable[..., Scorer]:
    """The factory registered as ``name`` (an entry point's target is imported)."""
    _load_entry_points()
    key = name.lower()
    base = split_base(key)
    if base is not None:
        return _WithHeadShares(factory(base), None if key.endswith(HEAD_SHARES_SUFFIX) else base)
    if key not in _registry:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(available())}")
    found = _registry[key]
    return found.entry.load() if isinstance(found, _LazyFactory) else found


def get(name: str, **config: Any) -> Scorer:
    """Build the scorer registered as ``name`` with ``config`` (its dataclass fields)."""
    return factory(name)(**config)


def is_trainable(name: str) -> bool:
    """Whether the scorer registered as ``name`` is a trainable architecture, not a ready policy (see ``Scorer``)."""
    return bool(getattr(factory(name), "trainable", False))


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group="kvp_gym.scorers"):
        _registry.setdefault(entry.name.lower(), _LazyFactory(entry))


class _WithHeadShares:
    """Builds a scorer and gives it the default model's head shares (its ``head_shares`` attribute): the fitted ones,
    or those tuned for the policy ``tuned_for``."""

    def __init__(self, base: Callable[..., Scorer], tuned_for: str | None) -> None:
        from kvp_gym.cache.head_shares import tuned_policies

        if tuned_for is not None and tuned_for not in tuned_policies():
            raise KeyError(f"no head shares are tuned for {tuned_for!r}; {TUNED_SHARES_SUFFIX} exists for: "
                           f"{', '.join(name + TUNED_SHARES_SUFFIX for name in tuned_policies())}")
        self.base, self.tuned_for = base, tuned_for
        self.trainable = getattr(base, "trainable", False)

    def __call__(self, **config: Any) -> Scorer:
        from kvp_gym.cache.head_shares import default_head_shares, tuned_head_shares

        scorer = self.base(**config)
        scorer.head_shares = default_head_shares() if self.tuned_for is None else tuned_head_shares(self.tuned_for)
        return scorer


class _LazyFactory:
    """Imports an entry point's target only when the scorer is first built."""

    def __init__(self, entry: Any) -> None:
        self.entry = entry

    def __call__(self, **config: Any) -> Scorer:
        return self.entry.load()(**config)

    def __repr__(self) -> str:
        return f"<entry point {self.entry.value}>"
