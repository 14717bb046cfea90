"""`kvp-gym leaderboard`. Bad input (unknown suite or scorer, missing or colliding checkpoint) is one line
on stderr and exit code 2, reported before any trace is generated."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


@app.command()
def leaderboard(
    suite: str = typer.Option("full", help="Benchmark suite: full (v1) | full-v2 (fractional budgets, calibrated RULER) | headline (learned vs heuristics at 10/25% kept, with an out-of-domain source) | unseen (perplexity on the two held-out domains, Python source and Shakespeare, at full-v2's budgets) | long (4096-token prose and Python source, 3072 compressed, at 10/25% kept) | quick (smoke checks, the demo) | demo."),
    checkpoint: list[Path] = typer.Option([], "--checkpoint", help="A trained scorer checkpoint to include (repeatable)."),
    policies: str | None = typer.Option(None, help="Comma-separated registered scorers (default: the suite's policies; else every ready registered policy and the oracle)."),
    out: Path = typer.Option(Path("leaderboard"), help="Output directory: LEADERBOARD.md, results.json/csv, plots."),
    downstream: bool = typer.Option(True, help="Also run the real model with the compressed cache (perplexity, RULER accuracy)."),
    workers: int = typer.Option(0, help="Compute the units on N Ray workers (a local Ray with N CPUs; needs kvp-gym[ray]); 0 = serial."),
    address: str | None = typer.Option(None, help="Join this Ray cluster instead (e.g. auto); uses its CPUs unless --workers."),
) -> None:
    """Evaluate every policy on one held-out suite and write LEADERBOARD.md, CSV/JSON and plots.

    Resumes if interrupted; a rerun of the same suite reuses and reproduces every number.
    """
    from kvp_gym.eval.leaderboard import run_leaderboard
    from kvp_gym.eval.report import ranking_table, write_report
    from kvp_gym.eval.suite import get_suite

    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors():
        try:
            chosen = get_suite(suite)
        except KeyError as error:
            raise ValueError(f"--suite: {error.args[0]}") from None
        names = [name.strip() for name in policies.split(",") if name.strip()] if policies else None
        if policies is not None and not names:
            raise ValueError("--policies: give at least one registered scorer name")
        try:
            results = run_leaderboard(chosen, out, names, checkpoint, downstream=downstream, workers=workers, address=address)
        except KeyError as error:  # an unknown scorer name
            raise ValueError(f"--policies: {error.args[0]}") from None
        path = write_report(results, out)
    typer.echo("\nmean cost ratio (lower is better, oracle = 1):")
    for row in ranking_table(results):
        typer.echo(f"  {row['policy']:<24} {row['cost_ratio']:.3f}")
    typer.echo(f"\nwrote {path} and its plots")
