"""The generic env machinery: a batched core of E episode rows, and the Gymnasium single and
vector envs that drive one (``CoreEnv``, ``CoreVectorEnv``), with no env-specific logic.

A core (``BatchedCore``) does all the work for E rows at once; ``CoreEnv`` is it with E = 1 and
``CoreVectorEnv`` with E = num_envs. Actions are scores, higher = keep: any finite float32 value.

Shapes: E = rows (envs), N = entries shown.
"""

from __future__ import annotations

from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from kvp_gym.models.spec import ModelSpec
from kvp_gym.ranking import Protected
from kvp_gym.traces.dataset import Trace

# Every finite float32 is a valid score. The bounds must be finite: Stable-Baselines3 requires it
# (check_env) and clips sampled actions to them, which with these bounds changes no finite score.
SCORE_BOUND = float(np.finfo(np.float32).max)


def score_space(size: int) -> spaces.Box:
    """The action space of one env: [N] float32 scores, any finite value."""
    return spaces.Box(-SCORE_BOUND, SCORE_BOUND, (size,), np.float32)


class BatchedCore(Protocol):
    """What the generic single and vector envs drive: E rows of episodes (G consecutive rows share one).

    observation_space / size: the single-env layout; ranked [E, N]: entries the action ranks now.
    source: the TraceSource episodes come from; protected: the always-kept tokens;
    budget / step_size: B and L of a streaming env (None for the one-step env).
    reset(rng, rows, options): start new episodes on ``rows`` ([E] bool; None = all).
    observation() -> obs [E, ...]; identity() -> info [E] of the current episodes.
    step(scores [E, N]) -> (reward [E] float64, terminated [E] bool, info [E, ...]).
    """

    observation_space: spaces.Dict
    size: int
    source: Any
    protected: Protected
    budget: int | None
    step_size: int | None

    @property
    def ranked(self) -> torch.Tensor: ...

    def reset(self, rng: np.random.Generator, rows: torch.Tensor | None = None,
              options: dict[str, Any] | None = None) -> None: ...

    def observation(self) -> dict[str, torch.Tensor]: ...

    def identity(self) -> dict[str, torch.Tensor]: ...

    def step(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...


# ----------------------------------------------------------------------------- actions and outputs


def check_scores(action: Any, rows: int | None, size: int, ranked: torch.Tensor) -> torch.Tensor:
    """Validate an action (scores [N], or [E, N] for a vector env: ``rows`` = E) -> float tensor [E, N].

    Raises ValueError for a wrong shape, a non-float dtype, or NaN/inf on an entry that is ranked
    (``ranked [E, N]``; scores of padded and protected entries are ignored, whatever they hold).
    """
    name = "action" if rows is None else "actions"
    expected = (size,) if rows is None else (rows, size)
    if isinstance(action, (list, tuple)):
        action = np.asarray(action)
    if isinstance(action, np.ndarray):
        if not np.issubdtype(action.dtype, np.floating):
            raise ValueError(f"{name} must hold float scores, got dtype {action.dtype}")
        action = torch.from_numpy(np.ascontiguousarray(action))
    elif not isinstance(action, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor of float scores, got {type(action).__name__}")
    elif not action.is_floating_point():
        raise ValueError(f"{name} must hold float scores, got dtype {action.dtype}")
    else:
        action = action.detach().cpu()
    if tuple(action.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (one score per entry), got {tuple(action.shape)}")
    scores = action.reshape(ranked.shape)
    bad = ~torch.isfinite(scores) & ranked
    if bad.any():
        row, entry = bad.nonzero()[0].tolist()
        where = f"entry {entry}" if rows is None else f"env {row}, entry {entry}"
        raise ValueError(f"{name} holds NaN or inf at {where} (a ranked entry); scores must be finite")
    return scores


def to_numpy(tree: Any) -> Any:
    """Tensors -> numpy arrays (zero-copy), through dicts and tuples."""
    if isinstance(tree, dict):
        return {key: to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_numpy(value) for value in tree)
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


def unbatch(tree: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Row 0 of a batch of tensors: Python scalars for [E] tensors, fresh numpy arrays otherwise."""
    return {key: value[0].item() if value.dim() == 1 else value[0].numpy().copy() for key, value in tree.items()}


def with_masks(info: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """Gymnasium's vector info layout: every key ``k`` gets a boolean ``_k`` [E] saying which envs hold it."""
    out = {}
    for key, value in info.items():
        out[key], out[f"_{key}"] = value, mask.clone()
    return out


class CoreAccess:
    """What the single and vector env wrappers expose of their batched core (``self.core``)."""

    core: BatchedCore

    @property
    def model_spec(self) -> ModelSpec:
        """The ModelSpec of the traces (layers, heads, KV heads, head dim)."""
        return self.core.source.spec

    @property
    def traces(self) -> list[Trace]:
        """The Trace objects episodes are drawn from; info["trace"] indexes this list."""
        return self.core.source.traces

    @property
    def protected(self) -> Protected:
        """The always-kept tokens (a streaming env protects only sinks among the cached entries: recent = 0)."""
        return self.core.protected

    @property
    def sink(self) -> int:
        return self.core.protected.sink

    @property
    def recent(self) -> int:
        return self.core.protected.recent

    @property
    def budget(self) -> int | None:
        """B, the entries a streaming env keeps between steps (None for KVEvict-v0)."""
        return self.core.budget

    @property
    def step_size(self) -> int | None:
        """L, the tokens a streaming env appends and evicts per step (None for KVEvict-v0).

        Not called ``step``: that is the env's ``step()`` method.
        """
        return self.core.step_size


class CoreEnv(CoreAccess, gym.Env):
    """A single Gymnasium env driven by a batched core with one row (no logic of its own)."""

    metadata = {"render_modes": []}

    def __init__(self, core: BatchedCore) -> None:
        self.core = core
        self.observation_space = core.observation_space
        self.action_space = score_space(core.size)
        self._needs_reset = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.core.reset(self.np_random, options=options)
        self._needs_reset = False
        return unbatch(self.core.observation()), unbatch(self.core.identity())

    def step(self, action: Any):
        if self._needs_reset:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        scores = check_scores(action, None, self.core.size, self.core.ranked)
        reward, terminated, info = self.core.step(scores)
        self._needs_reset = bool(terminated[0])
        return unbatch(self.core.observation()), float(reward[0]), bool(terminated[0]), False, unbatch(info)


class CoreVectorEnv(CoreAccess, VectorEnv):
    """A Gymnasium VectorEnv driven by a batched core with one row per env (no logic of its own).

    Autoreset: Gymnasium's SAME_STEP mode; ``info["final_info"]`` holds the finished episodes'
    results and ``info["final_obs"]`` their observations (a batched dict, not an object array).
    ``as_torch=True``: observations, rewards, flags and infos are torch tensors, and actions may be
    tensors; otherwise numpy arrays (zero-copy views of fresh tensors).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, core: BatchedCore, num_envs: int, as_torch: bool) -> None:
        self.core = core
        self.num_envs = num_envs
        self.as_torch = as_torch
        self.single_observation_space = core.observation_space
        self.single_action_space = score_space(core.size)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._everyone = torch.ones(num_envs, dtype=torch.bool)

    def _out(self, tree: Any) -> Any:
        return tree if self.as_torch else to_numpy(tree)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.core.reset(self.np_random, options=options)
        return self._out(self.core.observation()), self._out(with_masks(self.core.identity(), self._everyone))

    def step(self, actions: Any):
        scores = check_scores(actions, self.num_envs, self.core.size, self.core.ranked)
        reward, terminated, info = self.core.step(scores)
        infos: dict[str, Any] = {}
        if not terminated.all():
            infos.update(with_masks(info, ~terminated))
        if terminated.any():
            infos.update(
                final_obs=self.core.observation(),
                _final_obs=terminated.clone(),
                final_info=with_masks(info, terminated),
                _final_info=terminated.clone(),
            )
            self.core.reset(self.np_random, rows=terminated)
        infos.update(with_masks(self.core.identity(), self._everyone))
        truncated = torch.zeros_like(terminated)
        return self._out((self.core.observation(), reward, terminated, truncated, infos))
