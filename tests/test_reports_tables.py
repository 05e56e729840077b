"""Loading runs and the report tables, checked against the fixture runs' own numbers."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
from reports_fixtures import FIXTURE_RUNS, copy_run, fixture_summary

from robusteval.reports.loading import RunFormatError, load_run, load_runs
from robusteval.reports.tables import (
    adversarial_display,
    adversarial_table,
    certified_display,
    certified_table,
    headline_eps,
    latex_escape,
    leaderboard,
    write_tables,
)


@pytest.fixture(scope="module")
def runs():
    return load_runs([FIXTURE_RUNS])


# --- loading ------------------------------------------------------------------------------
def test_load_runs_expands_a_folder_of_runs(runs):
    assert len(runs) == len([p for p in FIXTURE_RUNS.iterdir() if p.is_dir()])
    assert {r.kind for r in runs} == {"attack", "certify", "denoise"}
    # Given twice (folder and one of its runs): loaded once.
    again = load_runs([FIXTURE_RUNS, FIXTURE_RUNS / "gaussian-certify-0.25"])
    assert len(again) == len(runs)


def test_unfinished_run_is_a_clear_error(tmp_path):
    run = copy_run("gaussian-certify-0.25", tmp_path)
    (run / "summary.json").unlink()
    with pytest.raises(RunFormatError, match="not a finished run: summary.json is missing.*resume"):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFormatError, match="neither a run directory nor a folder of run directories"):
        load_runs([tmp_path / "empty"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(kind="train"), "kind 'train'"),
        (lambda s: s.pop("curve"), "lacks curve"),
        (lambda s: s.update(norm="L3"), "norm must be one of"),
        (lambda s: s.update(clean_accuracy=97.5), r"clean_accuracy must be a fraction in \[0, 1\]"),
        (lambda s: s.update(n=0), "n must be a positive integer"),
        (lambda s: s["curve"][0].update(ci_low=0.9, ci_high=0.95), "outside its interval"),
        (lambda s: s["curve"][1].pop("eps"), r"curve\[1\] must be an object with eps"),
    ],
)
def test_summary_contract_violations_are_named(tmp_path, edit, message):
    run = copy_run("standard-autoattack-Linf", tmp_path, edit)
    with pytest.raises(RunFormatError, match=message):
        load_run(run)


def test_certified_accuracy_beyond_the_grid_is_zero_and_off_grid_comes_from_records(runs):
    run = next(r for r in runs if r.path.name == "gaussian-certify-0.5")
    grid = {p["radius"]: p["accuracy"] for p in run.summary["certified_accuracy"]}
    assert run.certified_accuracy_at(0.75) == grid[0.75]
    assert run.certified_accuracy_at(5.0) == 0.0
    # Off the grid: counted from the per-image radii, and between its grid neighbours (monotone).
    counted = run.certified_accuracy_at(0.6)
    expected = sum(1 for r in run.records if r["correct"] and r["radius"] >= 0.6) / run.summary["n_images"]
    assert counted == expected
    assert grid[0.75] <= counted <= grid[0.5]


# --- certified-radius table ---------------------------------------------------------------
def test_certified_table_rows_equal_the_runs_figures(runs):
    table = certified_table(runs)
    values = table.values
    assert table.radii == (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # digits: also 1.5 and 2.0
    for name in ("gaussian-certify-0.25", "gaussian-certify-0.5", "toy-joint-certify-0.25",
                 "toy-joint-certify-denoised-0.25"):
        summary = fixture_summary(name)
        row = values[(values["model"] == summary["model"]) & (values["mode"] == summary["mode"])
                     & (values["sigma"] == summary["sigma"])]
        assert len(row) == 1
        grid = {p["radius"]: p["accuracy"] for p in summary["certified_accuracy"]}
        for radius in table.radii:
            assert row.iloc[0][radius] == grid.get(radius, 0.0), (name, radius)
        assert row.iloc[0]["acr"] == summary["acr"]


def test_best_sigma_row_takes_the_best_noise_level_per_radius(runs):
    table = certified_table(runs)
    values = table.values
    best = values[(values["model"] == "gaussian") & (values["row"] == "best σ")]
    assert len(best) == 1
    index = best.index[0]
    low, high = fixture_summary("gaussian-certify-0.25"), fixture_summary("gaussian-certify-0.5")
    low_grid = {p["radius"]: p["accuracy"] for p in low["certified_accuracy"]}
    high_grid = {p["radius"]: p["accuracy"] for p in high["certified_accuracy"]}
    for radius in table.radii:
        expected = max(low_grid.get(radius, 0.0), high_grid.get(radius, 0.0))
        assert best.iloc[0][radius] == expected
    # The fixture's known answers: σ = 0.25 wins at r = 0 (95%), σ = 0.5 from r = 0.25 on (67.5%).
    assert (best.iloc[0][0.0], table.best_sigma.loc[index, 0.0]) == (0.95, 0.25)
    assert (best.iloc[0][0.25], table.best_sigma.loc[index, 0.25]) == (0.675, 0.5)
    assert best.iloc[0]["acr"] == max(low["acr"], high["acr"])
    # A model with one σ per mode has no "best σ" row (it would repeat that σ).
    assert not ((values["model"] == "toy-joint") & (values["row"] == "best σ")).any()
    shown = certified_display(table)
    shown_best = shown[(shown["model"] == "gaussian") & (shown["σ"] == "best σ")].iloc[0]
    assert shown_best["r = 0.25"] == "67.5 (σ=0.5)"
    assert shown_best["r = 0"] == "95.0 (σ=0.25)"


def test_certified_files_in_markdown_csv_and_latex(runs, tmp_path):
    tables = write_tables(runs, tmp_path)
    csv = pd.read_csv(io.StringIO((tmp_path / "certified.csv").read_text()))
    summary = fixture_summary("gaussian-certify-0.5")
    row = csv[(csv["model"] == "gaussian") & (csv["sigma"] == 0.5)].iloc[0]
    for point in summary["certified_accuracy"]:
        label = f"r={point['radius']:.6g}"
        assert row[label] == pytest.approx(point["accuracy"], abs=1e-12)
    assert row["acr"] == pytest.approx(summary["acr"], abs=1e-12)
    markdown = (tmp_path / "certified.md").read_text()
    assert "| gaussian" in markdown and "67.5 (σ=0.5)" in markdown
    latex = (tmp_path / "certified.tex").read_text()
    assert "\\toprule" in latex and "67.5 ($\\sigma$=0.5)" in latex and "σ" not in latex
    assert set(tables.files) >= {"certified.md", "certified.csv", "certified.tex", "adversarial.md",
                                 "adversarial.csv", "adversarial.tex", "leaderboard.md", "leaderboard.csv",
                                 "leaderboard.tex"}


# --- adversarial table --------------------------------------------------------------------
def test_adversarial_table_holds_every_curve_point_with_its_interval(runs):
    long = adversarial_table(runs)
    for name in ("standard-autoattack-Linf", "standard-pgd-Linf", "gaussian-autoattack-L2"):
        summary = fixture_summary(name)
        part = long[(long["model"] == summary["model"]) & (long["attack"] == summary["attack"])
                    & (long["norm"] == summary["norm"])]
        assert len(part) == len(summary["curve"])
        for point in summary["curve"]:
            row = part[part["eps"] == point["eps"]].iloc[0]
            assert (row["robust_accuracy"], row["ci_low"], row["ci_high"]) == (
                point["robust_accuracy"], point["ci_low"], point["ci_high"])
            assert row["clean_accuracy"] == summary["clean_accuracy"]
            assert json.loads(row["broken_by"]) == point["broken_by"]
    flagged = long[long["model"] == "toy-joint"]
    assert flagged[flagged["defense"] == "none"]["unreliable"].all()
    assert not flagged[flagged["defense"] == "denoise:0.25"]["unreliable"].any()


def test_adversarial_display_formats_intervals_and_marks_unreliable_rows(runs):
    wide = adversarial_display(adversarial_table(runs), "digits", "Linf")
    point = fixture_summary("standard-autoattack-Linf")["curve"][1]  # ε = 0.1
    row = wide[(wide["system"] == "standard") & (wide["attack"] == "autoattack")].iloc[0]
    assert row["ε = 0.1"] == (f"{100 * point['robust_accuracy']:.1f} [{100 * point['ci_low']:.1f}, "
                              f"{100 * point['ci_high']:.1f}]")
    assert row["clean"] == "97.5"
    assert "toy-joint †" in set(wide["system"])
    assert "toy-joint + denoise:0.25" in set(wide["system"])  # no flags: no mark
    denoise = wide[wide["system"] == "toy-joint + denoise:0.25"].iloc[0]
    assert denoise["attack"] == "pgd (bpda gradient)"


# --- leaderboard --------------------------------------------------------------------------
def test_headline_eps_defaults_and_overrides(runs):
    assert headline_eps("digits", "Linf", runs) == 0.1
    assert headline_eps("digits", "L2", runs) == 1.0
    assert headline_eps("digits", "Linf", runs, {"Linf": 0.05}) == 0.05
    assert headline_eps("mnist", "Linf", runs) is None


def test_leaderboard_autoattack_best_known_certified_and_flags(runs):
    board, columns = leaderboard(runs, eps_overrides={"Linf": 0.05})
    keys = [c.key for c in columns]
    assert keys == ["clean", "autoattack_Linf", "best_Linf", "autoattack_L2", "best_L2", "certified_0.5",
                    "certified_1"]
    standard = board[board["system"] == "standard"].iloc[0]
    aa = fixture_summary("standard-autoattack-Linf")["curve"][0]["robust_accuracy"]
    pgd = fixture_summary("standard-pgd-Linf")["curve"][0]["robust_accuracy"]
    assert pgd < aa  # the fixture's PGD run found more adversarial examples at ε = 0.05
    assert standard["autoattack_Linf"] == aa
    assert standard["best_Linf"] == pgd
    assert standard["clean"] == fixture_summary("standard-autoattack-Linf")["clean_accuracy"]
    gaussian = board[board["system"] == "gaussian"].iloc[0]
    assert gaussian["certified_0.5"] == 0.45  # σ = 0.5 at r = 0.5
    assert gaussian["certified_1"] == 0.05
    assert gaussian["autoattack_L2"] == fixture_summary("gaussian-autoattack-L2")["curve"][2]["robust_accuracy"]
    joint = board[board["system"] == "toy-joint"].iloc[0]
    assert joint["unreliable"] and "gradient masking" in joint["flags"]
    defended = board[board["system"] == "toy-joint + denoise:0.25"].iloc[0]
    assert math.isnan(defended["autoattack_Linf"])  # only PGD was run behind the defense
    assert defended["best_Linf"] == fixture_summary("toy-joint-pgd-denoise-Linf")["curve"][0]["robust_accuracy"]
    # Sorted by best-known L∞ robust accuracy, most robust first.
    best = board["best_Linf"].tolist()
    assert best == sorted(best, reverse=True)


def test_latex_escape_handles_user_strings():
    assert latex_escape("a_b & 50% {x} #1 $") == r"a\_b \& 50\% \{x\} \#1 \$"
    assert latex_escape("σ = 0.25, L∞") == r"$\sigma$ = 0.25, L$\infty$"


def test_adversarial_display_shows_the_attack_s_own_figure_and_worst_of_n_where_they_differ():
    import pandas as pd

    base = {"dataset": "digits", "norm": "Linf", "model": "m", "defense": "none", "system": "m",
            "attack": "autoattack", "n": 40, "clean_accuracy": 1.0, "ci_low": 0.1, "ci_high": 0.5, "broken_by": "{}",
            "unreliable": False, "flags": ""}
    long = pd.DataFrame([
        {**base, "eps": 0.1, "robust_accuracy": 0.25, "standard_robust_accuracy": 0.5,
         "worst_of_n_robust_accuracy": 0.2},
        {**base, "eps": 0.2, "robust_accuracy": 0.25, "standard_robust_accuracy": 0.25,
         "worst_of_n_robust_accuracy": float("nan")},
    ])
    row = adversarial_display(long, "digits", "Linf").iloc[0]
    assert row["ε = 0.1"] == "25.0 [10.0, 50.0]; autoattack alone 50.0; worst-of-N 20.0"
    assert row["ε = 0.2"] == "25.0 [10.0, 50.0]"


def test_a_check_an_adaptive_stage_cleared_is_shown_with_its_note(tmp_path):
    message = ("35 of 40 correctly classified points (87.5%) have a zero input gradient; cause: softmax saturation; "
               "cleared: the scale-invariant remedies remedy:apgd-dlr attacked every point the attack left standing")

    def cleared(summary):
        summary["checks"] = [*summary.get("checks", []), {"check": "zero-gradients", "status": "pass",
                                                           "message": message}]
        summary["flags"] = []

    run = load_run(copy_run("standard-autoattack-Linf", tmp_path, cleared))
    assert run.cleared == [f"zero-gradients: {message}"] and run.flags == []
    row = adversarial_display(adversarial_table([run]), "digits", "Linf").iloc[0]
    assert row["system"] == "standard"  # cleared, so not marked
    assert row["flags"] == f"cleared, zero-gradients: {message}"


def test_an_l1_run_gets_its_own_columns_headline_and_figure(tmp_path):
    """An L1 AutoAttack run (the L2 fixture with its budgets ×4) is reported beside L∞ and L2, at the data set's
    L1 headline ε, with its own curve panel."""
    from robusteval.reports.figures import iter_figures
    from robusteval.reports.styles import model_identities

    def to_l1(summary):
        summary["norm"] = "L1"
        for point in summary["curve"]:
            point["eps"] *= 4

    run = copy_run("standard-autoattack-L2", tmp_path, edit=to_l1, new_name="standard-autoattack-L1")
    config = json.loads((run / "config.json").read_text())
    config.update(norm="L1", eps=[4 * e for e in config["eps"]])
    (run / "config.json").write_text(json.dumps(config))
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()]
    for record in records:  # the records name the run's ε: the budgets ×4 as well
        for outcome in record["eps"]:  # the fixture's older record layout
            outcome["eps"] *= 4
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = load_runs([FIXTURE_RUNS, run])
    assert headline_eps("digits", "L1", runs) == 4.0
    board, columns = leaderboard(runs)
    keys = [c.key for c in columns]
    assert keys[keys.index("best_L2") + 1:keys.index("best_L2") + 3] == ["autoattack_L1", "best_L1"]
    standard = board[board["system"] == "standard"].iloc[0]
    assert standard["autoattack_L1"] == fixture_summary("standard-autoattack-L2")["curve"][2]["robust_accuracy"]
    l1_runs = [r for r in runs if r.kind == "attack" and r.summary["norm"] == "L1"]
    drawn = {d.name: d.title for d in iter_figures(l1_runs, model_identities(r.model for r in l1_runs))}
    assert drawn["robust_digits_L1"] == "Robust accuracy vs ε (digits, L1)"
    assert "model_standard_robust_digits_L1" in drawn
