"""``kvp-gym compare``: sample-efficiency curves of several agents over seeds (entry-point group
``kvp_gym.commands``).

    kvp-gym compare --agents kvp,grpo,pairwise,ppo --seeds 3 --steps 300 --traces TRAIN --eval-traces TEST

Every (agent, seed) is trained on the same head(s) for ``--steps`` updates, evaluated on held-out
traces every ``--eval-every`` updates (mean cost ratio, lower is better, 1 = the oracle). Per agent and
evaluation point: the IQM over seeds with its 95% bootstrap interval (``kvp_gym.eval.stats.iqm_ci``),
against env steps and against wall time. Writes ``compare.png`` (both curves), ``compare.md`` and
``compare.csv`` into ``--out``. Each finished run's curve is kept in its run directory (``curve.json``)
and reused by a rerun with the same settings.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)


def run_comparison(
    agents: list[str], seeds: int, steps: int, traces: list[str], eval_traces: list[str], out: Path,
    heads: list[tuple[int, int]], eval_every: int | None = None, progress: bool = False,
) -> list[dict[str, Any]]:
    """Train every (agent, seed, head); returns one row per (agent, seed, head, evaluation step) with the
    held-out cost ratio, env steps and seconds so far (linear in the step: the run's mean pace)."""
    from agents.train import TrainConfig, train
    from kvp_gym.io import write_json_atomic

    every = eval_every or max(1, steps // 4)
    rows = []
    for agent in agents:
        for seed in range(seeds):
            for layer, head in heads:
                run_dir = out / "runs" / agent / f"seed{seed}" / f"L{layer}H{head}"
                saved = run_dir / "curve.json"
                settings = {"steps": steps, "every": eval_every or max(1, steps // 4), "traces": traces, "eval": eval_traces}
                if saved.exists() and json.loads(saved.read_text())["settings"] == settings:
                    rows += json.loads(saved.read_text())["rows"]
                    continue
                result = train(TrainConfig(
                    agent=agent, traces=traces, out=str(run_dir),
                    steps=steps, layer=layer, kv_head=head, seed=seed, eval_traces=eval_traces, eval_every=every,
                    save_every=max(every, steps), progress=progress,
                ))
                pace_env = result.env_steps / steps if steps else 0.0
                pace_time = result.seconds / steps if steps else 0.0
                curve = []
                for step, metrics in sorted(result.evaluations.items()):
                    if "cost_ratio" in metrics:
                        curve.append({"agent": agent, "seed": seed, "layer": layer, "kv_head": head, "step": step,
                                     "env_steps": step * pace_env, "seconds": step * pace_time,
                                     "cost_ratio": float(metrics["cost_ratio"])})
                if result.seconds:  # a run that trained now (not one resumed as already finished): keep its curve
                    write_json_atomic(saved, {"settings": settings, "rows": curve})
                rows += curve
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (agent, step): the IQM over seeds (each seed's mean over heads) of the cost ratio, its 95%
    interval, and the mean env steps and seconds to get there."""
    from collections import defaultdict

    import numpy as np

    from kvp_gym.eval.stats import iqm_ci

    cells: dict[tuple[str, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[row["agent"], row["step"]][row["seed"]].append(row)
    table = []
    for (agent, step), by_seed in sorted(cells.items()):
        per_seed = [float(np.mean([r["cost_ratio"] for r in runs])) for runs in by_seed.values()]
        interval = iqm_ci(per_seed)
        table.append({"agent": agent, "step": step, "seeds": len(per_seed),
                      "env_steps": float(np.mean([r["env_steps"] for runs in by_seed.values() for r in runs])),
                      "seconds": float(np.mean([r["seconds"] for runs in by_seed.values() for r in runs])),
                      "iqm_cost_ratio": interval.estimate, "low": interval.low, "high": interval.high})
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
    lines = ["# Sample efficiency", "", "Held-out mean cost ratio (lower is better, 1 = the oracle): IQM over seeds "
             "[95% bootstrap interval], against updates, env steps and wall time.", "",
             "| agent | step | env steps | seconds | seeds | IQM cost ratio | 95% CI |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['agent']} | {r['step']} | {r['env_steps']:.0f} | {r['seconds']:.1f} | {r['seeds']} | "
                     f"{r['iqm_cost_ratio']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] |")
    write_atomic(out / "compare.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for k, agent in enumerate(sorted({r["agent"] for r in table})):
        mine = [r for r in table if r["agent"] == agent]
        for ax, x in zip(axes, ("env_steps", "seconds")):
            xs = [r[x] for r in mine]
            ax.plot(xs, [r["iqm_cost_ratio"] for r in mine], marker="o", color=f"C{k}", label=agent)
            ax.fill_between(xs, [r["low"] for r in mine], [r["high"] for r in mine], color=f"C{k}", alpha=0.15)
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel("held-out cost ratio (IQM over seeds)")
    axes[0].legend(fontsize=8)
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
    heads: Annotated[str, typer.Option(help="LAYER:KV_HEAD pairs, comma-separated (one agent per head)")] = "14:1",
    eval_every: Annotated[int | None, typer.Option(help="evaluate every K updates (default steps/4)")] = None,
    out: Annotated[Path, typer.Option(help="output directory: compare.png, compare.md, compare.csv, runs/")] = Path("runs/compare"),
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is faster on a busy 2-core CPU)")] = None,
) -> None:
    """Sample-efficiency curves (IQM over seeds, 95% intervals) of held-out cost ratio against env steps and wall time."""
    import torch

    from agents.train import AGENTS

    names = [name.strip() for name in agents.split(",") if name.strip()]
    unknown = [name for name in names if name not in AGENTS]
    if not names or unknown or seeds < 1 or steps < 1:
        typer.secho(f"error: --agents must name some of {', '.join(AGENTS)} (unknown: {unknown}); --seeds and --steps >= 1",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    try:
        pairs = [tuple(int(part) for part in pair.split(":")) for pair in heads.split(",") if pair.strip()]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError
    except ValueError:
        typer.secho(f"error: --heads must be LAYER:KV_HEAD pairs, got {heads!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    if threads:
        torch.set_num_threads(threads)
    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors(TypeError):
        rows = run_comparison(names, seeds, steps, [str(p) for p in traces], [str(p) for p in eval_traces], out, pairs,
                              eval_every)
    table = summarize(rows)
    for path in write_outputs(table, rows, out):
        typer.echo(f"wrote {path}")
    final = {r["agent"]: r for r in table}
    for agent, r in final.items():
        if not math.isnan(r["iqm_cost_ratio"]):
            typer.echo(f"  {agent:<12} IQM cost ratio {r['iqm_cost_ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                       f"after {r['env_steps']:.0f} env steps, {r['seconds']:.0f} s")
