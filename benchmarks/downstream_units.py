"""The leaderboard's downstream units, one prefill per unit against one prefill per prompt, measured in one run.

    python benchmarks/downstream_units.py               # SmolLM2-135M: 2 prose texts and 2 RULER samples of a suite
    python benchmarks/downstream_units.py --texts 4 --policies streamingllm,snapkv,tova,h2o-norm,kvp

Every (policy, budget) unit of a prompt compresses the same prefill. ``per unit``: a fresh
``DownstreamRunner`` for each unit, which prefills the prompt itself and answers a RULER question alone
(what the leaderboard did before). ``shared``: one runner over ``unit_batches``, which prefills each prompt
once into a recording cache, forks it per policy and budget (``EvictingCache.fork``) and answers a RULER
prompt's units as batches of rows (``EvictingCache.stack``). Both use the same model object; the records are
compared (perplexity bit for bit; RULER answers string for string). One torch thread: run it on an idle
machine (the 1-minute load average is printed).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="headline", help="the suite whose cached test traces are used")
    parser.add_argument("--texts", type=int, default=2, help="perplexity texts and RULER samples")
    parser.add_argument("--policies", default="streamingllm,snapkv,tova,h2o-norm,kvp")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from kvp_gym import scorers
    from kvp_gym.eval.downstream import recording_window
    from kvp_gym.eval.leaderboard import DownstreamRunner, downstream_units, unit_batches
    from kvp_gym.eval.suite import get_suite, is_ruler

    suite = get_suite(args.suite)
    names = args.policies.split(",")
    policies = {name: scorers.get(name) for name in names}
    traces = suite.traces(show_progress=False)
    ppl_source = suite.ppl_sources[0]
    ruler_source = next(key for key in traces if is_ruler(key))
    chosen = {ppl_source: traces[ppl_source], ruler_source: traces[ruler_source]}
    units = [unit for unit in downstream_units(suite, chosen, policies)
             if unit[3] < args.texts and unit[1] != "full cache" and unit[2] in (ppl_source, ruler_source)]
    window = recording_window(policies.values())
    shared = DownstreamRunner(suite, chosen, scorers.get, window)
    shared(unit_batches(units)[0])  # load the model (untimed)
    print(f"{args.suite}: {args.texts} {ppl_source} texts, {args.texts} {ruler_source} samples, policies {names}, budgets "
          f"{suite.budget_settings()} | load avg {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    timings = {}
    for kind in ("ppl", "ruler"):
        todo = [unit for unit in units if unit[0] == kind]
        started = time.perf_counter()
        alone = []
        for unit in todo:
            runner = DownstreamRunner(suite, chosen, scorers.get, window)
            runner.model, runner.tokenizer = shared.model, shared.tokenizer
            alone += runner([unit])
        timings[kind, "per unit"] = time.perf_counter() - started
        shared.shared.clear()
        started = time.perf_counter()
        together = {}
        for batch in unit_batches(todo):  # a RULER batch holds every unit of a prompt: another order than todo's
            together.update(zip(batch, shared(batch)))
        together = [together[unit] for unit in todo]
        timings[kind, "shared"] = time.perf_counter() - started
        per_unit, fast = timings[kind, "per unit"], timings[kind, "shared"]
        same = sum(a == b for a, b in zip(alone, together))
        print(f"{kind}: {len(todo)} units | one prefill per unit {per_unit:.1f} s ({per_unit / len(todo):.2f} s/unit) | "
              f"one per prompt {fast:.1f} s ({fast / len(todo):.2f} s/unit) | speed-up {per_unit / fast:.2f}x | "
              f"identical records {same}/{len(todo)}")
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
