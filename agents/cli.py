"""``kvp-gym train``: the typer sub-app the kvp-gym command mounts (entry-point group ``kvp_gym.commands``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)


def _pairs(items: list[str], option: str, parse_json: bool) -> dict[str, Any]:
    """["k=v", ...] -> {k: v}; with ``parse_json`` the values are JSON where they parse (numbers, true, null)."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        if parse_json:
            try:
                pairs[key] = json.loads(value)
            except json.JSONDecodeError:
                pairs[key] = value
        else:
            pairs[key] = value
    return pairs


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="run directory: scorer.safetensors, state.safetensors, tb/ (rerun to resume)")],
    agent: Annotated[str | None, typer.Option(help="kvp, grpo, grpo-stream, pairwise, pairwise-stream, distill, finetune (with --init: the continuation's loss through the model), ppo, a2c, trpo, ars, recurrent-ppo")] = None,
    traces: Annotated[list[Path] | None, typer.Option(help="training trace set directory (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(help="gradient updates (one batch of episodes each)")] = None,
    recipe: Annotated[str | None, typer.Option(help="train the recipe's policy (smollm2-long: the shipped kvp; smollm2: 1k texts only; smollm2-fast, smollm2-quick): makes its traces and sets every option")] = None,
    layer: Annotated[int | None, typer.Option(help="train the KV heads of this layer (with --kv-head: one head)")] = None,
    kv_head: Annotated[int | None, typer.Option(help="train this KV head of --layer")] = None,
    all_heads: Annotated[bool, typer.Option("--all-heads", help="train every (layer, KV head) at once")] = False,
    seed: Annotated[int, typer.Option(help="makes the run reproducible")] = 0,
    eval_traces: Annotated[list[Path] | None, typer.Option(help="test trace set(s) for periodic evaluation (mean cost ratio)")] = None,
    eval_every: Annotated[int, typer.Option(help="evaluate every K steps")] = 50,
    save_every: Annotated[int, typer.Option(help="checkpoint every K steps")] = 50,
    hidden: Annotated[int, typer.Option(help="hidden units of each head's MLP (--arch mlp, not with --init)")] = 64,
    arch: Annotated[str, typer.Option(help="trainable architecture: mlp (one hidden layer) or kvp-net (KVP's agent; --agent distill needs it)")] = "mlp",
    arch_opt: Annotated[list[str], typer.Option("--arch-opt", help="architecture option KEY=VALUE (repeatable), e.g. --arch-opt width=256 --arch-opt inputs=kv+attention+last")] = [],  # noqa: B006
    val_traces: Annotated[Path | None, typer.Option(help="validation trace set: downstream perplexity at 10%/25% kept every --val-every steps; the best checkpoint goes to OUT/best")] = None,
    val_every: Annotated[int, typer.Option(help="validate every K steps")] = 100,
    val_texts: Annotated[int, typer.Option(help="validation texts")] = 4,
    init: Annotated[Path | None, typer.Option(help="start from this scorer checkpoint (e.g. a pairwise run before grpo)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="agent hyperparameter KEY=VALUE (repeatable), e.g. --set lr=1e-3")] = [],  # noqa: B006
    env_opt: Annotated[list[str], typer.Option("--env-opt", help="training env option KEY=VALUE (repeatable), e.g. --env-opt max_tokens=256")] = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    workers: Annotated[int, typer.Option(help="with --recipe: make its traces and importance stores on N Ray workers (needs kvp-gym[ray]); 0 = serial")] = 0,
) -> None:
    """Train an eviction agent on a trace set and save it as a scorer checkpoint."""
    from agents.train import TrainConfig

    if recipe is not None:
        distilled = _run(lambda: _recipe_config(recipe, out, seed, progress, workers))
        finetune = _recipe_finetune_config(recipe, distilled)
        if finetune is not None:
            _run(lambda: finetune)
        return
    if agent is None or not traces or steps is None:
        typer.secho("error: give --agent, --traces and --steps, or a --recipe", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    config = TrainConfig(
        agent=agent, traces=[str(path) for path in traces], out=str(out), steps=steps, layer=layer, kv_head=kv_head,
        all_heads=all_heads, seed=seed, hidden=hidden, arch=arch, arch_options=_pairs(arch_opt, "--arch-opt", parse_json=True),
        init=None if init is None else str(init),
        val_traces=None if val_traces is None else str(val_traces), val_every=val_every, val_texts=val_texts,
        agent_options=_pairs(set_, "--set", parse_json=False), env_options=_pairs(env_opt, "--env-opt", parse_json=True),
        eval_traces=[str(path) for path in eval_traces] if eval_traces else None, eval_every=eval_every, save_every=save_every,
        progress=progress,
    )
    _run(lambda: config)


def _recipe_config(name: str, out: Path, seed: int, progress: bool, workers: int):
    from agents.recipes import get_recipe

    return get_recipe(name).config(str(out), seed=seed, progress=progress, workers=workers)


def _recipe_finetune_config(name: str, distilled):
    from agents.recipes import get_recipe

    return get_recipe(name).finetune_config(distilled)


def _run(make_config):
    """Train the config ``make_config()`` returns and return it; every input error is one line and rc 2."""
    from agents.train import train

    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors(TypeError):  # TypeError: an --env-opt the env does not take
        config = make_config()
        result = train(config)
    typer.echo(f"scorer: {result.scorer_path}")
    if result.evaluation:
        typer.echo("evaluation: " + ", ".join(f"{key} {value:.4f}" for key, value in result.evaluation.items()))
    if result.seconds:
        typer.echo(f"{result.env_steps} env steps in {result.seconds:.1f} s")
    return config


# `kvp-gym sweep`: a grid of training runs (agents x heads x seeds x rewards), on Ray workers with --workers
from agents.sweep import sweep_command  # noqa: E402  (light: agents.train is imported when it runs)

app.command("sweep")(sweep_command)
