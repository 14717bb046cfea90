"""`kvp-gym compare` (agents/compare.py): sample-efficiency curves over seeds on tiny traces."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from kvp_gym.cli import app


def test_compare_writes_curves_table_and_plot(tiny_traces, tmp_path):
    directory = str(tiny_traces.directory)
    out = tmp_path / "cmp"
    args = ["compare", "--agents", "kvp,pairwise", "--seeds", "2", "--steps", "2", "--heads", "1:0",
            "--traces", directory, "--eval-traces", directory, "--eval-every", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {"compare.png", "compare.md", "compare.csv"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {row["agent"] for row in rows} == {"kvp", "pairwise"}
    assert {row["step"] for row in rows} == {"0", "1", "2"} and all(row["seeds"] == "2" for row in rows)
    for row in rows:
        assert float(row["low"]) <= float(row["iqm_cost_ratio"]) <= float(row["high"])
    table = (out / "compare.md").read_text()
    assert "IQM cost ratio" in table
    first = (out / "compare.csv").read_text()
    again = CliRunner().invoke(app, args)  # a rerun reuses every finished run's curve (same numbers, same times)
    assert again.exit_code == 0 and (out / "compare.csv").read_text() == first


def test_compare_refuses_unknown_agents(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--agents", "nope", "--traces", str(tmp_path), "--eval-traces", str(tmp_path)])
    assert result.exit_code == 2
