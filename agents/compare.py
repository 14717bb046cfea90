"""``kvp-gym compare``: sample-efficiency curves of several agents over seeds (entry-point group
``kvp_gym.commands``).

    kvp-gym compare --agents kvp,grpo,pairwise,ppo --seeds 3 --steps 300 --traces TRAIN --eval-traces TEST
    kvp-gym compare --agents kvp,distill --heads all --val-traces VAL ...   # and downstream perplexity

Every (agent, seed) is trained on the same head(s) for ``--steps`` updates, evaluated on held-out
traces every ``--eval-every`` updates (mean cost ratio, lower is better, 1 = the oracle). With
``--heads all`` (one policy for every head, which can drive a real cache) and ``--val-traces``, each
evaluation also measures downstream perplexity: the validation texts' continuations through the real
model with the cache compressed by the policy to 10% and 25% of the prefix, as a ratio to the full
cache's (``agents.validation.DownstreamValidator``). Per agent and evaluation point: the IQM over seeds
with its 95% bootstrap interval (``kvp_gym.eval.stats.iqm_ci``), against env steps and against wall
time. Writes ``compare.png`` (the curves), ``compare.md`` and ``compare.csv`` into ``--out``. Each
finished run's curve is kept in its run directory (``curve.json``) and reused by a rerun with the same
settings.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)


METRICS = {"cost_ratio": "held-out cost ratio", "ppl_ratio": "downstream perplexity / full cache"}


def run_comparison(
    agents: list[str], seeds: int, steps: int, traces: list[str], eval_traces: list[str], out: Path,
    heads: list[tuple[int, int]] | None, eval_every: int | None = None, progress: bool = False,
    val_traces: str | None = None, val_texts: int = 4,
) -> list[dict[str, Any]]:
    """Train every (agent, seed, head), or every (agent, seed) with one policy for all heads (``heads``
    None); returns one row per run and evaluation step with the held-out cost ratio, with ``val_traces``
    the downstream perplexity ratio (``ppl_ratio``), and the env steps and seconds so far (linear in the
    step: the run's mean pace)."""
    from agents.train import TrainConfig, train
    from kvp_gym.io import write_json_atomic

    if val_traces is not None and heads is not None:
        raise ValueError("downstream perplexity (--val-traces) needs one policy for every head: add --heads all")
    every = eval_every or max(1, steps // 4)
    settings = {"steps": steps, "every": every, "traces": traces, "eval": eval_traces, "val": val_traces,
                "val_texts": val_texts}
    rows = []
    for agent in agents:
        for seed in range(seeds):
            for layer, head in heads or [(None, None)]:
                run_dir = out / "runs" / agent / f"seed{seed}" / ("all" if layer is None else f"L{layer}H{head}")
                saved = run_dir / "curve.json"
                if saved.exists() and json.loads(saved.read_text())["settings"] == settings:
                    rows += json.loads(saved.read_text())["rows"]
                    continue
                result = train(TrainConfig(
                    agent=agent, traces=traces, out=str(run_dir), steps=steps, layer=layer, kv_head=head,
                    all_heads=layer is None, seed=seed, eval_traces=eval_traces, eval_every=every,
                    val_traces=val_traces, val_every=every, val_texts=val_texts, save_every=max(every, steps),
                    progress=progress,
                ))
                pace_env = result.env_steps / steps if steps else 0.0
                pace_time = result.seconds / steps if steps else 0.0
                curve = []
                for step, metrics in sorted(result.evaluations.items()):
                    if "cost_ratio" in metrics:
                        row = {"agent": agent, "seed": seed, "layer": layer, "kv_head": head, "step": step,
                               "env_steps": step * pace_env, "seconds": step * pace_time,
                               "cost_ratio": float(metrics["cost_ratio"])}
                        if "val/ppl_ratio" in metrics:
                            row["ppl_ratio"] = float(metrics["val/ppl_ratio"])
                        curve.append(row)
                if result.seconds:  # a run that trained now (not one resumed as already finished): keep its curve
                    write_json_atomic(saved, {"settings": settings, "rows": curve})
                rows += curve
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (agent, step): for each metric the runs have, the IQM over seeds (each seed's mean over heads),
    ``iqm_<metric>``, and its 95% interval (``<metric>_low``, ``<metric>_high``); the mean env steps and
    seconds to get there."""
    from collections import defaultdict

    import numpy as np

    from kvp_gym.eval.stats import iqm_ci

    cells: dict[tuple[str, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[row["agent"], row["step"]][row["seed"]].append(row)
    table = []
    for (agent, step), by_seed in sorted(cells.items()):
        runs = [run for seed_runs in by_seed.values() for run in seed_runs]
        entry = {"agent": agent, "step": step, "seeds": len(by_seed),
                 "env_steps": float(np.mean([r["env_steps"] for r in runs])),
                 "seconds": float(np.mean([r["seconds"] for r in runs]))}
        for metric in METRICS:
            if all(metric in r for r in runs):
                interval = iqm_ci([float(np.mean([r[metric] for r in seed_runs])) for seed_runs in by_seed.values()])
                entry.update({f"iqm_{metric}": interval.estimate, f"{metric}_low": interval.low,
                              f"{metric}_high": interval.high})
        table.append(entry)
    return table


def write_outputs(table: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """compare.csv (every run's evaluations), compare.md (the IQM table) and compare.png (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvp_gym.io import write_atomic

    out.mkdir(parents=True, exist_ok=True)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["agent"])
            writer.writeheader()
            writer.writerows(table)

    write_atomic(out / "compare.csv", write_csv)
    metrics = [metric for metric in METRICS if table and all(f"iqm_{metric}" in r for r in table)]
    lines = ["# Sample efficiency", "", "IQM over seeds [95% bootstrap interval], against updates, env steps and wall "
             "time, of: " + "; ".join(f"{METRICS[m]} (lower is better)" for m in metrics) + ". A cost ratio of 1 "
             "is the oracle's ranking; a perplexity ratio of 1 is the full cache's.", "",
             "| agent | step | env steps | seconds | seeds | " + " | ".join(f"IQM {m.replace('_', ' ')} | 95% CI" for m in metrics) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(metrics)]
    for r in table:
        lines.append(f"| {r['agent']} | {r['step']} | {r['env_steps']:.0f} | {r['seconds']:.1f} | {r['seeds']} | "
                     + " | ".join(f"{r[f'iqm_{m}']:.3f} | [{r[f'{m}_low']:.3f}, {r[f'{m}_high']:.3f}]" for m in metrics)
                     + " |")
    write_atomic(out / "compare.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4 * len(metrics)), sharey="row", squeeze=False)
    for k, agent in enumerate(sorted({r["agent"] for r in table})):
        mine = [r for r in table if r["agent"] == agent]
        for row, metric in enumerate(metrics):
            for ax, x in zip(axes[row], ("env_steps", "seconds")):
                xs = [r[x] for r in mine]
                ax.plot(xs, [r[f"iqm_{metric}"] for r in mine], marker="o", color=f"C{k}", label=agent)
                ax.fill_between(xs, [r[f"{metric}_low"] for r in mine], [r[f"{metric}_high"] for r in mine],
                                color=f"C{k}", alpha=0.15)
    for row, metric in enumerate(metrics):
        axes[row, 0].set_xlabel("env steps")
        axes[row, 1].set_xlabel("wall time (s)")
        axes[row, 0].set_ylabel(f"{METRICS[metric]}\n(IQM over seeds)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Sample efficiency (95% bootstrap intervals)")
    fig.tight_layout()
    write_atomic(out / "compare.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return [out / "compare.png", out / "compare.md", out / "compare.csv"]


@app.command("compare")
def compare_command(
    traces: Annotated[list[Path], typer.Option(help="training trace set directory (repeatable)")],
    eval_traces: Annotated[list[Path], typer.Option(help="held-out trace set directory (repeatable)")],
    agents: Annotated[str, typer.Option(help="comma-separated agents, e.g. kvp,grpo,pairwise,ppo")] = "kvp,grpo,pairwise,ppo",
    seeds: Annotated[int, typer.Option(help="training seeds per agent")] = 3,
    steps: Annotated[int, typer.Option(help="updates per run")] = 150,
    heads: Annotated[str, typer.Option(help="LAYER:KV_HEAD pairs, comma-separated (one agent per head), or 'all' "
                                            "(one policy for every head, as --val-traces needs)")] = "14:1",
    eval_every: Annotated[int | None, typer.Option(help="evaluate every K updates (default steps/4)")] = None,
    out: Annotated[Path, typer.Option(help="output directory: compare.png, compare.md, compare.csv, runs/")] = Path("runs/compare"),
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is faster on a busy 2-core CPU)")] = None,
    val_traces: Annotated[Path | None, typer.Option(help="validation trace set: downstream perplexity at each "
                                                          "evaluation (needs --heads all)")] = None,
    val_texts: Annotated[int, typer.Option(help="validation texts (with --val-traces)")] = 4,
) -> None:
    """Sample-efficiency curves (IQM over seeds, 95% intervals) of held-out cost ratio, and downstream perplexity
    with --val-traces, against env steps and wall time."""
    import torch

    from agents.train import AGENTS

    names = [name.strip() for name in agents.split(",") if name.strip()]
    unknown = [name for name in names if name not in AGENTS]
    if not names or unknown or seeds < 1 or steps < 1:
        typer.secho(f"error: --agents must name some of {', '.join(AGENTS)} (unknown: {unknown}); --seeds and --steps >= 1",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    try:
        pairs = None if heads.strip() == "all" else [tuple(int(part) for part in pair.split(":"))
                                                     for pair in heads.split(",") if pair.strip()]
        if pairs is not None and (not pairs or any(len(pair) != 2 for pair in pairs)):
            raise ValueError
    except ValueError:
        typer.secho(f"error: --heads must be LAYER:KV_HEAD pairs or 'all', got {heads!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    if threads:
        torch.set_num_threads(threads)
    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors(TypeError):
        rows = run_comparison(names, seeds, steps, [str(p) for p in traces], [str(p) for p in eval_traces], out, pairs,
                              eval_every, val_traces=None if val_traces is None else str(val_traces), val_texts=val_texts)
    table = summarize(rows)
    for path in write_outputs(table, rows, out):
        typer.echo(f"wrote {path}")
    final = {r["agent"]: r for r in table}
    for agent, r in final.items():
        figures = [f"IQM {metric.replace('_', ' ')} {r[f'iqm_{metric}']:.3f} [{r[f'{metric}_low']:.3f}, {r[f'{metric}_high']:.3f}]"
                   for metric in METRICS if f"iqm_{metric}" in r and not math.isnan(r[f"iqm_{metric}"])]
        if figures:
            typer.echo(f"  {agent:<12} {', '.join(figures)} after {r['env_steps']:.0f} env steps, {r['seconds']:.0f} s")
