"""Train a full-model KVP policy (every layer and KV head of SmolLM2) on real traces and save it.

    python examples/train_kvp.py                                    # makes prose + RULER traces first
    python examples/train_kvp.py --traces A B --eval-traces C D     # your own trace sets
    python examples/train_kvp.py --out runs/kvp-smollm2 --steps 1500 --threads 1

All (layer, KV head) agents train at once: episodes of every head share one vector env and one
backward pass updates every head's MLP. Rerunning the same command after a kill resumes. The result
is a scorer checkpoint that the envs, the leaderboard and the inference cache load with
``kvp_gym.checkpoint.load_scorer(out)``.
"""

import argparse

import torch

from agents.train import TrainConfig, train
from kvp_gym.paths import home_dir
from kvp_gym.traces import generate_traces

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--traces", nargs="+", help="training trace sets (default: prose + RULER, made once)")
parser.add_argument("--eval-traces", nargs="+", help="test trace sets (default: prose + RULER test splits)")
parser.add_argument("--n", type=int, default=12, help="traces per source and split when making them")
parser.add_argument("--length", type=int, default=1024, help="tokens per trace when making them")
parser.add_argument("--out", default="runs/kvp-smollm2")
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--states", type=int, default=64, help="cache states per update (x 4 sampled rankings each)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy 2-core CPU)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def made(split: str) -> list[str]:
    """The example's prose and RULER trace sets of ``split`` (generated once, resumable)."""
    directories = []
    for source in ("prose", "ruler"):
        directory = home_dir() / "traces" / f"example-{source}-{split}-{args.n}x{args.length}"
        generate_traces(directory, source, n=args.n if split == "train" else max(2, args.n // 2),
                        length=args.length, split=split)
        directories.append(str(directory))
    return directories


config = TrainConfig(
    agent="kvp",
    traces=args.traces or made("train"),
    eval_traces=args.eval_traces or made("test"),
    out=args.out,
    steps=args.steps,
    all_heads=True,
    seed=args.seed,
    agent_options={"states": str(args.states)},
    env_options={"cache_gb": 6.0},
    eval_every=max(1, args.steps // 6),
    save_every=max(1, args.steps // 12),
)
result = train(config)
print(f"saved {result.scorer_path}")
for step, evaluation in sorted(result.evaluations.items()):
    print(f"step {step:5d}: mean cost ratio on the test traces {evaluation['cost_ratio']:.4f}, "
          f"future attention kept by the top 25 %: {evaluation['kept_fraction_25']:.3f}")
print(f"{result.env_steps} episodes in {result.seconds / 60:.1f} min")
