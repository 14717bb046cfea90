"""``kvp-gym sweep``: training runs over agents x heads x seeds x reward variants, each a normal run
directory under ``OUT/runs/<name>`` (made by ``agents.train.train``, so it resumes like any run), then a
summary over seeds with the leaderboard's intervals (IQM and mean with bootstrap intervals,
``kvp_gym.eval.stats``): ``OUT/SUMMARY.md``, ``OUT/summary.json``, ``OUT/summary.png``.

With ``workers`` / ``address`` each run is a Ray task (one CPU, one torch thread; a task whose worker
dies is retried and resumes from the run's last checkpoint); without them the runs go one after another.
``heads="each"`` trains one agent per (layer, KV head) of the trace model (90 runs for SmolLM2), the
per-head training that parallelises best.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typer import Option as typer_option

if TYPE_CHECKING:
    from agents.train import TrainConfig

HEAD_CHOICES = "all (one run training every head) | each (one run per layer and KV head) | L (the KV heads of layer L) | L:H"
METRIC = "cost_ratio"  # the final evaluation's mean cost ratio (lower is better, oracle = 1)


def head_settings(heads: list[str], num_layers: int, num_kv_heads: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, TrainConfig head fields) for each --heads value."""
    settings: list[tuple[str, dict[str, Any]]] = []
    for item in heads:
        if item == "all":
            settings.append(("all", {"all_heads": True}))
        elif item == "each":
            settings += [(f"L{layer}H{head}", {"layer": layer, "kv_head": head})
                         for layer in range(num_layers) for head in range(num_kv_heads)]
        else:
            layer, _, head = item.partition(":")
            try:
                fields = {"layer": int(layer)} if not head else {"layer": int(layer), "kv_head": int(head)}
            except ValueError:
                raise ValueError(f"--heads {item!r}: expected {HEAD_CHOICES}") from None
            settings.append((f"L{layer}" + (f"H{head}" if head else ""), fields))
    return settings


def sweep_configs(base: TrainConfig, agents: list[str], heads: list[str], seeds: list[int], rewards: list[str] | None,
                  out: Path) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Every run of the sweep: (its labels, its TrainConfig writing ``out/runs/<name>``)."""
    from kvp_gym.envs.episodes import TraceSource

    if not agents or not heads or not seeds:
        raise ValueError("a sweep needs at least one --agent, one --heads and one --seed")
    spec = TraceSource(base.traces).spec
    runs = []
    for agent in agents:
        for reward in rewards or [None]:
            for head_label, head_fields in head_settings(heads, spec.num_layers, spec.num_kv_heads):
                for seed in seeds:
                    labels = {"agent": agent, "reward": reward or "default", "heads": head_label, "seed": seed}
                    name = f"{agent}-{labels['reward']}-{head_label}-s{seed}"
                    env_options = dict(base.env_options) if reward is None else {**base.env_options, "reward": reward}
                    heads_of_run = {"layer": None, "kv_head": None, "all_heads": False, **head_fields}
                    config = dataclasses.replace(base, agent=agent, seed=seed, env_options=env_options,
                                                 out=str(out / "runs" / name), progress=False, **heads_of_run)
                    runs.append(({"run": name, **labels}, config))
    return runs


def train_run(labels: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """One run (on a worker or here): train (or resume) it; returns its labels and final evaluation."""
    from agents.train import train
    from kvp_gym.scale import crash_once

    crash_once("sweep")
    started = time.perf_counter()
    result = train(config)
    return {**labels, "out": config.out, "evaluation": result.evaluation, "seconds": time.perf_counter() - started}


def _train_on_worker(labels: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    from kvp_gym.scale.runtime import worker_setup

    worker_setup()
    return train_run(labels, config)


def run_sweep(base: TrainConfig, out: str | Path, agents: list[str], heads: list[str], seeds: list[int],
              rewards: list[str] | None = None, workers: int | None = None, address: str | None = None,
              show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every run of the sweep and write its summary; returns the summary."""
    from kvp_gym.progress import progress_bar
    from kvp_gym.scale import wants_ray

    if base.eval_traces is None:
        raise ValueError("a sweep compares runs by their evaluation: give --eval-traces")
    distributed = wants_ray(workers, address)
    out = Path(out).expanduser()
    runs = sweep_configs(base, agents, heads, seeds, rewards, out)
    results: list[dict[str, Any]] = []
    with progress_bar(len(runs), f"sweep: {len(runs)} runs", enabled=show_progress) as bar:
        if not distributed:
            for labels, config in runs:
                results.append(train_run(labels, config))
                bar.advance(1, status=labels["run"])
        else:
            import ray

            from kvp_gym.scale import ray_session
            from kvp_gym.scale.runtime import RETRIES

            with ray_session(workers, address):
                task = ray.remote(num_cpus=1, max_retries=RETRIES)(_train_on_worker)
                pending = [task.remote(labels, config) for labels, config in runs]
                try:
                    while pending:
                        ready, pending = ray.wait(pending, num_returns=1)
                        results.append(ray.get(ready[0]))
                        bar.advance(1, status=results[-1]["run"])
                except BaseException:  # Ctrl-C or a failed run: stop the others (each resumes from its checkpoint)
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise
    order = {labels["run"]: index for index, (labels, _) in enumerate(runs)}
    results.sort(key=lambda result: order[result["run"]])
    return write_summary(results, out)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (agent, reward, heads): the final cost ratio over seeds, IQM and mean with 95% intervals."""
    from kvp_gym.eval.stats import bootstrap_ci, iqm_ci

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["agent"], result["reward"], result["heads"]), []).append(result)
    rows = []
    for (agent, reward, heads), members in groups.items():
        values = [member["evaluation"][METRIC] for member in members if METRIC in member["evaluation"]]
        row: dict[str, Any] = {"agent": agent, "reward": reward, "heads": heads, "seeds": [m["seed"] for m in members],
                               "values": values}
        if values:
            for label, interval in (("iqm", iqm_ci(values)), ("mean", bootstrap_ci(values))):
                row[label], row[f"{label}_low"], row[f"{label}_high"] = interval.estimate, interval.low, interval.high
        rows.append(row)
    return rows


def write_summary(results: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """SUMMARY.md (table), summary.json (every run and row) and summary.png (IQM with its interval)."""
    from kvp_gym.io import write_atomic, write_json_atomic

    rows = summarize(results)
    summary = {"metric": METRIC, "runs": results, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    lines = [f"# Sweep: final {METRIC} (lower is better, oracle = 1), over seeds", "",
             "| agent | reward | heads | seeds | IQM [95% CI] | mean [95% CI] |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]:.4f} [{row[k + '_low']:.4f}, {row[k + '_high']:.4f}]" if k in row else "-" for k in ("iqm", "mean")]
        lines.append(f"| {row['agent']} | {row['reward']} | {row['heads']} | {len(row['seeds'])} | {cells[0]} | {cells[1]} |")
    write_atomic(out / "SUMMARY.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    plotted = [row for row in rows if "iqm" in row]
    if plotted:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(max(4.0, 0.35 * len(plotted) + 2), 3.5))
        labels = [f"{row['agent']}/{row['reward']}/{row['heads']}" for row in plotted]
        estimates = [row["iqm"] for row in plotted]
        errors = [[row["iqm"] - row["iqm_low"] for row in plotted], [row["iqm_high"] - row["iqm"] for row in plotted]]
        axis.errorbar(range(len(plotted)), estimates, yerr=errors, fmt="o", capsize=3)
        axis.set_xticks(range(len(plotted)), labels, rotation=60, ha="right", fontsize=7)
        axis.set_ylabel(f"final {METRIC} (IQM, 95% CI)")
        figure.tight_layout()
        write_atomic(out / "summary.png", lambda tmp: figure.savefig(tmp, format="png", dpi=120))
        plt.close(figure)
    return summary


def sweep_command(
    out: Path = typer_option(..., help="sweep directory: runs/<name>/ (normal run directories), SUMMARY.md, summary.json/png"),
    agent: list[str] = typer_option(..., "--agent", help="agent to train (repeatable)"),
    traces: list[Path] = typer_option(..., "--traces", help="training trace set directory (repeatable)"),
    eval_traces: list[Path] = typer_option(..., "--eval-traces", help="test trace set(s): the final cost ratio compared across runs"),
    steps: int = typer_option(..., help="gradient updates per run"),
    heads: list[str] = typer_option(["all"], "--heads", help=f"heads per run (repeatable): {HEAD_CHOICES}"),
    seed: list[int] = typer_option([0], "--seed", help="seed (repeatable: the interval is over seeds)"),
    reward: list[str] = typer_option([], "--reward", help="reward variant (repeatable): cost_ratio | neg_cost (default: the env's)"),
    set_: list[str] = typer_option([], "--set", help="agent hyperparameter KEY=VALUE (repeatable, every run)"),
    env_opt: list[str] = typer_option([], "--env-opt", help="training env option KEY=VALUE (repeatable, every run)"),
    arch: str = typer_option("mlp", help="trainable architecture (mlp, kvp-net)"),
    hidden: int = typer_option(64, help="hidden units of each head's MLP"),
    save_every: int = typer_option(50, help="checkpoint every K steps (a retried run resumes from there)"),
    workers: int = typer_option(0, help="run on N Ray workers (a local Ray with N CPUs; needs kvp-gym[ray]); 0 = one after another"),
    address: str | None = typer_option(None, help="join this Ray cluster instead (e.g. auto); uses its CPUs unless --workers"),
    progress: bool = typer_option(True, help="show a progress bar"),
) -> None:
    """Train a grid of runs (agents x heads x seeds x rewards), in parallel on Ray, and summarise them with intervals."""
    import typer

    from agents.cli import _pairs
    from agents.train import TrainConfig

    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors(TypeError):
        base = TrainConfig(agent=agent[0], traces=[str(path) for path in traces], out=str(out), steps=steps, arch=arch,
                           hidden=hidden, agent_options=_pairs(set_, "--set", parse_json=False),
                           env_options=_pairs(env_opt, "--env-opt", parse_json=True),
                           eval_traces=[str(path) for path in eval_traces], eval_every=steps, save_every=save_every,
                           progress=False)
        summary = run_sweep(base, out, list(agent), list(heads), list(seed), list(reward) or None, workers=workers,
                            address=address, show_progress=progress)
    for row in summary["rows"]:
        typer.echo(f"  {row['agent']:<12} {row['reward']:<11} {row['heads']:<8} IQM {row.get('iqm', float('nan')):.4f} "
                   f"[{row.get('iqm_low', float('nan')):.4f}, {row.get('iqm_high', float('nan')):.4f}] over {len(row['seeds'])} seeds")
    typer.echo(f"wrote {Path(out) / 'SUMMARY.md'} and summary.png")
