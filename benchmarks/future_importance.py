"""Time of future_importance per (layer, head, n) at T = 2048, and of the all-n importance table.

Usage: python benchmarks/future_importance.py [--traces DIR]   (default: one 2048-token real trace made
into $KVP_GYM_HOME/bench/traces-2048 on first use)
"""

from __future__ import annotations

import argparse
import time

import torch

from kvp_gym.paths import home_dir
from kvp_gym.traces import TraceDataset, generate_traces
from kvp_gym.utility import future_importance, importance_from_table, importance_table


def bench_traces(length: int) -> TraceDataset:
    return generate_traces(home_dir() / "bench" / f"traces-{length}", "prose", n=1, length=length, split="test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", default=None)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dataset = TraceDataset(args.traces) if args.traces else bench_traces(args.length)
    trace = dataset[0]
    length = trace.length
    layer = trace.spec.num_layers // 2
    ns = [length // 4, length // 2, 3 * length // 4]
    trace.q(layer), trace.k(layer)

    started = time.perf_counter()
    for _ in range(args.repeats):
        for n in ns:
            future_importance(trace, layer, 0, n)
    per_call = (time.perf_counter() - started) / (args.repeats * len(ns))

    started = time.perf_counter()
    table = importance_table(trace, layer)
    table_time = time.perf_counter() - started
    started = time.perf_counter()
    for n in range(1, length):
        importance_from_table(table, n)
    lookup = (time.perf_counter() - started) / (length - 1)
    print(f"T={length}, layer {layer}, {torch.get_num_threads()} threads")
    print(f"future_importance(trace, layer, head, n): {per_call * 1e3:.1f} ms per call (n in {ns})")
    print(
        f"importance_table (all {trace.spec.num_kv_heads} heads x all n): {table_time * 1e3:.0f} ms, then "
        f"{lookup * 1e6:.1f} us per (n) lookup for all heads; "
        f"table vs per-call for all heads and n: {per_call * trace.spec.num_kv_heads * (length - 1) / table_time:,.0f}x"
    )


if __name__ == "__main__":
    main()
