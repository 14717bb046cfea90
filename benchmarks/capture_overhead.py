"""Trace capture speed against a plain forward pass of the same model, measured in the same run.

Goal (issue 2): capture (Q/K/V recording, fp16 copies, loss/entropy) at most 25% slower than the
plain sdpa forward. Usage: python benchmarks/capture_overhead.py [--tokens 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvp_gym.models import capture_qkv, load_model
from kvp_gym.traces.generate import token_losses


def best_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain, _ = load_model(args.model)
    plain.set_attn_implementation("sdpa")
    traced, _ = load_model(args.model)
    print(f"model {args.model}, {torch.get_num_threads()} threads, best of {args.repeats}")
    for length in args.tokens:
        ids = torch.randint(3, plain.config.vocab_size, (1, length))

        def plain_forward():
            with torch.inference_mode():
                plain(ids, use_cache=False)

        def capture():
            logits, _ = capture_qkv(traced, ids)
            token_losses(logits, ids[0])

        plain_best, plain_median = best_time(plain_forward, args.repeats)
        capture_best, capture_median = best_time(capture, args.repeats)
        print(
            f"T={length}: plain forward {plain_best:.2f} s ({length / plain_best:,.0f} tok/s), "
            f"capture {capture_best:.2f} s ({length / capture_best:,.0f} tok/s); "
            f"overhead {capture_best / plain_best - 1:+.1%} (median {capture_median / plain_median - 1:+.1%}; goal <= +25%)"
        )


if __name__ == "__main__":
    main()
