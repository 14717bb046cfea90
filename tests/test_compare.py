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
        assert float(row["cost_ratio_low"]) <= float(row["iqm_cost_ratio"]) <= float(row["cost_ratio_high"])
    table = (out / "compare.md").read_text()
    assert "IQM cost ratio" in table
    first = (out / "compare.csv").read_text()
    again = CliRunner().invoke(app, args)  # a rerun reuses every finished run's curve (same numbers, same times)
    assert again.exit_code == 0 and (out / "compare.csv").read_text() == first


def test_compare_refuses_unknown_agents(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--agents", "nope", "--traces", str(tmp_path), "--eval-traces", str(tmp_path)])
    assert result.exit_code == 2


def test_compare_with_all_heads_adds_downstream_perplexity(tiny_traces, tmp_path):
    """--heads all trains one policy for every head, and --val-traces adds its downstream perplexity ratio (the
    real tiny model and cache) at every evaluation, as a second metric of the table and the plot."""
    directory = str(tiny_traces.directory)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "compare", "--agents", "kvp", "--seeds", "2", "--steps", "2", "--heads", "all", "--traces", directory,
        "--eval-traces", directory, "--eval-every", "1", "--val-traces", directory, "--val-texts", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {row["step"] for row in rows} == {"0", "1", "2"}
    for row in rows:
        assert float(row["ppl_ratio_low"]) <= float(row["iqm_ppl_ratio"]) <= float(row["ppl_ratio_high"])
        assert float(row["iqm_ppl_ratio"]) > 0.5
    assert "IQM ppl ratio" in (out / "compare.md").read_text()
    assert (out / "runs" / "kvp" / "seed1" / "all" / "curve.json").exists()


def test_compare_refuses_downstream_perplexity_for_some_heads_only(tiny_traces, tmp_path):
    directory = str(tiny_traces.directory)
    result = CliRunner().invoke(app, ["compare", "--agents", "kvp", "--heads", "1:0", "--traces", directory,
                                      "--eval-traces", directory, "--val-traces", directory, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--heads all" in result.output
