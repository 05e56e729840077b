"""Sequential certification through the engine: batch-size invariance, agreement with CERTIFY's noise, resume,
soundness on the smoothed linear classifier's exact radii, records, summary and errors."""

import json

import numpy as np
import pytest
from scipy.stats import binom, norm
from test_certify_engine import (
    CountingModule,
    Interrupted,
    linear_digits_model,
    strip_timing,
)
from test_certify_known_answers import SHAPE, SIGMA, linear_problem

import robusteval
from robusteval.data import load_dataset
from robusteval.runs import SAMPLES_FILE, SUMMARY_FILE, RunConfigMismatch
from robusteval.smoothing.engine import SmoothingSettings

SEQUENTIAL_RECORD_KEYS = {"index", "label", "prediction", "abstain", "radius", "correct", "pA_lower", "pA_upper",
                          "count", "draws", "largest_certified_radius", "top_class", "seconds"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def sequential_linear(data, **kwargs):
    options = dict(sigma=0.5, n0=20, alpha=0.01, n_images=8, batch_size=256, device="cpu", compile=False,
                   method="sequential", radii=[0.25, 0.5], n_max=1500)
    options.update(kwargs)
    return robusteval.certify(options.pop("model", linear_digits_model()), data, **options)


@pytest.fixture(scope="module")
def reference(digits):
    return sequential_linear(digits)


def test_batch_size_does_not_change_the_records(digits, reference):
    draws = [r["draws"] for r in reference.records]
    # Images stop at different looks, so packs mix images at different rounds: the test has something to test.
    assert len(set(draws)) >= 3 and min(draws) < 1500
    for batch_size in (7, 333, 5000):
        assert strip_timing(sequential_linear(digits, batch_size=batch_size).records) == strip_timing(
            reference.records)
    # One draw per pass: every round of every image cut into single rows.
    small = dict(n_images=2, n_max=400)
    assert strip_timing(sequential_linear(digits, batch_size=1, **small).records) == strip_timing(
        sequential_linear(digits, batch_size=5000, **small).records)
    # Noise belongs to the image, not to its position in the run.
    shifted = sequential_linear(digits, skip=5, n_images=3)
    assert strip_timing(shifted.records) == strip_timing(reference.records[5:])


def test_sequential_draws_are_certify_draws(digits):
    """Selection and estimation draws are CERTIFY's with n = n_max: same ĉ, and the same count at n_max."""
    n_max = 200  # small enough that some images are still undecided there
    sequential = sequential_linear(digits, n_max=n_max, n_images=16)
    cohen = robusteval.certify(linear_digits_model(), digits, sigma=0.5, n0=20, n=n_max, alpha=0.01, n_images=16,
                               batch_size=256, device="cpu", compile=False)
    assert [r["top_class"] for r in sequential.records] == [r["top_class"] for r in cohen.records]
    full = [i for i, r in enumerate(sequential.records) if r["draws"] == n_max]
    assert full, "some image must run to n_max for this check"
    for i in full:
        assert sequential.records[i]["count"] == cohen.records[i]["count"]
    # A stopped image's count is a prefix count: never above CERTIFY's, nor more than the draws it skipped below.
    for seq, coh in zip(sequential.records, cohen.records):
        assert coh["count"] - (n_max - seq["draws"]) <= seq["count"] <= coh["count"]


def test_resume_after_a_kill_gives_the_same_records(digits, tmp_path, reference):
    inner = linear_digits_model().module
    killed = robusteval.wrap(CountingModule(inner, fail_at=60), 10, (1, 8, 8), name="linear-digits")
    options = dict(batch_size=256)
    with pytest.raises(Interrupted):
        sequential_linear(digits, model=killed, out=tmp_path / "run", **options)
    kept = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    assert 0 < len(kept) < 8 and [r["index"] for r in kept] == list(range(len(kept)))
    assert not (tmp_path / "run" / SUMMARY_FILE).exists()
    # The same weights in the same module tree (the run records their fingerprint, names included).
    same = robusteval.wrap(CountingModule(inner), 10, (1, 8, 8), name="linear-digits")
    resumed = sequential_linear(digits, model=same, out=tmp_path / "run", **options)
    assert strip_timing(resumed.records) == strip_timing(reference.records)
    on_disk = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    assert strip_timing(on_disk) == strip_timing(reference.records)
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary["forward_passes"] == reference.summary["forward_passes"]
    with pytest.raises(RunConfigMismatch):
        sequential_linear(digits, out=tmp_path / "run", radii=[0.25, 0.75])


def test_records_and_summary(reference):
    summary = reference.summary
    assert summary["method"] == "sequential" and summary["radii"] == [0.25, 0.5] and summary["n_max"] == 1500
    assert summary["n"] == 1500 and summary["n0"] == 20
    draws = np.array([r["draws"] for r in reference.records])
    assert summary["draws_per_image"] == {"mean": float(draws.mean()), "median": float(np.median(draws)),
                                          "max": int(draws.max())}
    assert summary["forward_passes"] == int(draws.sum()) + 8 * 20
    sigma = 0.5
    test = SmoothingSettings("certify", sigma=sigma, n=1500, alpha=0.01, n0=20, method="sequential",
                             radii=(0.25, 0.5)).sequential_test()
    for record in reference.records:
        assert SEQUENTIAL_RECORD_KEYS <= set(record)
        assert record["abstain"] == (record["prediction"] is None) == (record["largest_certified_radius"] is None)
        assert record["correct"] == (record["prediction"] == record["label"])
        # The reported bounds are the running intersection, so at least as tight as the last look's own.
        look = test.looks.tolist().index(record["draws"])
        lower, upper = test.bounds(np.array([record["count"]]), look)
        assert record["pA_lower"] >= lower[0] and record["pA_upper"] <= upper[0]
        if not record["abstain"]:
            assert record["radius"] == pytest.approx(sigma * norm.ppf(record["pA_lower"]), rel=1e-12)
            assert record["radius"] >= record["largest_certified_radius"]
            # The largest certified grid radius is the largest one whose threshold the lower bound clears.
            cleared = [r for r in (0.0, 0.25, 0.5) if record["pA_lower"] > norm.cdf(r / sigma)]
            assert record["largest_certified_radius"] == cleared[-1]
    grid = summary["grid_certified_accuracy"]
    assert [p["radius"] for p in grid] == [0.0, 0.25, 0.5]
    for point in grid:
        expected = np.mean([r["correct"] and r["largest_certified_radius"] is not None
                            and r["largest_certified_radius"] >= point["radius"] for r in reference.records])
        assert point["accuracy"] == pytest.approx(expected)
    # The report's curve (from the records' radii) agrees at the grid radii.
    curve = {p["radius"]: p["accuracy"] for p in summary["certified_accuracy"]}
    for point in grid:
        if point["radius"] in curve:
            assert curve[point["radius"]] == pytest.approx(point["accuracy"])


def test_no_grid_radius_above_the_exact_radius_is_certified_on_the_linear_classifier():
    module, x, labels, exact = linear_problem(300)
    model = robusteval.wrap(module, 2, SHAPE, name="linear")
    alpha, radii = 0.001, [0.0625, 0.125, 0.25, 0.375]
    result = robusteval.certify(model, (x, labels), sigma=SIGMA, n0=100, alpha=alpha, method="sequential",
                                radii=radii, n_max=20_000, batch_size=20_000, device="cpu", compile=False)
    largest = np.array([-1.0 if r["largest_certified_radius"] is None else r["largest_certified_radius"]
                        for r in result.records])
    radius = np.array([r["radius"] for r in result.records])
    draws = np.array([r["draws"] for r in result.records])
    wrong = int(np.sum(largest > exact)) + int(np.sum(radius > exact + 1e-12))
    assert wrong <= binom.ppf(0.999, len(exact), alpha), wrong  # 0 or 1 at α = 0.001
    assert all(r["correct"] for r in result.records if not r["abstain"])
    # Power: an image whose exact radius is well beyond a grid radius is certified there ...
    for r in radii:
        clear = exact >= 1.25 * r
        assert clear.sum() >= 20 and np.all(largest[clear] >= r)
    # ... and images far from every threshold stop early, spending a fraction of the budget.
    gap = np.min(np.abs(norm.cdf(exact[:, None] / SIGMA) - norm.cdf(np.array([0.0, *radii]) / SIGMA)), axis=1)
    far = gap > 0.05
    assert far.sum() >= 50 and np.median(draws[far]) <= 1200, (far.sum(), np.median(draws[far]))
    assert result.summary["draws_per_image"]["mean"] < 0.5 * 20_000


def test_method_options_are_checked(digits):
    with pytest.raises(ValueError, match="n_max"):
        sequential_linear(digits, n=100)
    with pytest.raises(ValueError, match="sequential"):
        robusteval.certify(linear_digits_model(), digits, sigma=0.5, n_max=100, n_images=1)
    with pytest.raises(ValueError, match="sequential"):
        robusteval.certify(linear_digits_model(), digits, sigma=0.5, radii=[0.5], n_images=1)
    with pytest.raises(ValueError, match="radii"):
        sequential_linear(digits, radii=[0.5, 0.25])
    with pytest.raises(ValueError, match="radii"):
        sequential_linear(digits, radii=[])
    with pytest.raises(ValueError, match="n_max"):
        sequential_linear(digits, n_max=0)
    with pytest.raises(ValueError, match="futility"):
        sequential_linear(digits, futility=1.5)
    with pytest.raises(ValueError, match="sequential"):
        robusteval.certify(linear_digits_model(), digits, sigma=0.5, futility=0.02, n_images=1)
    with pytest.raises(ValueError, match="certification method"):
        sequential_linear(digits, method="seq")
    with pytest.raises(ValueError, match="predict"):
        SmoothingSettings("predict", sigma=0.25, n=10, alpha=0.01, method="sequential", radii=(0.25,))
    with pytest.raises(ValueError, match="certify's"):  # the shared certify/predict body refuses them for predict
        robusteval.predict(linear_digits_model(), digits, sigma=0.25, n=10, n_max=5)


def test_reports_keep_sequential_runs_apart_from_certify_runs(digits, tmp_path):
    from robusteval.reports.figures import certified_figure
    from robusteval.reports.html import _what
    from robusteval.reports.loading import load_run
    from robusteval.reports.regression import entries_from_runs
    from robusteval.reports.styles import model_identities
    from robusteval.reports.tables import certified_table

    sequential_linear(digits, out=tmp_path / "seq", n_images=4)
    robusteval.certify(linear_digits_model(), digits, sigma=0.5, n0=20, n=1500, alpha=0.01, n_images=4,
                       device="cpu", compile=False, out=tmp_path / "cohen")
    runs = [load_run(tmp_path / "seq"), load_run(tmp_path / "cohen")]
    assert "sequential on r = 0.25, 0.5, n ≤ 1500" in _what(runs[0]) and "n = 1500" in _what(runs[1])
    assert [run.smoothing_mode for run in runs] == ["direct, sequential", "direct"]
    # The CI gate: two entries (not "two runs for one entry"), the sequential one with its grid.
    entries = entries_from_runs(runs)
    assert len(entries) == 2
    sequential = next(e for e in entries.values() if e.identity.get("method") == "sequential")
    assert sequential.config["radii"] == [0.25, 0.5] and "certified_accuracy@r=0.25" in sequential.figures
    # The certified table: one block per method, each with its own row at σ = 0.5.
    table = certified_table(runs, radii=[0.25, 0.5]).values
    assert sorted(table["mode"]) == ["direct", "direct, sequential"]
    expected = runs[0].summary["grid_certified_accuracy"][1]["accuracy"]
    assert table[table["mode"] == "direct, sequential"][0.25].item() == pytest.approx(expected)
    # The figure draws one curve per method, in two line styles the legend names.
    figure = certified_figure(runs, "digits", model_identities(["linear-digits"]))
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "solid: direct" in labels and "dash-dot: direct, sequential" in labels
    curves = {line.get_gid(): line for line in figure.axes[0].get_lines() if str(line.get_gid()).startswith("curve-")}
    assert len(curves) == 2 and curves.pop("curve-linear-digits-direct-0.5").get_linestyle() == "-"
    ((gid, line),) = curves.items()
    assert "direct_sequential-0.5" in gid and line.get_linestyle() == "-."


def test_sequential_summary_is_a_typed_record(reference):
    """The summary parses into its typed record and writes back unchanged; a broken one is refused."""
    from robusteval.records import (
        RecordFormatError,
        SequentialFigures,
        summary_from_json,
    )

    record = summary_from_json(reference.summary)
    assert isinstance(record.sequential, SequentialFigures) and record.sequential.n_max == 1500
    assert record.forward_passes == reference.summary["forward_passes"]
    assert "draws_per_image" not in record.extra and "forward_passes" not in record.extra
    assert record.to_json() == reference.summary
    broken = {**reference.summary, "draws_per_image": {"mean": 3.0}}
    with pytest.raises(RecordFormatError, match="draws_per_image"):
        summary_from_json(broken)
    no_grid = {k: v for k, v in reference.summary.items() if k != "grid_certified_accuracy"}
    with pytest.raises(RecordFormatError, match="grid_certified_accuracy"):
        summary_from_json(no_grid)
