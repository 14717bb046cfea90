"""`kvp-gym traces generate|info`. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from kvp_gym.data import SOURCES, SPLITS
from kvp_gym.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvp_gym.traces import TraceDataset

app = typer.Typer(help="Generate and inspect trace sets (post-RoPE Q/K/V of a real model over real text).")


@contextmanager
def one_line_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn a validation error (bad argument, missing or corrupt file, or one of ``also``) into one line and
    exit code 2, and Ctrl-C into one line and exit code 130 (every long command writes whole files only and
    resumes)."""
    try:
        yield
    except (ValueError, FileNotFoundError, *also) as error:
        typer.secho(f"error: {' '.join(str(error).splitlines())}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted: every finished file is kept; rerun the same command to resume", err=True)
        raise typer.Exit(code=130) from None


@app.command()
def generate(
    source: str = typer.Option(..., help=f"Text source: {' | '.join(SOURCES)}."),
    n: int = typer.Option(..., help="Number of sequences."),
    length: int = typer.Option(1024, help="Tokens per sequence."),
    split: str = typer.Option("train", help=f"{' | '.join(SPLITS)} (disjoint topics and seeds)."),
    out: Path = typer.Option(..., help="Output directory (rerun the same command to resume)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name or local checkpoint directory."),
    seed: int | None = typer.Option(None, help="Seed (default: 0 for train, 1 for test)."),
    workers: int = typer.Option(0, help="Trace on N Ray workers (a local Ray with N CPUs; needs kvp-gym[ray]); 0 = serial."),
    address: str | None = typer.Option(None, help="Join this Ray cluster instead (e.g. auto); uses its CPUs unless --workers."),
    haystack: str | None = typer.Option(None, help="RULER only: filler | prose | repeat (default filler)."),
    dialogue_batch: int = typer.Option(1, help="Dialogue only: the model writes this many dialogues at once "
                                               "(12: 2.5x faster on a CPU thread; other dialogues than 1)."),
) -> None:
    """Run the model once per sequence and store Q/K/V of every layer (fp16, safetensors)."""
    from kvp_gym.traces.generate import generate_traces

    with one_line_errors():
        dataset = generate_traces(out, source, n, length, split=split, model_name=model, seed=seed, workers=workers, address=address,
                                  haystack=haystack, dialogue_batch=dialogue_batch)
    print_summary(dataset)


@app.command()
def info(directory: Path = typer.Argument(..., help="Trace set directory."), verify: bool = typer.Option(False, help="Check every file's sha256.")) -> None:
    """Print a summary of a trace set: sequences, tokens, bytes, model, sources."""
    from kvp_gym.traces import TraceDataset

    with one_line_errors():
        print_summary(TraceDataset(directory, verify=verify))


def print_summary(dataset: TraceDataset) -> None:
    """A table of what a trace set holds."""
    manifest = dataset.manifest
    params = manifest["params"]
    spec = dataset.spec
    sources: dict[str, int] = {}
    for record in dataset.records:
        meta = record.get("meta", {})
        key = f"{meta.get('source', params['source'])}/{meta.get('task', '-')}"
        sources[key] = sources.get(key, 0) + 1
    table = Table(title=f"trace set {dataset.directory}", show_header=False)
    table.add_row("model", f"{spec.name} ({spec.num_layers} layers, {spec.num_heads} heads, {spec.num_kv_heads} KV heads, d={spec.head_dim})")
    table.add_row("split / seed", f"{params['split']} / {params['seed']}")
    table.add_row("sequences", f"{len(dataset)} of {params['n']}")
    table.add_row("tokens", f"{dataset.num_tokens:,} (lengths {min(dataset.lengths)}..{max(dataset.lengths)})")
    table.add_row("bytes", f"{dataset.num_bytes / 1e6:,.1f} MB ({dataset.num_bytes / dataset.num_tokens * 1000 / 1e6:.1f} MB per 1k tokens)")
    table.add_row("sources", ", ".join(f"{key} x{count}" for key, count in sorted(sources.items())))
    table.add_row("created", manifest.get("created", "?"))
    Console().print(table)
