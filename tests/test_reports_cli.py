"""`robusteval report` on the command line: outputs beside --out, formats, and clear errors."""

from __future__ import annotations

import json

from click.testing import CliRunner
from reports_fixtures import copy_run

from robusteval.cli import main


def test_report_writes_html_figures_and_tables_beside_the_output(tmp_path):
    runs = [copy_run(name, tmp_path / "runs") for name in ("gaussian-autoattack-Linf", "gaussian-certify-0.5")]
    out = tmp_path / "reports" / "leaderboard.html"
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(out), "--eps", "Linf=0.05",
                                       "--radii", "0.25,0.75"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} from 2 runs" in result.output
    page = out.read_text()
    assert "AutoAttack L∞ ε=0.05 (%)" in page and "certified r=0.75 (%)" in page
    assert "robusteval report" in page  # the command that regenerates it
    figures = sorted(p.name for p in (out.parent / "figures").iterdir())
    assert "robust_digits_Linf.svg" in figures and "certified_digits.png" in figures
    tables = sorted(p.name for p in (out.parent / "tables").iterdir())
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.tex", "certified.csv"} <= set(tables)


def test_report_robustbench_format_writes_model_info(tmp_path):
    run = copy_run("standard-autoattack-L2", tmp_path / "runs")
    result = CliRunner().invoke(main, ["report", str(run), "--format", "robustbench", "--out", str(tmp_path / "rb")])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "rb" / "model_info" / "digits" / "L2" / "standard.json").read_text())
    assert entry["autoattack_acc"] == "20.00" and entry["eps"] == "1"


def test_report_errors_exit_2_with_a_message(tmp_path):
    runner = CliRunner()
    run = copy_run("standard-autoattack-L2", tmp_path / "runs")
    result = runner.invoke(main, ["report", str(run), "--out", str(tmp_path / "x.html"), "--eps", "L3=0.3"])
    assert result.exit_code == 2 and "expected Linf=EPS or L2=EPS or L1=EPS" in result.output
    (run / "summary.json").unlink()
    result = runner.invoke(main, ["report", str(run), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "is not a finished run" in result.output
    result = runner.invoke(main, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
