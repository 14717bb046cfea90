"""The `kvp-gym` command. Sub-commands come from kvp_gym itself and from the `kvp_gym.commands`
entry-point group (agents/ and other plug-ins add theirs there, so kvp_gym never imports them)."""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from kvp_gym.cache.cli import app as generate_app
from kvp_gym.eval.cli import app as leaderboard_app
from kvp_gym.traces.cli import app as traces_app

app = typer.Typer(help="kvp-gym: learned KV-cache eviction as an RL benchmark.", no_args_is_help=True)
app.add_typer(traces_app, name="traces")
app.add_typer(generate_app)
app.add_typer(leaderboard_app)

for _entry in entry_points(group="kvp_gym.commands"):
    _command = _entry.load()
    if isinstance(_command, typer.Typer):
        app.add_typer(_command)
    else:
        app.command(_entry.name)(_command)
