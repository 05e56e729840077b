"""The regression gate's decisions on constructed cases, through the library and the command line."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
from click.testing import CliRunner
from reports_fixtures import copy_all, copy_run
from scipy.stats import fisher_exact

from robusteval.cli import main
from robusteval.reports.loading import load_runs
from robusteval.reports.regression import (
    BASELINE_FORMAT,
    BaselineError,
    Count,
    compare,
    entries_from_runs,
    load_baseline,
    p_value_lower,
    write_baseline,
)

CERTIFY = "gaussian-certify-0.5"
ATTACK = "standard-autoattack-L2"


def _set_robust(summary, eps, accuracy):
    for point in summary["curve"]:
        if point["eps"] == eps:
            point["robust_accuracy"] = accuracy
            point["ci_low"] = min(point["ci_low"], accuracy)
            point["ci_high"] = max(point["ci_high"], accuracy)


@pytest.fixture()
def baseline(tmp_path):
    """A baseline from two fixture runs with n = 40 (clean 39/40, robust 25/40 at L2 ε = 0.25)."""
    base_dir = tmp_path / "base"
    runs = load_runs([copy_run(ATTACK, base_dir), copy_run(CERTIFY, base_dir)])
    path = tmp_path / "baseline.json"
    write_baseline(runs, path)
    return path


def _check(tmp_path, baseline, edit=None, name=ATTACK, alpha=0.05, extra=()):
    current = tmp_path / "current"
    paths = [copy_run(name, current, edit), *[copy_run(e, current) for e in extra]]
    if name != CERTIFY and CERTIFY not in extra:
        paths.append(copy_run(CERTIFY, current))
    if name == CERTIFY:
        paths.append(copy_run(ATTACK, current))
    return compare(entries_from_runs(load_runs(paths)), load_baseline(baseline), alpha=alpha)


def test_p_value_is_fishers_one_sided_exact_test():
    # By hand: given the 50 successes of both runs, the current run's count is hypergeometric (80 points, 40 of
    # them current); the one-sided p-value is P(at most 20 of the 50 successes fall in the current run).
    by_hand = sum(Fraction(math.comb(50, k) * math.comb(30, 40 - k), math.comb(80, 40)) for k in range(21))
    assert p_value_lower(Count(20, 40), Count(30, 40)) == pytest.approx(float(by_hand), rel=1e-12)
    assert p_value_lower(Count(20, 40), Count(30, 40)) == pytest.approx(
        fisher_exact([[20, 20], [30, 10]], alternative="less").pvalue, rel=1e-12)
    # A single point: 0 of 1 now against 1 of 1 before has p = 1/2 (the success is in either run equally likely).
    assert p_value_lower(Count(0, 1), Count(1, 1)) == pytest.approx(0.5, rel=1e-12)
    # No evidence of a drop when the accuracy rose, and defined at 0% and 100%.
    assert p_value_lower(Count(35, 40), Count(30, 40)) > 0.5
    assert p_value_lower(Count(40, 40), Count(40, 40)) == 1.0
    assert p_value_lower(Count(0, 40), Count(0, 40)) == 1.0


def test_identical_runs_pass(tmp_path, baseline):
    result = _check(tmp_path, baseline)
    assert result.exit_code == 0 and not result.errors and not result.regressions
    assert result.entries == 2
    assert result.compared == 6 + len(json.loads(baseline.read_text())["entries"][
        "certify/digits/gaussian/direct/sigma=0.5"]["figures"])


def test_a_real_drop_fails_and_names_both_figures_and_the_p_value(tmp_path, baseline):
    # Robust accuracy at ε = 0.25: 25/40 in the baseline, 10/40 now.
    result = _check(tmp_path, baseline, lambda s: _set_robust(s, 0.25, 10 / 40))
    assert result.exit_code == 1
    (regression,) = result.regressions
    assert regression.figure == "robust_accuracy@eps=0.25"
    assert (regression.baseline, regression.current) == (Count(25, 40), Count(10, 40))
    assert regression.p_value == pytest.approx(p_value_lower(Count(10, 40), Count(25, 40)))
    assert regression.p_value < 0.01


def test_the_gate_compares_the_attack_s_own_figure_with_an_old_baseline(tmp_path, baseline):
    # The baseline (a summary without standard_robust_accuracy) holds AutoAttack's own 25/40 at ε = 0.25.
    def remedied(summary):  # the engine's remedies broke 15 more points; AutoAttack's own figure is unchanged
        for point in summary["curve"]:
            point["standard_robust_accuracy"] = point["robust_accuracy"]
        _set_robust(summary, 0.25, 10 / 40)

    assert _check(tmp_path, baseline, remedied).exit_code == 0

    def own_dropped(summary):
        remedied(summary)
        next(p for p in summary["curve"] if p["eps"] == 0.25)["standard_robust_accuracy"] = 10 / 40

    result = _check(tmp_path / "dropped", baseline, own_dropped)
    assert result.exit_code == 1 and result.regressions[0].current == Count(10, 40)


def test_a_drop_within_noise_passes(tmp_path, baseline):
    # 25/40 → 22/40: p ≈ 0.25, well within sampling noise of 40 points.
    result = _check(tmp_path, baseline, lambda s: _set_robust(s, 0.25, 22 / 40))
    assert result.exit_code == 0 and not result.regressions
    # The same drop is significant at a level above its p-value (the threshold is honoured).
    p = p_value_lower(Count(22, 40), Count(25, 40))
    assert 0.05 < p < 0.5
    assert _check(tmp_path / "again", baseline, lambda s: _set_robust(s, 0.25, 22 / 40), alpha=0.5).exit_code == 1


def test_a_certificate_that_shrank_fails(tmp_path, baseline):
    def shrink(summary):
        # Nothing certified beyond r = 0.5 any more: the grid stops earlier (which counts as 0 beyond it).
        summary["certified_accuracy"] = [p for p in summary["certified_accuracy"] if p["radius"] <= 0.5]
        summary["certified_accuracy"][-1]["accuracy"] = 0.1

    result = _check(tmp_path, baseline, shrink, name=CERTIFY)
    assert result.exit_code == 1
    figures = {r.figure: r for r in result.regressions}
    assert figures["certified_accuracy@r=0.5"].current == Count(4, 40)
    assert figures["certified_accuracy@r=0.75"].current == Count(0, 40)  # 7/40 before


@pytest.mark.parametrize(
    ("edit", "name", "message"),
    [
        (lambda s: s.update(n=80, clean_accuracy=78 / 80, curve=[
            {**p, "robust_accuracy": round(p["robust_accuracy"] * 80) / 80} for p in s["curve"]]),
         ATTACK, "n 40 → 80"),
        (lambda s: s["curve"].pop(), ATTACK, "eps"),
        (lambda s: s.update(n=2000), CERTIFY, "n 1000 → 2000"),
        (lambda s: s.update(n0=50), CERTIFY, "n0 100 → 50"),
        (lambda s: s.update(sigma=0.4), CERTIFY, "sigma 0.5 → 0.4"),
    ],
)
def test_a_changed_configuration_is_an_error(tmp_path, baseline, edit, name, message):
    result = _check(tmp_path, baseline, edit, name=name)
    assert result.exit_code == 2
    assert any("configuration changed" in e and message in e for e in result.errors), result.errors


def test_missing_entries_are_errors_both_ways(tmp_path, baseline):
    only_attack = load_runs([copy_run(ATTACK, tmp_path / "one")])
    result = compare(entries_from_runs(only_attack), load_baseline(baseline))
    assert result.exit_code == 2
    assert any("certify/digits/gaussian/direct/sigma=0.5: in the baseline but no run" in e for e in result.errors)
    result = _check(tmp_path, baseline, extra=("gaussian-autoattack-Linf",))
    assert result.exit_code == 2
    assert any("attack/digits/gaussian/Linf/autoattack/none: no baseline entry" in e for e in result.errors)


def test_two_runs_for_one_entry_are_refused(tmp_path):
    runs = load_runs([copy_run(ATTACK, tmp_path), copy_run(ATTACK, tmp_path, new_name="copy")])
    with pytest.raises(ValueError, match="two runs for the same entry"):
        entries_from_runs(runs)


def test_baseline_format_is_checked(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"format": "something-else", "entries": {}}))
    with pytest.raises(BaselineError, match=BASELINE_FORMAT):
        load_baseline(path)
    path.write_text("{not json")
    with pytest.raises(BaselineError, match="not valid JSON"):
        load_baseline(path)
    with pytest.raises(FileNotFoundError, match="--update"):
        load_baseline(tmp_path / "absent.json")


# --- command line -------------------------------------------------------------------------
def test_cli_update_then_check_passes_and_a_drop_exits_1(tmp_path):
    runs_dir = tmp_path / "runs"
    copy_all(runs_dir)
    baseline = tmp_path / "reports" / "baseline.json"
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline), "--update"])
    assert result.exit_code == 0, result.output
    stored = json.loads(baseline.read_text())
    assert stored["format"] == BASELINE_FORMAT
    assert len(stored["entries"]) == 11  # 7 attack + 4 certify runs; denoise runs are not gated
    assert not list(baseline.parent.glob(".*.tmp"))  # written atomically, nothing left behind

    result = runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok:")

    summary_path = runs_dir / "gaussian-autoattack-Linf" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["clean_accuracy"] = 20 / 40  # 37/40 before
    summary_path.write_text(json.dumps(summary))
    result = runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline), "--alpha", "0.01"])
    assert result.exit_code == 1
    assert "attack/digits/gaussian/Linf/autoattack/none" in result.output
    assert "clean_accuracy" in result.output and "92.5% (37/40)" in result.output and "50.0% (20/40)" in result.output

    # --update accepts the new figures; the next check passes.
    assert runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline), "--update"]).exit_code == 0
    assert runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline)]).exit_code == 0


def test_cli_changed_configuration_and_unfinished_run_exit_2(tmp_path):
    runs_dir = tmp_path / "runs"
    copy_run(CERTIFY, runs_dir)
    baseline = tmp_path / "baseline.json"
    runner = CliRunner()
    assert runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline), "--update"]).exit_code == 0
    summary_path = runs_dir / CERTIFY / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["n0"] = 10
    summary_path.write_text(json.dumps(summary))
    result = runner.invoke(main, ["check", str(runs_dir), "--baseline", str(baseline)])
    assert result.exit_code == 2
    assert "configuration changed: n0 100 → 10" in result.output
    summary_path.unlink()
    result = runner.invoke(main, ["check", str(runs_dir / CERTIFY), "--baseline", str(baseline)])
    assert result.exit_code == 2
    assert "is not a finished run" in result.output
