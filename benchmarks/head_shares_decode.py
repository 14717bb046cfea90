"""What ragged heads cost at decoding: a cache with head shares against equal budgets per head.

    python benchmarks/head_shares_decode.py                    # SmolLM2-135M, 1024-token prompt, 25% kept, 64 tokens
    python benchmarks/head_shares_decode.py --prompt 2048 --budget 0.1 --repeats 3

With head shares (``kvp_gym.cache.HeadShares``) a layer stores its KV heads folded into one sequence and attends
with its own per-head mask: every query head computes logits over all H heads' entries, H times the attention's
arithmetic over the compressed part, and builds the mask at every step. This prints the decoding steps' CPU time
(this process, one torch thread, median of ``--repeats``) for the same policy (K-norm: scoring costs nothing) with
equal budgets and with the default model's shares, at the same total entries, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.models import DEFAULT_MODEL, load_model


def decode_seconds(model, prompt: torch.Tensor, scorer, budget: int, steps: int) -> float:
    """CPU seconds of ``steps`` greedy decoding steps after the prompt's prefill and compression."""
    cache = EvictingCache(scorer, budget, config=model.config)
    logits = model(prompt, cache=cache).logits[:, -1:]
    cache.flush()
    started = time.process_time()
    for _ in range(steps):
        logits = model(logits.argmax(-1), cache=cache).logits
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", type=int, default=1024, help="Prompt tokens (random ids).")
    parser.add_argument("--budget", type=float, default=0.25, help="Kept share of the prompt per KV head.")
    parser.add_argument("--steps", type=int, default=64, help="Tokens decoded after the compression.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, _ = load_model(args.model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    budget = int(args.budget * args.prompt)
    times = {name: [] for name in ("knorm", "knorm+shares")}
    for _ in range(args.repeats):
        for name in times:
            times[name].append(decode_seconds(model, prompt, scorers.get(name), budget, args.steps))
    equal, shared = (statistics.median(times[name]) for name in times)
    print(f"{args.prompt}-token prompt, {budget} entries per KV head on average, {args.steps} steps, one thread:")
    print(f"  equal budgets  {1000 * equal / args.steps:7.1f} ms per token")
    print(f"  head shares    {1000 * shared / args.steps:7.1f} ms per token  ({shared / equal:.2f}x)")


if __name__ == "__main__":
    main()
