"""kvp-gym: learned KV-cache eviction as a reinforcement-learning benchmark and toolkit."""

from kvp_gym.envs import register_envs

__version__ = "0.1.0"

register_envs()
