"""Figures from the fixture runs: the right lines with the runs' numbers, one identity per model, files valid,
and figures a reader can read at the full zoo's size (plotting area, identities, legends)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox
from reports_fixtures import (
    FIXTURE_RUNS,
    ZOO_BASELINES,
    ZOO_JOINT,
    copy_run,
    fixture_summary,
    write_zoo_runs,
)
from scipy.stats import norm as gaussian

from robusteval.reports.figures import (
    IDENTITIES_FILE,
    certified_curve,
    certified_envelope_figure,
    certified_figure,
    iter_figures,
    largest_certifiable_radius,
    model_certified_figure,
    psnr_figure,
    robustness_figure,
    save_figure,
    write_figures,
)
from robusteval.reports.loading import load_runs
from robusteval.reports.paths import slug
from robusteval.reports.styles import (
    DISTINCT_SLOTS,
    KNOWN_MODELS,
    MODE_LINESTYLES,
    PALETTE,
    identity_for_slot,
    model_identities,
)
from robusteval.smoothing.decisions import lower_confidence_bound


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
                 "L∞ perturbation budget ε (pixel values in [0, 1])", "sanity flag raised (see tables)"):
        assert text in svg
    l2 = next(f for f in written.overall if f.name == "robust_digits_L2").svg.read_text()
    assert sorted(re.findall(r'id="curve-([^"]+)"', l2)) == ["gaussian", "standard"]
    assert "flag-" not in l2


def test_robustness_line_is_the_lowest_accuracy_over_attacks_with_its_interval(runs):
    identities = model_identities(r.model for r in runs)
    fig = robustness_figure(runs, "digits", "Linf", identities)
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

    identities = model_identities(r.model for r in runs)
    fig = model_certified_figure(runs, "gaussian", "digits", identities["gaussian"])
    lines = _lines(fig, "curve-")
    envelope = _lines(fig, "envelope-")["gaussian-direct"].get_ydata()
    # Curves stop once they reach 0 for good: pad them back with zeros to compare.
    width = len(envelope)
    stacked = np.vstack([np.pad(lines[k].get_ydata(), (0, width - len(lines[k].get_ydata())))[:width]
                         for k in ("gaussian-direct-0.25", "gaussian-direct-0.5")])
    assert np.allclose(envelope, stacked.max(axis=0))
    assert not np.allclose(envelope, stacked[0]) and not np.allclose(envelope, stacked[1])
    # The same envelope in the report-wide figure, in gaussian's colour and marker, solid (direct).
    overall = _lines(certified_envelope_figure(runs, "digits", identities), "envelope-")
    assert np.allclose(overall["gaussian-direct"].get_ydata(), envelope)
    assert overall["gaussian-direct"].get_color() == identities["gaussian"].color
    assert overall["gaussian-direct"].get_marker() == identities["gaussian"].marker
    assert overall["gaussian-direct"].get_linestyle() == "-" and overall["toy-joint-denoised"].get_linestyle() == "--"


def test_certified_curve_from_records_matches_the_summary_grid(runs):
    for run in (r for r in runs if r.kind == "certify"):
        grid = run.summary["certified_accuracy"]
        values = certified_curve(run, np.array([p["radius"] for p in grid]))
        assert np.allclose(values, [p["accuracy"] for p in grid])
        # Non-increasing in the radius, and 0 far beyond the largest certified radius.
        fine = certified_curve(run, np.linspace(0, 3, 301))
        assert np.all(np.diff(fine) <= 0) and fine[-1] == 0.0


def test_psnr_figure_plots_each_denoiser_and_the_noisy_reference(runs):
    fig = psnr_figure(runs, "digits", model_identities(r.model for r in runs))
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
    recorded = json.loads(written.identities.read_text())["models"]
    assert written.identities.name == IDENTITIES_FILE and written.identities.parent == written.overall[0].svg.parent
    assert sorted(recorded) == ["dncnn+standard", "gaussian", "standard", "toy-joint"]
    # Zoo models at their fixed slots; toy-joint (not in the zoo) at the first free one.
    assert {m: v["slot"] for m, v in recorded.items()} == {
        "dncnn+standard": KNOWN_MODELS.index("dncnn+standard"), "gaussian": KNOWN_MODELS.index("gaussian"),
        "standard": KNOWN_MODELS.index("standard"), "toy-joint": len(KNOWN_MODELS)}
    assert len({(v["color"], v["marker"]) for v in recorded.values()}) == 4
    files = {f.name: f.svg.read_text() for f in written.all()}
    gaussian = recorded["gaussian"]["color"].lower()
    assert _stroke(files["robust_digits_Linf"], "curve-gaussian") == gaussian
    assert _stroke(files["robust_digits_L2"], "curve-gaussian") == gaussian
    assert _stroke(files["certified_digits"], "curve-gaussian-direct-0.5") == gaussian
    assert _stroke(files["model_gaussian_certified_digits"], "envelope-gaussian-direct") == gaussian
    joint = recorded["toy-joint"]["color"].lower()
    assert _stroke(files["psnr_digits"], "curve-toy-joint") == joint
    assert _stroke(files["robust_digits_Linf"], "curve-toy-joint") == joint
    assert _stroke(files["robust_digits_Linf"], f"curve-{slug('toy-joint + denoise:0.25')}") == joint


def test_identities_are_distinct_fixed_for_zoo_models_and_deterministic_for_others():
    slots = [identity_for_slot(i) for i in range(DISTINCT_SLOTS)]
    assert len({(s.color, s.marker) for s in slots}) == DISTINCT_SLOTS >= 16
    # The first 12 slots (the whole zoo) differ in colour and in marker.
    assert len({s.color for s in slots[:12]}) == len({s.marker for s in slots[:12]}) == 12 == len(PALETTE)
    alone = model_identities(["cdn"])
    crowded = model_identities(["zeta", "cdn", "alpha", *KNOWN_MODELS, "robustbench:Carmon2019"])
    assert alone["cdn"] == crowded["cdn"] == identity_for_slot(0)
    assert [crowded[m].slot for m in ("alpha", "robustbench:Carmon2019", "zeta")] == [12, 13, 14]  # by name
    assert crowded == model_identities(reversed(list(crowded)))  # order of appearance does not matter
    twenty = model_identities(f"user-model-{i:02d}" for i in range(20))
    assert len({(s.color, s.marker) for s in twenty.values()}) == 20


def test_svg_is_reproducible_and_user_strings_are_literal(tmp_path):
    run = copy_run("standard-autoattack-Linf", tmp_path, lambda s: s.update(model="cost $5 and $6_x"))
    runs = load_runs([run])
    identities = model_identities(r.model for r in runs)
    first, _ = save_figure(robustness_figure(runs, "digits", "Linf", identities), tmp_path / "a")
    second, _ = save_figure(robustness_figure(runs, "digits", "Linf", identities), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert "cost $5 and $6_x" in first.read_text()  # shown as typed, not as mathtext


def test_a_dot_in_a_model_name_does_not_clash_files(tmp_path):
    # gaussian-s0.12 and gaussian-s0.5: the dot is part of the name, not a file suffix.
    run = copy_run("standard-autoattack-Linf", tmp_path)
    runs = load_runs([run])
    identities = model_identities(r.model for r in runs)
    written = [save_figure(robustness_figure(runs, "digits", "Linf", identities),
                           tmp_path / f"model_gaussian-s{s}_robust")
               for s in ("0.12", "0.5")]
    names = {path.name for pair in written for path in pair}
    assert names == {"model_gaussian-s0.12_robust.svg", "model_gaussian-s0.12_robust.png",
                     "model_gaussian-s0.5_robust.svg", "model_gaussian-s0.5_robust.png"}


# --- the full digits zoo: 12 models, each through >= 2 pipelines ------------------------------
ZOO = ZOO_JOINT + ZOO_BASELINES


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    runs = load_runs([write_zoo_runs(tmp_path_factory.mktemp("zoo") / "runs")])
    identities = model_identities(r.model for r in runs)
    drawn = list(iter_figures(runs, identities))
    for item in drawn:
        item.figure.draw_without_rendering()  # lay out (constrained layout runs at draw time)
    return {"runs": runs, "identities": identities, "drawn": drawn}


def _plotting_area(fig) -> tuple[float, float]:
    """Fractions of the figure's width and height that the union of its axes covers."""
    union = Bbox.union([ax.get_window_extent() for ax in fig.axes])
    return union.width / fig.bbox.width, union.height / fig.bbox.height


def test_zoo_fixture_covers_twelve_models_with_two_pipelines_each(zoo):
    attacks = [r for r in zoo["runs"] if r.kind == "attack"]
    assert sorted({r.model for r in zoo["runs"]}) == sorted(ZOO)
    for model in ZOO:
        assert len({r.defense for r in attacks if r.model == model and r.defense != "none"}) >= 2


def test_zoo_figures_keep_most_of_the_figure_for_the_plot(zoo):
    # overall: L∞, L2, certified, envelope, PSNR; per model: L∞, L2, certified
    assert len(zoo["drawn"]) == 5 + 12 * 3
    for item in zoo["drawn"]:
        width, height = _plotting_area(item.figure)
        assert width >= 0.45 and height >= 0.55, f"{item.name}: axes cover {width:.0%} x {height:.0%}"
        gids = [a.get_gid() for ax in item.figure.axes for a in (*ax.lines, *ax.collections) if a.get_gid()]
        assert len(gids) == len(set(gids)), item.name  # SVG ids: unique within a figure
        # and the legend is beside the axes, not over them
        for legend in item.figure.legends:
            box = legend.get_window_extent()
            assert all(not box.overlaps(ax.get_window_extent()) for ax in item.figure.axes), item.name


def test_zoo_models_have_one_distinct_identity_in_every_figure(zoo):
    identities = zoo["identities"]
    assert len({(i.color, i.marker) for i in identities.values()}) == len(ZOO)
    seen: dict[str, set] = {}
    for item in zoo["drawn"]:
        for ax in item.figure.axes:
            for line in ax.lines:
                gid = line.get_gid() or ""
                if not gid.startswith(("curve-", "envelope-")) or line.get_marker() in (None, "None", ""):
                    continue
                model = item.model or line.get_label()
                seen.setdefault(model, set()).add((line.get_color(), line.get_marker()))
    assert set(seen) == set(ZOO)
    for model, looks in seen.items():
        assert looks == {(identities[model].color, identities[model].marker)}, model


def _legend_entries(legend) -> list[tuple[str, object]]:
    texts = [t.get_text().replace("\n  ", " ").replace("\n", " ") for t in legend.texts]
    return list(zip(texts, legend.legend_handles))


def test_every_legend_entry_is_drawn_in_the_plot(zoo):
    for item in zoo["drawn"]:
        fig = item.figure
        assert len(fig.legends) <= 1 and not any(ax.get_legend() for ax in fig.axes)
        artists = [a for ax in fig.axes for a in (*ax.lines, *ax.collections)]
        for text, handle in (_legend_entries(fig.legends[0]) if fig.legends else []):
            mode = next((m for m in MODE_LINESTYLES if text.endswith(f": {m}")), None)
            if mode is not None:  # a line-style key: some curve of that mode is drawn in that style
                drawn = [a for a in artists if isinstance(a, Line2D) and f"-{mode}" in (a.get_gid() or "")]
                assert drawn and all(a.get_linestyle() == handle.get_linestyle() for a in drawn), (item.name, text)
                continue
            named = [a for a in artists if a.get_label() == text]
            assert named, f"{item.name}: legend entry {text!r} is not drawn"
            if isinstance(handle, Line2D) and handle.get_marker() not in (None, "None", ""):
                look = (handle.get_markeredgecolor(), handle.get_marker(), handle.get_markerfacecolor())
                assert any((a.get_markeredgecolor(), a.get_marker(), a.get_markerfacecolor()) == look
                           for a in named), (item.name, text)


def test_pipelines_are_small_multiples_with_shared_axes(zoo):
    fig = next(d.figure for d in zoo["drawn"] if d.name == "robust_digits_Linf")
    titles = [ax.get_title() for ax in fig.axes]
    # jem's sgld:20 and gmmc's sgld:20:0.01:0.005:5 (its own chain step) share the sgld:20 panel.
    assert titles == ["no defense", "+ denoise:0.25", "+ noise:0.25",
                      "+ sgld:20 (each model's chain step and noise)", "+ smooth:0.25:16"]
    assert len({ax.get_xlim() for ax in fig.axes}) == 1 and len({ax.get_ylim() for ax in fig.axes}) == 1
    attacks = [r for r in zoo["runs"] if r.kind == "attack" and r.summary["norm"] == "Linf"]
    for ax, defense in zip(fig.axes, ["none", "denoise:0.25", "noise:0.25", "sgld:20", "smooth:0.25:16"]):
        curves = {line.get_label() for line in ax.lines if (line.get_gid() or "").startswith("curve-")}
        assert curves == {r.model for r in attacks if r.defense.startswith(defense)}
    assert {r.defense for r in attacks if r.defense.startswith("sgld")} == {"sgld:20", "sgld:20:0.01:0.005:5"}
    # The legend lists each model once (plus 3 keys), not every system.
    assert len(fig.legends[0].texts) == len(ZOO) + 3


def test_certified_figures_mark_the_largest_certifiable_radius(zoo):
    # All n votes for the top class: the Clopper-Pearson bound the engine uses is α^(1/n).
    for sigma, n, alpha in ((0.25, 1000, 0.001), (0.5, 2000, 0.001), (0.12, 100_000, 0.01)):
        expected = sigma * float(gaussian.ppf(lower_confidence_bound(n, n, alpha)))
        assert largest_certifiable_radius(sigma, n, alpha) == pytest.approx(expected, rel=1e-9)
    assert largest_certifiable_radius(0.5, 1000, 0.001) == pytest.approx(1.2310, abs=1e-3)
    certify = [r for r in zoo["runs"] if r.kind == "certify"]
    for run in certify:  # no record certifies past its run's cap
        summary = run.summary
        cap = largest_certifiable_radius(float(summary["sigma"]), int(summary["n"]), float(summary["alpha"]))
        assert max(r["radius"] for r in run.records) <= cap + 1e-12
    envelope = next(d.figure for d in zoo["drawn"] if d.name == "certified_envelope_digits")
    caps = sorted(line.get_xdata()[0] for line in envelope.axes[0].lines if (line.get_gid() or "").startswith("cap-"))
    assert caps == pytest.approx([largest_certifiable_radius(s, 1000, 0.001) for s in (0.12, 0.25, 0.5)])
    assert envelope.axes[0].get_xlim()[1] > caps[-1]  # on the plot, not past its edge
    per_sigma = next(d.figure for d in zoo["drawn"] if d.name == "certified_digits")
    assert [ax.get_title() for ax in per_sigma.axes] == ["σ = 0.12", "σ = 0.25", "σ = 0.5"]


def test_a_one_model_figure_is_a_single_clean_plot(tmp_path):
    runs = load_runs([copy_run(name, tmp_path) for name in ("standard-autoattack-Linf", "standard-pgd-Linf")])
    identities = model_identities(r.model for r in runs)
    fig = robustness_figure(runs, "digits", "Linf", identities)
    fig.draw_without_rendering()
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "" and not fig.legends  # no panels, no legend
    assert fig._suptitle.get_text().startswith("standard: robust accuracy")  # the title names the model
    width, height = _plotting_area(fig)
    assert width >= 0.8 and height >= 0.75
    curves = _lines(fig, "curve-")
    assert list(curves) == ["standard"]
    line = curves["standard"]
    assert (line.get_color(), line.get_marker(), line.get_linestyle()) == (
        identities["standard"].color, identities["standard"].marker, "-")

    gaussian = load_runs([copy_run("gaussian-certify-0.5", tmp_path)])
    fig = certified_figure(gaussian, "digits", model_identities(["gaussian"]))
    fig.draw_without_rendering()
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == ""
    assert not fig.legends and fig._suptitle.get_text().startswith("gaussian (direct): certified accuracy")
    assert [t.get_text() for t in fig.axes[0].texts] == ["largest radius n = 1000 can certify"]  # a direct label
    width, height = _plotting_area(fig)
    assert width >= 0.8 and height >= 0.75


def test_a_pipeline_attacked_at_one_budget_shows_its_interval_as_a_bar(tmp_path):
    def one_budget(summary):
        summary["curve"] = [p for p in summary["curve"] if p["eps"] == 0.1]

    runs = load_runs([copy_run("toy-joint-pgd-denoise-Linf", tmp_path, one_budget),
                      copy_run("toy-joint-autoattack-Linf", tmp_path)])
    point = fixture_summary("toy-joint-pgd-denoise-Linf")["curve"][1]
    assert point["eps"] == 0.1
    fig = robustness_figure(runs, "digits", "Linf", model_identities(["toy-joint"]))
    panel = fig.axes[1]
    assert panel.get_title() == "+ denoise:0.25"
    bar = next(c for c in panel.collections if c.get_gid() == f"band-{slug('toy-joint + denoise:0.25')}")
    (segment,) = bar.get_segments()
    assert np.allclose(segment, [[0.1, 100 * point["ci_low"]], [0.1, 100 * point["ci_high"]]])
    # The undefended curve is repeated faintly beside the point, for reference.
    faint = next(line for line in panel.lines if line.get_gid() == f"reference-toy-joint-{slug('denoise:0.25')}")
    assert np.allclose(faint.get_ydata(), [100 * p["robust_accuracy"]
                                           for p in fixture_summary("toy-joint-autoattack-Linf")["curve"]])
