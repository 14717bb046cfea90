"""Every code block of README.md and docs/*.md runs as written, so a documented call never breaks again.

- ```python blocks run in-process with $KVP_GYM_HOME set to a temporary directory whose default trace
  sets (the ones `gym.make("KVEvict-v0")` uses) are pre-made, tiny (4 x 96 tokens of a random 2-layer model).
- ```bash blocks of `kvp-gym` commands run through the CLI in-process, in a temporary working directory,
  after the substitutions in SMALLER (shown here, applied only to make them fast; every other argument
  is run as documented). The embedded SmolLM2 is linked into the temporary $KVP_GYM_HOME.
- LONG_JOBS (the 15-minute demo, the test suite itself, the full leaderboard, the training recipe) are not run: their shell
  syntax is checked with `bash -n`, the scripts they name must exist and compile, and `kvp-gym` command
  lines are parsed with the real CLI's argument parser (every option name and value type checked).
"""

from __future__ import annotations

import py_compile
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# documented argument -> what the test runs instead (sizes only)
SMALLER = {
    "--n 12": "--n 2",
    "--length 1024": "--length 384",  # RULER tasks need more than ~270 tokens
    "--steps 300": "--steps 2",
    '--prompt "Summarise the plot of Hamlet."': '--prompt "Summarise the plot of Hamlet." --max-new-tokens 4',
}
LONG_JOBS = ("examples/demo.py", "python -m pytest", "leaderboard --suite full", "train --recipe")


def code_blocks(kind: str) -> list[tuple[str, str]]:
    blocks = []
    for path in DOCS:
        for match in re.finditer(rf"```{kind}\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            blocks.append((path.name, match.group(1)))
    return blocks


def test_the_docs_have_blocks_to_check():
    assert len(code_blocks("python")) >= 1 and len(code_blocks("bash")) >= 3


@pytest.fixture
def tiny_home(tmp_path, monkeypatch, tiny_model_dir, smol_dir):
    from conftest import write_random_traces
    from kvp_gym.envs.default_traces import DEFAULT_SOURCES, TRACES_PER_SOURCE, default_trace_dir
    from kvp_gym.models.loading import DEFAULT_MODEL, converted_dir

    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path / "home"))
    for source in DEFAULT_SOURCES:
        write_random_traces(default_trace_dir(source), tiny_model_dir, n=TRACES_PER_SOURCE, length=96, seed=1)
    converted_dir(DEFAULT_MODEL).parent.mkdir(parents=True, exist_ok=True)
    converted_dir(DEFAULT_MODEL).symlink_to(smol_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("where, code", code_blocks("python"), ids=lambda value: value if value.endswith(".md") else "")
def test_python_blocks_run_as_written(tiny_home, where, code):
    exec(compile(code, f"<{where}>", "exec"), {"__name__": "__docs__"})


def _parse_only(args: list[str]) -> None:
    """Parse a kvp-gym command line with the real CLI (option names, types, required options), run nothing."""
    from kvp_gym.cli import app

    group = typer.main.get_command(app)
    context = group.make_context("kvp-gym", list(args))
    name, command, rest = group.resolve_command(context, list(args))
    command.make_context(name, rest, parent=context)


@pytest.mark.parametrize("where, code", code_blocks("bash"), ids=lambda value: value if value.endswith(".md") else "")
def test_shell_blocks_run_as_written(tiny_home, where, code):
    from kvp_gym.cli import app

    assert subprocess.run(["bash", "-n"], input=code, text=True).returncode == 0, code
    for line in code.strip().splitlines():
        for script in re.findall(r"(?:\./|examples/)[\w./-]+", line):
            assert (ROOT / script.lstrip("./")).exists(), script
            if script.endswith(".py"):
                py_compile.compile(str(ROOT / script), doraise=True)
        if not line.startswith("kvp-gym "):
            assert any(job in line for job in LONG_JOBS) or line.startswith("./setup.sh"), f"unchecked line: {line}"
            continue
        if any(job in line for job in LONG_JOBS):
            _parse_only(shlex.split(line)[1:])
            continue
        for documented, smaller in SMALLER.items():
            line = line.replace(documented, smaller)
        result = CliRunner().invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception!r}"


@pytest.mark.parametrize("folder", ["benchmarks", "examples"])
def test_scripts_of_a_folder_can_load_the_model_stack(folder):
    """``python <folder>/x.py`` puts <folder> first on sys.path, so a script named like a module that transformers
    probes for (``kernels.py`` did) breaks every script of that folder at its first import."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / folder)!r}); import transformers.modeling_utils, kvp_gym.models"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
