"""Typed run records: the committed run files parse unchanged, and a record writes back exactly what it read."""

from __future__ import annotations

import json

import pytest
from reports_fixtures import FIXTURE_RUNS, fixture_summary

from robusteval.records import (
    AttackSample,
    AttackSummary,
    CurvePoint,
    DenoiseSummary,
    EpsOutcome,
    RecordFormatError,
    SmoothingConfig,
    SmoothingSummary,
    summary_from_json,
)

FIXTURES = sorted(p.name for p in FIXTURE_RUNS.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_summary_parses_and_writes_back_its_own_values(name: str) -> None:
    summary = fixture_summary(name)
    record = summary_from_json(summary)
    assert record.kind == summary["kind"]
    # Keys the fixture lacks come back as their defaults; every key it has comes back with its value.
    assert _restricted(record.to_json(), summary) == summary


def _restricted(written, original):
    """`written` cut down to the keys `original` has, at every level."""
    if isinstance(original, dict):
        return {k: _restricted(written[k], v) for k, v in original.items()}
    if isinstance(original, list):
        return [_restricted(w, o) for w, o in zip(written, original, strict=True)]
    return written


def test_attack_summary_round_trips_exactly_with_every_field() -> None:
    summary = {
        "kind": "attack", "model": "m", "dataset": "digits", "n": 4, "attack": "pgd", "norm": "L2",
        "defense": "denoise:0.25", "clean_accuracy": 0.75,
        "curve": [{"eps": 0.5, "robust_accuracy": 0.5, "ci_low": 0.1, "ci_high": 0.9, "broken_by": {"pgd": 1},
                   "robust": 2, "rejected": 3, "standard_robust_accuracy": 0.75, "standard_robust": 3,
                   "worst_of_n_robust_accuracy": 0.25, "worst_of_n_robust": 1}],
        "flags": ["zero gradients"], "seconds": 1.5, "gradient": "auto", "eot": 1, "seed": 0, "batch_size": 2,
        "checks": [{"name": "large-eps", "status": "n/a", "detail": "disabled"}], "large_eps": None, "notes": ["x"],
    }
    record = AttackSummary.from_json(summary)
    assert record.curve == [CurvePoint(0.5, 0.5, 0.1, 0.9, {"pgd": 1}, robust=2, rejected=3,
                                       standard_robust_accuracy=0.75, standard_robust=3,
                                       worst_of_n_robust_accuracy=0.25, worst_of_n_robust=1)]
    assert json.dumps(record.to_json()) == json.dumps(summary)  # same keys in the same order


def test_a_curve_point_without_the_adaptive_figures_reads_as_the_attack_s_own() -> None:
    old = CurvePoint.from_json({"eps": 0.1, "robust_accuracy": 0.4, "ci_low": 0.3, "ci_high": 0.5})
    assert old.standard == 0.4 and old.standard_robust_accuracy is None and old.worst_of_n_robust_accuracy is None
    new = CurvePoint.from_json({"eps": 0.1, "robust_accuracy": 0.4, "ci_low": 0.3, "ci_high": 0.5,
                                "standard_robust_accuracy": 0.6})
    assert new.standard == 0.6


def test_smoothing_summary_keeps_the_engine_order_and_run_settings() -> None:
    summary = {"kind": "predict", "model": "m", "dataset": "digits", "mode": "direct", "sigma": 0.25, "n": 100,
               "alpha": 0.001, "n_images": 3, "accuracy": 2 / 3, "abstain_rate": 0.0, "seconds": 0.1, "skip": 0,
               "seed": 0, "batch_size": 1000, "compile": False}
    record = SmoothingSummary.from_json(summary)
    assert record.accuracy == pytest.approx(2 / 3) and record.certified_accuracy is None
    assert record.extra == {"batch_size": 1000, "compile": False}
    assert json.dumps(record.to_json()) == json.dumps(summary)


def test_denoise_summary_parses_points() -> None:
    record = summary_from_json(fixture_summary("toy-joint-denoise"))
    assert isinstance(record, DenoiseSummary) and [p.sigma for p in record.psnr] == [0.12, 0.25, 0.5]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(kind="bogus"), "has kind 'bogus'"),
    (lambda s: s.pop("clean_accuracy"), "lacks clean_accuracy"),
    (lambda s: s.update(norm="L3"), "norm must be one of Linf, L2, L1"),
    (lambda s: s["curve"][0].update(robust_accuracy=0.99, ci_high=0.95), "lies outside its interval"),
    (lambda s: s.update(flags=[{"message": "x"}]), "flags must be a list of strings"),
    (lambda s: s.update(n=0), "n must be a positive integer"),
    (lambda s: s.update(curve=[]), "curve must be a non-empty list"),
])
def test_a_summary_that_breaks_the_contract_says_what_is_wrong(edit, message: str) -> None:
    summary = fixture_summary("standard-autoattack-Linf")
    edit(summary)
    with pytest.raises(RecordFormatError, match=message):
        summary_from_json(summary)


def test_sample_and_config_records_write_the_engine_layout() -> None:
    sample = AttackSample(index=3, batch=0, label=1, clean_prediction=1, correct=True, gradient_masked={"full": True},
                          results=[EpsOutcome(0.1, True, "remedy:apgd-dlr", 7, 0.0999, 0, standard_broken=False)],
                          gradient_cause={"full": "saturation"})
    assert sample.to_json() == {
        "index": 3, "batch": 0, "label": 1, "clean_prediction": 1, "correct": True, "gradient_masked": {"full": True},
        "results": [{"eps": 0.1, "broken": True, "attack": "remedy:apgd-dlr", "prediction": 7,
                     "perturbation_norm": 0.0999, "rejected": 0, "standard_broken": False, "worst_broken": None}],
        "gradient_cause": {"full": "saturation"}}
    placed = AttackSample(index=3, batch=0, label=1, clean_prediction=1, correct=True, gradient_masked=None,
                          results=[], device="cuda:1")
    assert placed.to_json()["device"] == "cuda:1"  # where its batch ran; absent above, as in older records
    config = SmoothingConfig("certify", "cdn", "digits", "direct", 0.25, 100, 1000, 0.001, 10, 0, 0, "x")
    assert "checkpoint" not in config.to_json()  # shipped weights: the configuration of earlier runs
    assert "device_type" not in config.to_json()  # where it runs does not change its results
    other = SmoothingConfig("certify", "cdn", "digits", "direct", 0.25, 100, 1000, 0.001, 10, 0, 0, "x",
                            checkpoint="w.safetensors")
    assert other.to_json()["checkpoint"] == "w.safetensors" and "model_dir" not in other.to_json()
