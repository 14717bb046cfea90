"""Kernel timings: the per-head scoring MLP and the top-budget K/V compaction, torch vs Triton.

    python benchmarks/kernel_speed.py            # on CUDA: torch and Triton; on CPU: the torch path only

Shapes follow the agents' per-head MLP (F = 2 * head_dim + 7 features, 64 hidden units, GELU) on
SmolLM2-135M (3 KV heads, head dim 64) and on a larger GQA model (8 KV heads, head dim 128).
Timings are medians of CUDA-event (GPU) or process CPU time (CPU, one thread) measurements after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvp_gym.kernels import mlp_scores, select_and_compact


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:  # this process's CPU time: other jobs on a shared box do not count
            begin = time.process_time()
            fn()
            times.append((time.process_time() - begin) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: no spin-waiting in CPU time)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    paths = [False, True] if device.type == "cuda" else [False]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device {device}, torch {torch.__version__}; K/V dtype {dtype}; times in ms (median of {args.repeats})")
    if device.type != "cuda":
        print("(Triton needs CUDA here: under TRITON_INTERPRET=1 it runs ~1000x slower than torch, so it is not timed)")

    print("\nmlp_scores: features [rows, N, F] -> [rows, N], hidden 64, gelu")
    print(f"{'rows':>6}{'N':>7}{'F':>5}" + "".join(f"{'triton' if t else 'torch':>10}" for t in paths))
    for rows, head_dim in ((3, 64), (8, 128)):
        for n in (1024, 4096, 16384):
            f = 2 * head_dim + 7
            x = torch.randn(rows, n, f, device=device, dtype=dtype)
            w1 = torch.randn(rows, f, 64, device=device) / f**0.5
            b1, w2, b2 = torch.randn(rows, 64, device=device), torch.randn(rows, 64, device=device), torch.randn(rows, device=device)
            cells = [median_ms(lambda t=t: mlp_scores(x, w1, b1, w2, b2, "gelu", use_triton=t), device, args.repeats)
                     for t in paths]
            print(f"{rows:>6}{n:>7}{f:>5}" + "".join(f"{c:>10.3f}" for c in cells))

    print("\nselect_and_compact: scores [B, H, N], K/V [B, H, N, d] -> budget N/4 (topk in torch, gather kernel)")
    print(f"{'B':>4}{'H':>4}{'N':>7}{'d':>5}" + "".join(f"{'triton' if t else 'torch':>10}" for t in paths))
    for batch, heads, head_dim in ((1, 3, 64), (8, 8, 128)):
        for n in (1024, 4096, 16384):
            scores = torch.randn(batch, heads, n, device=device)
            keys = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
            values = torch.randn_like(keys)
            protected = torch.zeros(batch, n, dtype=torch.bool, device=device)
            protected[:, :4] = protected[:, -16:] = True
            cells = [
                median_ms(lambda t=t: select_and_compact(scores, keys, values, n // 4, protected, use_triton=t),
                          device, args.repeats)
                for t in paths
            ]
            print(f"{batch:>4}{heads:>4}{n:>7}{head_dim:>5}" + "".join(f"{c:>10.3f}" for c in cells))


if __name__ == "__main__":
    main()
