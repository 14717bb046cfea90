"""The whole kvp-gym story on the embedded SmolLM2-135M, end to end (about 15 minutes on 2 CPU cores).

    python examples/demo.py [--out demo] [--steps 300]

1. traces:      run SmolLM2 over RULER-style tasks, dialogues and Python's documentation prose and
                record post-RoPE Q/K/V of every layer (train split);
2. train:       one KVP policy for all 90 (layer, KV head) pairs, REINFORCE over Plackett-Luce rankings
                in the KVEvict-v0 vector env;
3. leaderboard: the trained policy against every heuristic on the held-out quick suite: ranking cost on
                the env and the real model's perplexity / RULER accuracy with the compressed cache;
4. generate:    SmolLM2 answering a prompt with the trained policy evicting its KV cache.

Every step shows progress and reuses what an earlier run already made: rerunning is cheap.
"""

import argparse
from pathlib import Path

import torch
from transformers import TextStreamer

from agents.train import TrainConfig, train
from kvp_gym.cache import EvictingCache
from kvp_gym.eval.leaderboard import run_leaderboard
from kvp_gym.eval.report import ranking_table, write_report
from kvp_gym.eval.suite import get_suite
from kvp_gym.models import load_model
from kvp_gym.checkpoint import load_scorer
from kvp_gym.traces import generate_traces

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="demo", help="where the traces, the policy and the leaderboard go")
parser.add_argument("--steps", type=int, default=600, help="KVP training steps (64 cache states x 4 rankings each)")
parser.add_argument("--budget", type=int, default=64, help="KV entries kept per head when generating")
args = parser.parse_args()
out = Path(args.out)

print("== 1/4 traces: SmolLM2 over real text, Q/K/V of every layer ==")
TRAIN_SETS = {"ruler": 6, "prose": 6, "dialogue": 2}
train_dirs = [
    str(generate_traces(out / "traces" / f"{source}-train", source, n=n, length=1024, split="train").directory)
    for source, n in TRAIN_SETS.items()
]

print("== 2/4 train: one KVP policy for every (layer, KV head) ==")
suite = get_suite("quick")
test_sets = suite.traces()
result = train(TrainConfig(
    agent="kvp", traces=train_dirs, out=str(out / "kvp-policy"), steps=args.steps, all_heads=True,
    agent_options={"states": "64"},
    eval_traces=[str(dataset.directory) for dataset in test_sets.values()],
    eval_every=max(1, args.steps // 3), save_every=max(1, args.steps // 6),
))
print(f"trained in {result.seconds:.0f} s; held-out evaluation: {result.evaluation}")

print("== 3/4 leaderboard: the trained policy against every heuristic on held-out traces ==")
# the floors of the normalised score (random, streamingllm), one strong heuristic and the ranking oracle:
# the quick suite's downstream units take ~3-6 s each on 2 cores, so every heuristic would not fit the demo
results = run_leaderboard(suite, out / "leaderboard", policy_names=["streamingllm", "random", "snapkv", "oracle"],
                          checkpoints=[result.scorer_path])
report = write_report(results, out / "leaderboard", title="kvp-gym demo leaderboard")
print(f"{'policy':<24}{'mean cost ratio':>16}")
for row in ranking_table(results):
    print(f"{row['policy']:<24}{row['cost_ratio']:>16.3f}")
text = report.read_text()
print("## Perplexity" + text.split("## Perplexity")[1].split("## Plots")[0] if "## Perplexity" in text else "")
print(f"full report: {report}")

print(f"== 4/4 generate: SmolLM2 with the trained policy keeping {args.budget} entries per KV head ==")
model, tokenizer = load_model()
scorer = load_scorer(result.scorer_path)
prompt = ("Here is a note: the locker code is 4821 and the meeting moved to Thursday at 3 pm in room 12B. "
          "Python's list.sort() is stable; sorted() returns a new list. " * 4
          + "What is the locker code, and when is the meeting?")
ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
ids = ids if torch.is_tensor(ids) else ids["input_ids"]
streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
print("full cache:")
with torch.inference_mode():
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id, streamer=streamer)
print(f"trained KVP policy, {args.budget} entries per KV head:")
cache = EvictingCache(scorer, args.budget, config=model.config)
with torch.inference_mode():
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=48, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id, streamer=streamer)
print(cache.report())
