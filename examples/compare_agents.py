"""Train every algorithm on the same heads with the same number of steps, and print one table
against the heuristics: mean cost ratio on held-out traces (lower is better, 1 = the oracle).

    python examples/compare_agents.py --traces TRAIN... --eval-traces TEST... --heads 5:0 14:1 25:2
    python examples/compare_agents.py --traces ... --eval-traces ... --agents kvp pairwise --steps 300
    python examples/compare_agents.py --eval-traces TEST... --agents --checkpoint kvp=runs/kvp-smollm2 --all-heads

Each agent is trained per head (KVP's protocol: one agent per KV head) with ``--steps`` updates.
Evaluation: the same KVEvict-v0 episodes for every method (prefixes of 64 to 512 tokens), with the
last 64 queries given to the attention-based heuristics (SnapKV, TOVA). ``--checkpoint NAME=PATH``
adds trained scorers (e.g. a full-model KVP policy from examples/train_kvp.py) to the table.
"""

import argparse
import time
from pathlib import Path

import torch

from agents.train import AGENTS, TrainConfig, evaluator, train
from kvp_gym.checkpoint import load_scorer
from kvp_gym.scorers import get

ATTENTION_FREE = ("random", "streamingllm", "knorm", "keydiff", "lagkv")
ATTENTION_BASED = ("snapkv", "tova")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--traces", nargs="+", help="training trace sets (needed when --agents is not empty)")
parser.add_argument("--eval-traces", nargs="+", required=True, help="held-out trace sets")
parser.add_argument("--heads", nargs="+", default=["5:0", "14:1", "25:2"], help="LAYER:KV_HEAD pairs")
parser.add_argument("--all-heads", action="store_true", help="evaluate on every head (training stays per --heads)")
parser.add_argument("--agents", nargs="*", default=list(AGENTS), help=f"among {', '.join(AGENTS)}")
parser.add_argument("--checkpoint", nargs="*", default=[], help="NAME=PATH of trained scorers to add")
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--episodes", type=int, default=128, help="evaluation episodes per head")
parser.add_argument("--out", default="runs/compare")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy 2-core CPU)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

if args.all_heads and args.agents:
    parser.error("--all-heads evaluates heuristics and --checkpoint scorers on every head; give --agents with no name")
if args.agents and not args.traces:
    parser.error("training agents needs --traces")
train_heads = [tuple(int(part) for part in pair.split(":")) for pair in args.heads]
held_out = evaluator(args.eval_traces, {"min_prefix": 64, "obs_queries": 64, "cache_gb": 4.0}, episodes=args.episodes)
spec = held_out.spec
eval_heads = [(l, h) for l in range(spec.num_layers) for h in range(spec.num_kv_heads)] if args.all_heads else train_heads

results: dict[str, dict[tuple[int, int], float]] = {}
notes: dict[str, str] = {}
for name in ATTENTION_FREE + ATTENTION_BASED:
    scorer = get(name)
    results[name] = {head: metrics["cost_ratio"] for head, metrics in held_out.per_head(scorer, eval_heads).items()}
for item in args.checkpoint:
    name, _, path = item.partition("=")
    scorer = load_scorer(path, expect_spec=spec)
    results[name] = {head: metrics["cost_ratio"] for head, metrics in held_out.per_head(scorer, eval_heads).items()}
for agent in args.agents:
    results[agent], seconds, episodes = {}, 0.0, 0
    for layer, head in train_heads:
        started = time.perf_counter()
        run = train(TrainConfig(agent=agent, traces=args.traces, out=str(Path(args.out) / agent / f"L{layer}H{head}"),
                                steps=args.steps, layer=layer, kv_head=head, seed=args.seed, progress=False))
        seconds += time.perf_counter() - started
        episodes += run.env_steps
        metrics = held_out.per_head(load_scorer(run.scorer_path), [(layer, head)])
        results[agent][(layer, head)] = metrics[(layer, head)]["cost_ratio"]
    notes[agent] = f"{seconds / len(train_heads):6.0f} s/head, {episodes // len(train_heads)} env steps/head"

columns = eval_heads if len(eval_heads) <= 6 else []
print(f"\nmean cost ratio on held-out traces ({args.episodes} episodes per head; lower is better, 1 = oracle)")
print("beats attn-free: heads where it beats every (other) attention-free heuristic; "
      "beats snapkv+tova: heads where it beats both")
print(f"{'method':>16} " + " ".join(f"{f'L{l}H{h}':>8}" for l, h in columns)
      + f" {'mean':>8} {'beats attn-free':>16} {'beats snapkv+tova':>18}  training")
for name, per_head in results.items():
    heads = list(per_head)
    mean = sum(per_head.values()) / len(heads)
    free = sum(all(per_head[h] < results[b][h] for b in ATTENTION_FREE if b != name) for h in heads)
    based = sum(all(per_head[h] < results[b][h] for b in ATTENTION_BASED if b != name) for h in heads)
    cells = " ".join(f"{per_head[h]:8.3f}" if h in per_head else f"{'-':>8}" for h in columns)
    print(f"{name:>16} {cells} {mean:8.3f} {f'{free}/{len(heads)}':>16} {f'{based}/{len(heads)}':>18}  {notes.get(name, '')}")
