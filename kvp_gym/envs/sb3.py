"""Stable-Baselines3 adapter: a native kvp-gym vector env as an SB3 ``VecEnv``.

    venv = SB3VecEnv(gym.make_vec("KVEvict-v0", num_envs=64, traces=...))
    PPO("MultiInputPolicy", venv).learn(10_000)

SB3 wants numpy observations (a dict of [B, ...] arrays), float32 rewards, one ``done`` flag and one
info dict per env, the finished episode's last observation as ``info["terminal_observation"]`` and
the new episode's observation in place. The native env's SAME_STEP autoreset gives exactly that.

SB3's MultiInputPolicy keeps one module per observation key in an ``nn.ModuleDict``, which cannot
hold the names "keys" and "values" (they are its methods), so the adapter renames those two
observations (``SB3_NAMES``); ``env_names`` undoes it for a policy that reads them back.
``SB3ObservationNames`` does the same for a single env. The action space is the env's own: every
finite float32 score, within finite bounds as SB3 requires.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import VectorEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn


SB3_NAMES = {"keys": "key_vectors", "values": "value_vectors"}


ENV_NAMES = {sb3: env for env, sb3 in SB3_NAMES.items()}


def sb3_names(tree: dict[str, Any]) -> dict[str, Any]:
    """Rename the observations (or their spaces) SB3's policies cannot hold."""
    return {SB3_NAMES.get(key, key): value for key, value in tree.items()}


def env_names(tree: dict[str, Any]) -> dict[str, Any]:
    """Undo ``sb3_names``: SB3 observations (e.g. a policy's input batch) -> the env's observation names."""
    return {ENV_NAMES.get(key, key): value for key, value in tree.items()}


class SB3ObservationNames(gym.ObservationWrapper):
    """A single kvp-gym env with the observation names SB3's MultiInputPolicy accepts."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = spaces.Dict(sb3_names(env.observation_space.spaces))

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return sb3_names(observation)


def info_rows(info: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's vector info (key -> [B] array, ``_key`` -> [B] mask) -> one dict per env."""
    rows: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in info.items():
        if key.startswith("_") or key in ("final_obs", "final_info"):
            continue
        mask = info.get(f"_{key}", np.ones(num_envs, dtype=bool))
        for env in np.flatnonzero(mask):
            rows[env][key] = value[env]
    return rows


class SB3VecEnv(VecEnv):
    """Expose a native kvp-gym VectorEnv (numpy mode) through SB3's VecEnv API."""

    def __init__(self, env: VectorEnv) -> None:
        if getattr(env.unwrapped, "as_torch", False):
            raise ValueError("env: SB3VecEnv needs numpy observations; make the vector env with as_torch=False")
        self.env = env
        self._actions: np.ndarray | None = None
        observation_space = spaces.Dict(sb3_names(env.single_observation_space.spaces))
        super().__init__(env.num_envs, observation_space, env.single_action_space)

    def reset(self) -> VecEnvObs:
        options = self._options[0] or None
        obs, info = self.env.reset(seed=self._seeds[0], options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = info_rows(info, self.num_envs)
        return sb3_names(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        dones = terminated | truncated
        infos = info_rows(info, self.num_envs)
        finished = info_rows(info.get("final_info", {}), self.num_envs)
        for env in np.flatnonzero(dones):
            self.reset_infos[env] = infos[env]
            infos[env] = finished[env]
            final_obs = sb3_names(info["final_obs"])
            infos[env]["terminal_observation"] = {key: value[env] for key, value in final_obs.items()}
            infos[env]["TimeLimit.truncated"] = bool(truncated[env] and not terminated[env])
        return sb3_names(obs), reward.astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    def _count(self, indices: VecEnvIndices) -> int:
        return len(list(self._get_indices(indices)))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """One shared env behind all indices: the same attribute for each."""
        return [getattr(self.env, attr_name)] * self._count(indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result] * self._count(indices)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * self._count(indices)
