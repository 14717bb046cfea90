"""Gymnasium envs: KVEvict-v0 (KVP's one-step ranking bandit) and KVEvictStream-v0 (ForesightKV's
multi-step streaming eviction), each with a native vector env and a Stable-Baselines3 adapter.

``import kvp_gym`` registers both ids; the env modules load only when an env is made.
"""

from __future__ import annotations

ENVS = {
    "KVEvict-v0": ("kvp_gym.envs.kv_evict:KVEvictEnv", "kvp_gym.envs.kv_evict_vector:KVEvictVectorEnv"),
    "KVEvictStream-v0": ("kvp_gym.envs.stream:KVEvictStreamEnv", "kvp_gym.envs.stream:KVEvictStreamVectorEnv"),
}


def register_envs() -> None:
    """Register every kvp-gym env id with Gymnasium (idempotent)."""
    import gymnasium

    for env_id, (entry_point, vector_entry_point) in ENVS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=entry_point, vector_entry_point=vector_entry_point)
