"""``kvp-gym generate``: stream text from a model whose KV cache evicts with a policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from kvp_gym.ranking import DEFAULT_PROTECTED, Protected

app = typer.Typer(help="Generate text with an evicting KV cache.")


@app.command()
def generate(
    policy: str = typer.Option(
        ..., "--policy", help="A registered scorer name (see kvp_gym.scorers) or a scorer checkpoint (file or run dir)."
    ),
    budget: int = typer.Option(..., "--budget", min=1, help="KV entries kept per layer and KV head."),
    every: int | None = typer.Option(
        None, "--every", min=1, help="Re-compress every L decoding steps (streaming). Default: once, after the prompt."
    ),
    model: str = typer.Option("smollm2-135m", "--model", help="Model name or local checkpoint directory."),
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt text."),
    file: Path | None = typer.Option(None, "--file", exists=True, dir_okay=False, help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    sink: int | None = typer.Option(None, "--sink", min=0, help="Always-kept first tokens (default: the checkpoint's, else 4)."),
    recent: int | None = typer.Option(None, "--recent", min=0, help="Always-kept last tokens (default: the checkpoint's, else 16)."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
) -> None:
    """Stream the model's answer to a prompt with a compressed KV cache, then print the memory saved."""
    import torch
    from transformers import TextStreamer

    from kvp_gym.cache import EvictingCache
    from kvp_gym.models import load_model

    from kvp_gym.traces.cli import one_line_errors

    with one_line_errors():  # every check before the first token: one line on stderr, exit code 2
        text = _read_prompt(prompt, file)
        if Path(policy).expanduser().exists():
            from kvp_gym.checkpoint import read_header

            read_header(policy)  # a corrupt checkpoint fails before the model loads
        language_model, tokenizer = load_model(model)
        scorer, protected = _resolve_policy(policy, language_model, model)
        sink = protected.sink if sink is None else sink
        recent = protected.recent if recent is None else recent
        try:
            cache = EvictingCache(scorer, budget, config=language_model.config, sink=sink, recent=recent, every=every)
        except ValueError as error:
            raise ValueError(f"--budget / --sink / --recent: {error}") from None
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    torch.manual_seed(seed)
    with torch.inference_mode():
        language_model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    typer.echo(f"\n{cache.report()}", err=True)


def _read_prompt(prompt: str | None, file: Path | None) -> str:
    if (prompt is None) == (file is None):
        raise ValueError("give exactly one of --prompt TEXT or --file PATH")
    text = prompt if prompt is not None else file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError("--prompt / --file: the prompt is empty")
    return text


def _resolve_policy(policy: str, language_model: Any, model_name: str) -> tuple[Any, Protected]:
    """A registered scorer by name, or a checkpoint checked against the model; and its protected tokens."""
    from kvp_gym import scorers
    from kvp_gym.checkpoint import load_scorer, read_header
    from kvp_gym.models import ModelSpec

    if not Path(policy).expanduser().exists():
        try:
            return scorers.get(policy), DEFAULT_PROTECTED
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"--policy: {error.args[0] if error.args else error} (or give the path of a scorer checkpoint)"
            ) from None
    spec = ModelSpec.from_config(language_model.config, model_name)
    try:
        scorer = load_scorer(policy, expect_spec=spec)
        protected = Protected.from_dict(read_header(policy).protected)
    except ValueError as error:  # kvp_gym.checkpoint.CheckpointError, or a checkpoint made for another model
        raise ValueError(f"--policy: {error}") from None
    check_every_head(scorer, spec, policy)
    return scorer, protected


def check_every_head(scorer: Any, spec: Any, policy: str) -> None:
    """A scorer with per-head agents (``heads``: [(layer, kv_head)], None = all) must cover every head of the model."""
    heads = getattr(scorer, "heads", None)
    if heads is None:
        return
    every = [(layer, head) for layer in range(spec.num_layers) for head in range(spec.num_kv_heads)]
    missing = [pair for pair in every if pair not in {tuple(h) for h in heads}]
    if missing:
        raise ValueError(
            f"--policy {policy}: the checkpoint has agents for {len(every) - len(missing)} of the model's {len(every)} "
            f"(layer, KV head) pairs, missing {missing[0]}{' and more' if len(missing) > 1 else ''}; a cache needs every "
            f"head: train it with --all-heads"
        )


if __name__ == "__main__":
    app()
