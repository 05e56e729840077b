"""Figures from the fixture runs: the right lines with the runs' numbers, colours kept per model, files valid."""

from __future__ import annotations

import re

import numpy as np
import pytest
from reports_fixtures import FIXTURE_RUNS, copy_run, fixture_summary

from robusteval.reports.figures import (
    OKABE_ITO,
    certified_curve,
    certified_figure,
    model_styles,
    psnr_figure,
    robustness_figure,
    save_figure,
    write_figures,
)
from robusteval.reports.loading import load_runs
from robusteval.reports.paths import slug


@pytest.fixture(scope="module")
def runs():
    return load_runs([FIXTURE_RUNS])


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    return write_figures(runs, tmp_path_factory.mktemp("figures"))


def _lines(fig, prefix):
    return {line.get_gid()[len(prefix):]: line for ax in fig.axes for line in ax.lines
            if (line.get_gid() or "").startswith(prefix)}


def _stroke(svg_text, gid):
    match = re.search(rf'<g id="{re.escape(gid)}">\s*<path[^>]*style="[^"]*stroke: (#[0-9a-f]{{6}})', svg_text)
    assert match, f"no line {gid}"
    return match.group(1)


def test_every_expected_figure_is_written_as_png_and_svg(written):
    names = {f.name for f in written.all()}
    assert names == {
        "robust_digits_Linf", "robust_digits_L2", "certified_digits", "certified_envelope_digits", "psnr_digits",
        "model_gaussian_robust_digits_Linf", "model_gaussian_robust_digits_L2", "model_gaussian_certified_digits",
        "model_standard_robust_digits_Linf", "model_standard_robust_digits_L2",
        "model_toy-joint_robust_digits_Linf", "model_toy-joint_certified_digits",
    }
    for figure in written.all():
        assert figure.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure.svg.read_text().lstrip().startswith("<?xml")
    assert set(written.per_model) == {"gaussian", "standard", "toy-joint"}


def test_robustness_svg_has_one_line_and_band_per_system_and_rings_only_where_flags_fired(written):
    svg = next(f for f in written.overall if f.name == "robust_digits_Linf").svg.read_text()
    systems = ["gaussian", "standard", "toy-joint", "toy-joint + denoise:0.25"]
    assert sorted(re.findall(r'id="curve-([^"]+)"', svg)) == sorted(slug(s) for s in systems)
    assert sorted(re.findall(r'id="band-([^"]+)"', svg)) == sorted(slug(s) for s in systems)
    assert re.findall(r'id="flag-([^"]+)"', svg) == ["toy-joint"]
    for text in ("Robust accuracy vs ε: digits, L∞", "robust accuracy (%)",
                 "L∞ perturbation budget ε (pixel values in [0, 1])", "sanity flags fired (unreliable)"):
        assert text in svg
    l2 = next(f for f in written.overall if f.name == "robust_digits_L2").svg.read_text()
    assert sorted(re.findall(r'id="curve-([^"]+)"', l2)) == ["gaussian", "standard"]
    assert "flag-" not in l2


def test_robustness_line_is_the_lowest_accuracy_over_attacks_with_its_interval(runs):
    styles = model_styles(r.model for r in runs)
    fig = robustness_figure(runs, "digits", "Linf", styles)
    line = _lines(fig, "curve-")["standard"]
    aa = fixture_summary("standard-autoattack-Linf")["curve"]
    pgd = fixture_summary("standard-pgd-Linf")["curve"]
    expected = [100 * min(a["robust_accuracy"], p["robust_accuracy"]) for a, p in zip(aa, pgd)]
    assert np.allclose(line.get_ydata(), expected)
    assert np.allclose(line.get_xdata(), [p["eps"] for p in aa])
    # The band is the interval of the run that gave the lowest figure (PGD at ε = 0.05).
    band = next(c for c in fig.axes[0].collections if c.get_gid() == "band-standard")
    upper_at_first_eps = band.get_paths()[0].vertices[:, 1].max()
    assert upper_at_first_eps == pytest.approx(100 * max(p["ci_high"] for p in pgd))


def test_certified_figures_one_line_per_model_mode_and_sigma_and_the_envelope(runs, written):
    svg = next(f for f in written.overall if f.name == "certified_digits").svg.read_text()
    assert sorted(re.findall(r'id="curve-([^"]+)"', svg)) == sorted(
        ["gaussian-direct-0.25", "gaussian-direct-0.5", "toy-joint-denoised-0.25", "toy-joint-direct-0.25"])
    assert "certified L2 radius (pixel values in [0, 1])" in svg and "certified accuracy (%)" in svg
    envelope_svg = next(f for f in written.overall if f.name == "certified_envelope_digits").svg.read_text()
    assert sorted(re.findall(r'id="envelope-([^"]+)"', envelope_svg)) == [
        "gaussian-direct", "toy-joint-denoised", "toy-joint-direct"]
    assert "curve-" not in envelope_svg

    styles = model_styles(r.model for r in runs)
    fig = certified_figure(runs, "digits", styles, model="gaussian", envelope=True)
    lines = _lines(fig, "curve-")
    envelope = _lines(fig, "envelope-")["gaussian-direct"]
    stacked = np.vstack([lines["gaussian-direct-0.25"].get_ydata(), lines["gaussian-direct-0.5"].get_ydata()])
    assert np.allclose(envelope.get_ydata(), stacked.max(axis=0))
    assert not np.allclose(envelope.get_ydata(), stacked[0]) and not np.allclose(envelope.get_ydata(), stacked[1])


def test_certified_curve_from_records_matches_the_summary_grid(runs):
    for run in (r for r in runs if r.kind == "certify"):
        grid = run.summary["certified_accuracy"]
        values = certified_curve(run, np.array([p["radius"] for p in grid]))
        assert np.allclose(values, [p["accuracy"] for p in grid])
        # Non-increasing in the radius, and 0 far beyond the largest certified radius.
        fine = certified_curve(run, np.linspace(0, 3, 301))
        assert np.all(np.diff(fine) <= 0) and fine[-1] == 0.0


def test_psnr_figure_plots_each_denoiser_and_the_noisy_reference(runs):
    fig = psnr_figure(runs, "digits", model_styles(r.model for r in runs))
    lines = _lines(fig, "curve-")
    assert set(lines) == {slug("dncnn+standard"), "toy-joint"}
    summary = fixture_summary("toy-joint-denoise")
    assert np.allclose(lines["toy-joint"].get_ydata(), [p["psnr"] for p in summary["psnr"]])
    reference = next(line for line in fig.axes[0].lines if line.get_gid() == "reference-noisy-input")
    other = fixture_summary("dncnn-denoise")
    assert np.allclose(reference.get_ydata(),
                       [(p["psnr_noisy"] + q["psnr_noisy"]) / 2 for p, q in zip(summary["psnr"], other["psnr"])])
    assert fig.axes[0].get_ylabel() == "PSNR (dB)"


def test_each_model_keeps_its_colour_in_every_figure(written):
    styles = model_styles(["dncnn+standard", "gaussian", "standard", "toy-joint"])
    assert len({s.color for s in styles.values()}) == 4
    assert all(s.color in OKABE_ITO for s in styles.values())
    files = {f.name: f.svg.read_text() for f in written.all()}
    gaussian = styles["gaussian"].color.lower()
    assert _stroke(files["robust_digits_Linf"], "curve-gaussian") == gaussian
    assert _stroke(files["robust_digits_L2"], "curve-gaussian") == gaussian
    assert _stroke(files["certified_digits"], "curve-gaussian-direct-0.5") == gaussian
    assert _stroke(files["model_gaussian_certified_digits"], "envelope-gaussian-direct") == gaussian
    joint = styles["toy-joint"].color.lower()
    assert _stroke(files["psnr_digits"], "curve-toy-joint") == joint
    assert _stroke(files["robust_digits_Linf"], "curve-toy-joint") == joint
    # Many models: colours repeat only with another dash pattern.
    many = model_styles(f"m{i:02d}" for i in range(12))
    assert len({(s.color, s.linestyle) for s in many.values()}) == 12


def test_svg_is_reproducible_and_user_strings_are_literal(tmp_path):
    run = copy_run("standard-autoattack-Linf", tmp_path, lambda s: s.update(model="cost $5 and $6_x"))
    runs = load_runs([run])
    styles = model_styles(r.model for r in runs)
    first, _ = save_figure(robustness_figure(runs, "digits", "Linf", styles), tmp_path / "a")
    second, _ = save_figure(robustness_figure(runs, "digits", "Linf", styles), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert "cost $5 and $6_x" in first.read_text()  # shown as typed, not as mathtext


def test_a_dot_in_a_model_name_does_not_clash_files(tmp_path):
    # gaussian-s0.12 and gaussian-s0.5: the dot is part of the name, not a file suffix.
    run = copy_run("standard-autoattack-Linf", tmp_path)
    runs = load_runs([run])
    styles = model_styles(r.model for r in runs)
    written = [save_figure(robustness_figure(runs, "digits", "Linf", styles), tmp_path / f"model_gaussian-s{s}_robust")
               for s in ("0.12", "0.5")]
    names = {path.name for pair in written for path in pair}
    assert names == {"model_gaussian-s0.12_robust.svg", "model_gaussian-s0.12_robust.png",
                     "model_gaussian-s0.5_robust.svg", "model_gaussian-s0.5_robust.png"}
