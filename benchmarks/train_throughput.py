"""Training throughput of every algorithm: env steps/s and gradient (optimizer) steps/s.

    python benchmarks/train_throughput.py --traces DIR [DIR...] [--layer 14 --kv-head 1] [--updates 10]

One head, default hyperparameters; two warm-up updates first (they build the env's per-layer tables).
Gradient steps per update: kvp and pairwise 1, grpo ``epochs``, PPO / RecurrentPPO n_epochs x
minibatches, A2C 1, TRPO 1 policy step (a conjugate-gradient solve and a line search) + 10 critic
steps, ARS 0 (gradient-free: 2 n_delta candidate evaluations).
"""

import argparse
import math
import tempfile
import time

import torch

from agents.sb3_agents import SB3Agent
from agents.train import AGENTS, TrainConfig, _make_scorer, agent_config, select_heads
from kvp_gym.envs.episodes import TraceSource

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--traces", nargs="+", required=True)
parser.add_argument("--layer", type=int, default=14)
parser.add_argument("--kv-head", type=int, default=1)
parser.add_argument("--agents", nargs="+", default=list(AGENTS))
parser.add_argument("--updates", type=int, default=10)
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def gradient_steps(agent_name: str, agent: object) -> float:
    config = agent.config
    if agent_name.startswith("grpo"):
        return config.epochs
    if isinstance(agent, SB3Agent):
        if config.algo in ("ppo", "recurrent-ppo"):
            return config.n_epochs * math.ceil(agent.episodes_per_update / config.batch_size)
        return {"a2c": 1, "trpo": 11, "ars": 0}[config.algo]
    return 1


source = TraceSource(args.traces)
heads, head_kwargs = select_heads(source.spec, args.layer, args.kv_head, False)
print(f"torch threads: {torch.get_num_threads()}; head L{args.layer}H{args.kv_head}; {args.updates} timed updates")
print(f"{'agent':>16} {'env steps/s':>12} {'updates/s':>10} {'grad steps/s':>13}")
for name in args.agents:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(agent=name, traces=args.traces, out=out, steps=args.updates, layer=args.layer, kv_head=args.kv_head)
        agent = AGENTS[name][0](_make_scorer(config, source, heads), source.sets, {"cache_gb": 4.0, **head_kwargs},
                                agent_config(name, {}), args.updates)
        agent.reseed(0)
        for _ in range(2):
            agent.update()
        env_steps, started = 0.0, time.perf_counter()
        for _ in range(args.updates):
            env_steps += agent.update()["env_steps"]
        seconds = time.perf_counter() - started
        rate = args.updates / seconds
        print(f"{name:>16} {env_steps / seconds:12.1f} {rate:10.2f} {rate * gradient_steps(name, agent):13.2f}", flush=True)
