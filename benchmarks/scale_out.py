"""Serial against Ray workers, measured in the same run: trace generation and the leaderboard's downstream units.

    python benchmarks/scale_out.py                 # SmolLM2-135M: 8 prose traces of 512 tokens; 24 perplexity units
    python benchmarks/scale_out.py --workers 4     # more workers (a bigger box)
    python benchmarks/scale_out.py --tiny          # the tiny random Llama (plumbing check, seconds)
    python benchmarks/scale_out.py --serial-threads 1   # serial on one thread, as each worker runs

Each phase runs serially in this process (torch's default threads) and then on ``--workers`` Ray workers
(one CPU and one torch thread each), into separate directories, and the outputs are compared (trace files
byte for byte, leaderboard records as JSON). Wall times; the Ray start-up is timed apart (paid once per
command), the workers' model loading is inside the worker figure. The 1-minute load average is printed
before and after each phase: on a shared box other jobs take CPU from both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def load() -> str:
    return "load avg {:.2f} / {:.2f} / {:.2f} on {} CPUs".format(*os.getloadavg(), os.cpu_count())


def tiny_model(directory: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvp_gym.models.loading import DEFAULT_MODEL, resolve_model_dir

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL)).save_pretrained(directory)
    return str(directory)


def relative_difference(a: object, b: object) -> float:
    """The largest relative difference between two JSON records' numbers; inf if anything else differs."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((relative_difference(a[key], b[key]) for key in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((relative_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    return 0.0 if a == b else float("inf")


def report(name: str, units: int, serial: float, distributed: float, workers: int, same: bool) -> None:
    print(f"{name}: {units} units | serial {serial:.1f} s ({units / serial * 3600:,.0f} units/h) | {workers} workers "
          f"{distributed:.1f} s ({units / distributed * 3600:,.0f} units/h, {units / distributed * 3600 / workers:,.0f} per worker-hour) "
          f"| speed-up {serial / distributed:.2f}x | outputs identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--traces", type=int, default=8, help="sequences to trace")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--texts", type=int, default=4, help="perplexity texts of the leaderboard suite")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--skip", choices=("traces", "leaderboard"), action="append", default=[])
    parser.add_argument("--serial-threads", type=int, default=None, help="torch threads of the serial runs (default: torch's)")
    args = parser.parse_args()
    import ray
    import torch

    if args.serial_threads:
        torch.set_num_threads(args.serial_threads)

    from kvp_gym.eval.leaderboard import run_leaderboard
    from kvp_gym.eval.suite import Suite
    from kvp_gym.models import DEFAULT_MODEL
    from kvp_gym.scale.runtime import WORKER_ENV
    from kvp_gym.traces.generate import generate_traces

    root = Path(tempfile.mkdtemp(prefix="kvp-scale-bench-"))
    model = tiny_model(root / "tiny") if args.tiny else DEFAULT_MODEL
    print(f"model {model} | driver torch threads {torch.get_num_threads()} | {load()}")
    started = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": dict(WORKER_ENV)})
    print(f"ray start-up (once per command): {time.perf_counter() - started:.1f} s")
    try:
        if "traces" not in args.skip:
            print(f"traces: {load()}")
            started = time.perf_counter()
            generate_traces(root / "serial", "prose", args.traces, args.length, split="test", model_name=model, show_progress=False)
            serial = time.perf_counter() - started
            shutil.copy(root / "serial" / "samples.json", root / "samples.json")
            (root / "ray").mkdir()
            shutil.copy(root / "samples.json", root / "ray" / "samples.json")  # the same samples: time the tracing only
            started = time.perf_counter()
            generate_traces(root / "ray", "prose", args.traces, args.length, split="test", model_name=model, show_progress=False,
                            workers=args.workers)
            distributed = time.perf_counter() - started
            same = all(path.read_bytes() == (root / "ray" / path.name).read_bytes() for path in (root / "serial").glob("seq_*"))
            report(f"trace generation ({args.length} tokens each)", args.traces, serial, distributed, args.workers, same)
            print(f"  {load()}")
        if "leaderboard" not in args.skip:
            from kvp_gym.models.loading import converted_dir

            model_dir = converted_dir(DEFAULT_MODEL)
            os.environ["KVP_GYM_HOME"] = str(root / "home")  # the suite's traces go here; the converted model is linked
            if not args.tiny and model_dir.exists():
                converted_dir(DEFAULT_MODEL).parent.mkdir(parents=True, exist_ok=True)
                converted_dir(DEFAULT_MODEL).symlink_to(model_dir, target_is_directory=True)
            suite = Suite(name="bench-scale", version=1, model=model, sources=("prose",), traces_per_source=args.texts,
                          length=args.length, prefix_fractions=(0.5,), budgets=(64, 128), ppl_prefix=args.length * 3 // 4,
                          ppl_sources=("prose",), ranking_traces=1)
            policies = ["streamingllm", "snapkv", "tova"]
            for out in ("lb-serial", "lb-ray"):  # the ranking units and the suite's traces first, untimed
                run_leaderboard(suite, root / out, policies, downstream=False, show_progress=False)
            print(f"leaderboard downstream: {load()}")
            started = time.perf_counter()
            serial_results = run_leaderboard(suite, root / "lb-serial", policies, show_progress=False, oracle=False)
            serial = time.perf_counter() - started
            started = time.perf_counter()
            ray_results = run_leaderboard(suite, root / "lb-ray", policies, show_progress=False, oracle=False, workers=args.workers)
            distributed = time.perf_counter() - started
            records = [sorted((root / out / "records" / suite.id).glob("*.json")) for out in ("lb-serial", "lb-ray")]
            assert [p.name for p in records[0]] == [p.name for p in records[1]], "not the same units"
            pairs = [(json.loads(a.read_text()), json.loads(b.read_text())) for a, b in zip(*records)]
            same = serial_results == ray_results and all(a == b for a, b in pairs)
            report("leaderboard downstream (perplexity units)", len(serial_results["downstream"]), serial, distributed, args.workers, same)
            if not same:  # a serial run with several torch threads sums in another order than a one-thread worker
                worst = max(relative_difference(a, b) for a, b in pairs)
                print(f"  records equal but for float rounding: max relative difference {worst:.1e} (serial ran with "
                      f"{torch.get_num_threads()} torch threads, the workers with 1; with 1 thread both are bitwise equal)")
            print(f"  {load()}")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
