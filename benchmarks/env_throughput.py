"""KVEvict-v0 throughput: the native vector env vs Gymnasium's SyncVectorEnv over the single env,
and the floor (only slicing the observation tensors and sorting B score vectors).

    python benchmarks/env_throughput.py [--traces DIR] [--num-envs 64] [--steps 20]

Needs traces longer than the largest N (2048 + 1 tokens): without --traces, 2 random-token sequences
of 2112 tokens are traced once through the embedded SmolLM2 into $KVP_GYM_HOME/traces/. Episodes
use one fixed layer (--layer) so the per-(trace, layer) tables are built once, in the warm-up.
Throughput is in env steps (= episodes) per second, on --threads torch threads (default 1).
Goal: native >= 10x sync, and within 3x of the floor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import kvp_gym  # noqa: F401  (registers the envs)
from kvp_gym.envs.episodes import TraceSource
from kvp_gym.envs.kv_evict_vector import KVEvictVectorEnv
from kvp_gym.paths import home_dir
from kvp_gym.progress import progress_bar
from kvp_gym.traces import TraceDataset

SIZES = (256, 1024, 2048)


def benchmark_traces(length: int = 2112, count: int = 2, seed: int = 0) -> Path:
    """Random-token traces through the embedded model, written once (resumable)."""
    from kvp_gym.models import DEFAULT_MODEL, ModelSpec, load_model
    from kvp_gym.traces.generate import TraceWriter

    directory = home_dir() / "traces" / f"bench-random-{length}"
    if (directory / "manifest.json").exists() and len(TraceDataset(directory)) >= count:
        return directory
    model, tokenizer = load_model(DEFAULT_MODEL)
    params = {"source": "random-tokens", "split": "test", "n": count, "length": length, "seed": seed,
              "model": DEFAULT_MODEL}
    writer = TraceWriter(directory, params, ModelSpec.from_config(model.config, DEFAULT_MODEL))
    generator = torch.Generator().manual_seed(seed)
    with progress_bar(count, "benchmark traces") as bar:
        for index in range(count):
            ids = torch.randint(3, len(tokenizer), (length,), generator=generator)
            name = f"seq_{index:05d}.safetensors"
            if name not in writer.done():
                writer.add(name, model, ids, {"source": "random-tokens"})
            bar.advance()
    return directory


def steps_per_second(step: Callable[[], object], steps: int, num_envs: int) -> float:
    step()  # warm-up: builds whatever the first episodes need
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * num_envs / (time.perf_counter() - start)


def native_env(options: dict, num_envs: int, actions: np.ndarray) -> Callable[[], object]:
    envs = KVEvictVectorEnv(num_envs, **options)
    envs.reset(seed=0)
    return lambda: envs.step(actions)


def sync_env(options: dict, num_envs: int, actions: np.ndarray) -> Callable[[], object]:
    envs = gym.make_vec("KVEvict-v0", num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, **options)
    envs.reset(seed=0)
    return lambda: envs.step(actions)


def floor(options: dict, num_envs: int, actions: np.ndarray) -> Callable[[], object]:
    """Slice keys and values [B, N, d] of random (trace, head) pairs and sort B score vectors."""
    source = TraceSource(options["traces"])
    size, layer = options["max_tokens"], options["layer"]
    keys = torch.stack([trace.k(layer)[:, :size] for trace in source.traces])
    values = torch.stack([trace.v(layer)[:, :size] for trace in source.traces])
    rng = np.random.default_rng(0)

    def step() -> object:
        trace = torch.from_numpy(rng.integers(len(source), size=num_envs))
        head = torch.from_numpy(rng.integers(source.spec.num_kv_heads, size=num_envs))
        scores = torch.from_numpy(actions)
        return keys[trace, head].numpy(), values[trace, head].numpy(), torch.sort(scores, dim=1, descending=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=Path, default=None)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    traces = str(args.traces or benchmark_traces())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B = {args.num_envs}, layer {args.layer}, "
          f"traces {traces}")
    print(f"{'N':>6} {'native':>10} {'sync':>10} {'floor':>10}   native/sync  floor/native   (env steps/s)")
    for size in SIZES:
        options = {"traces": traces, "max_tokens": size, "layer": args.layer}
        actions = np.random.default_rng(0).random((args.num_envs, size), dtype=np.float32)
        rates = {
            name: steps_per_second(make(options, args.num_envs, actions), args.steps, args.num_envs)
            for name, make in (("native", native_env), ("sync", sync_env), ("floor", floor))
        }
        print(f"{size:>6} {rates['native']:>10,.0f} {rates['sync']:>10,.0f} {rates['floor']:>10,.0f}"
              f"   {rates['native'] / rates['sync']:>10.1f}x {rates['floor'] / rates['native']:>12.2f}x")


if __name__ == "__main__":
    main()
