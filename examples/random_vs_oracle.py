"""Random vs oracle on KVEvict-v0 (the floor and the ceiling of the ranking reward), and one whole
trace of KVEvictStream-v0 with random evictions vs ForesightKV's golden schedule.

    python examples/random_vs_oracle.py                  # the default traces (generated once)
    python examples/random_vs_oracle.py --traces DIR     # your own trace set

The oracle ranks by the true future attention, which ``obs_future=True`` exposes (cheating: an
upper bound), so its reward is exactly -1.
"""

import argparse

import gymnasium as gym
import numpy as np

import kvp_gym  # noqa: F401  (registers KVEvict-v0 and KVEvictStream-v0)
from kvp_gym.envs.adapters import GoldenPolicy, ScorerPolicy

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--traces", default=None, help="trace directory (default: the default trace set)")
parser.add_argument("--num-envs", type=int, default=64)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# KVP: one step per episode, 64 episodes per step in the native vector env
envs = gym.make_vec("KVEvict-v0", num_envs=args.num_envs, traces=args.traces, obs_future=True)
oracle = ScorerPolicy("oracle", envs.unwrapped.model_spec)
policies = {"random": lambda obs: envs.action_space.sample(), "oracle": oracle.act}
envs.action_space.seed(args.seed)
for name, act in policies.items():
    obs, _ = envs.reset(seed=args.seed)
    rewards, kept = [], []
    for _ in range(args.steps):
        obs, reward, terminated, truncated, info = envs.step(act(obs))
        rewards.append(reward)
        kept.append(info["final_info"]["kept_fraction_25"])
    print(f"KVEvict-v0  {name:>6}: reward {np.mean(rewards):8.3f}   "
          f"future attention kept by the top 25%: {np.mean(kept):.3f}")

# ForesightKV: one episode is a whole trace; each step evicts 64 of the 256 older entries.
# sink=0: the golden schedule may evict the first tokens, which the env protects by default.
env = gym.make("KVEvictStream-v0", traces=args.traces, sink=0)
golden = GoldenPolicy.from_env(env)
env.action_space.seed(args.seed)
for name in ("random", "golden"):
    obs, info = env.reset(seed=args.seed)
    terminated = False
    while not terminated:
        action = env.action_space.sample() if name == "random" else golden.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
    print(f"KVEvictStream-v0 {name:>6}: return {info['episode_return']:8.3f} over {info['step'] + 1} steps "
          f"(golden schedule: {info['golden_return']:.3f})")
