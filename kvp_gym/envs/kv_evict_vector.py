"""The native vector env of KVEvict-v0: a whole batch of episodes as tensors.

``gym.make_vec("KVEvict-v0", num_envs=B, vectorization_mode="vector_entry_point", **kwargs)`` builds
it. Observations, rewards and infos of all B envs come from one ``KVEvictCore`` with B rows (one
gather per observation key, one sort per step), with no Python loop over envs.

Autoreset: Gymnasium's SAME_STEP mode (``metadata["autoreset_mode"]``). Every KVEvict episode is
one step, so every step returns terminated = True for all envs together with the observations of
the next episodes; ``info["final_info"]`` holds the finished episodes' results (cost_ratio, ...)
and ``info["final_obs"]`` their observations (a batched dict, not an object array).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from kvp_gym.envs.episodes import BatchedCore, CoreAccess, check_scores, check_vector, to_numpy, with_masks
from kvp_gym.envs.kv_evict import KVEvictCore


class CoreVectorEnv(CoreAccess, VectorEnv):
    """A Gymnasium VectorEnv driven by a batched core with one row per env (no logic of its own).

    ``as_torch=True``: observations, rewards, flags and infos are torch tensors, and actions may be
    tensors; otherwise numpy arrays (zero-copy views of fresh tensors).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, core: BatchedCore, num_envs: int, as_torch: bool) -> None:
        self.core = core
        self.num_envs = num_envs
        self.as_torch = as_torch
        self.single_observation_space = core.observation_space
        self.single_action_space = spaces.Box(-1.0, 1.0, (core.size,), np.float32)
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


class KVEvictVectorEnv(CoreVectorEnv):
    """KVEvict-v0 as a native vector env of ``num_envs`` envs.

    ``group_size=G``: each run of G consecutive envs shares one episode (same observation; G
    actions scored on it: GRPO groups, leave-one-out baselines). ``as_torch``: torch in and out.
    Every other argument is KVEvictEnv's.
    """

    def __init__(self, num_envs: int = 1, traces: Any = None, *, group_size: int = 1, as_torch: bool = False,
                 **kwargs: Any) -> None:
        check_vector(num_envs, group_size)
        super().__init__(KVEvictCore(traces, num_rows=num_envs, group_size=group_size, **kwargs), num_envs, as_torch)
