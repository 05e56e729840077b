"""The leaderboard's worst-of-N column (issue 27): a randomized pipeline is ranked by its majority vote in the
best-known column and by worst-of-N in its own sortable column beside it, in HTML and the Markdown tables."""

from __future__ import annotations

import re

import pytest
from reports_fixtures import copy_run

from robusteval.reports.loading import load_runs
from robusteval.reports.report import write_report
from robusteval.reports.tables import leaderboard

MAJORITY, WORST = 0.9, 0.05  # at the headline ε = 0.1: near the top by majority vote, at the bottom worst-of-N


def _randomized(summary):
    summary["defense"] = "noise:0.25"
    for point in summary["curve"]:
        point["worst_of_n_robust_accuracy"] = WORST
    summary["curve"][1].update(robust_accuracy=MAJORITY, ci_low=0.76, ci_high=0.97)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("worst") / "runs"
    copy_run("standard-autoattack-Linf", root)
    copy_run("gaussian-autoattack-Linf", root)
    copy_run("gaussian-autoattack-Linf", root, _randomized, new_name="gaussian-noise")
    return root


def test_worst_of_n_has_its_own_column_beside_the_majority_vote(runs_dir):
    board, columns = leaderboard(load_runs([runs_dir]))
    keys = [c.key for c in columns]
    assert keys[:4] == ["clean", "autoattack_Linf", "best_Linf", "worst_of_n_Linf"]
    noisy = board[board["system"] == "gaussian + noise:0.25"].iloc[0]
    assert (noisy["best_Linf"], noisy["worst_of_n_Linf"]) == (MAJORITY, WORST)
    assert board.iloc[0]["system"] == "gaussian + noise:0.25"  # ranked first by its majority vote ...
    for _, row in board[board["system"] != "gaussian + noise:0.25"].iterrows():
        assert row["worst_of_n_Linf"] == row["best_Linf"]  # ... a deterministic system's one draw is its decision
    assert noisy["worst_of_n_Linf"] < board["worst_of_n_Linf"].drop(noisy.name).min()  # ... last by worst-of-N


def test_the_html_column_is_sortable_and_the_markdown_table_has_it(runs_dir, tmp_path):
    out = tmp_path / "reports" / "leaderboard.html"
    write_report(load_runs([runs_dir]), out)
    page = out.read_text(encoding="utf-8")
    table = re.search(r'<table class="sortable leaderboard".*?</table>', page, re.S).group(0)
    headers = re.findall(r'<th scope="col"[^>]*data-type="(\w+)"[^>]*><button type="button">([^<]*)</button>', table)
    titles = [title for _, title in headers]
    worst = titles.index("worst-of-N L∞ ε=0.1 (%)")
    assert titles[worst - 1] == "best-known L∞ ε=0.1 (%)" and headers[worst][0] == "number"
    noisy = re.search(r'data-system="gaussian \+ noise:0.25">(.*?)</tr>', table, re.S).group(1)
    cells = re.findall(r'<td class="num" data-sort="([^"]*)">([^<]*)</td>', noisy)
    assert cells[worst - 1] == (repr(WORST), "5.0") and cells[worst - 2] == (repr(MAJORITY), "90.0")

    lines = (out.parent / "tables" / "leaderboard.md").read_text().splitlines()
    header = [cell.strip() for cell in next(line for line in lines if "system" in line).split("|")]
    row = [cell.strip() for cell in next(line for line in lines if "noise:0.25" in line).split("|")]
    worst = header.index("worst-of-N L∞ ε=0.1 (%)")
    assert header[worst - 1] == "best-known L∞ ε=0.1 (%)"
    assert (row[worst - 1], row[worst]) == ("90.0", "5.0")
