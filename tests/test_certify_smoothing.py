"""The statistics of randomized smoothing: Clopper–Pearson bound, CERTIFY and PREDICT decisions, summaries."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import beta, binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from robusteval.smoothing import decisions as smoothing
from robusteval.smoothing.decisions import (
    average_certified_radius,
    certified_accuracy_curve,
    certify_decision,
    lower_confidence_bound,
    predict_decision,
    radius_grid,
)


@pytest.mark.parametrize("n", [1, 10, 100, 1000, 10_000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_lower_bound_is_one_sided_clopper_pearson(n, alpha):
    for count in sorted({0, 1, n // 3, n // 2, (9 * n) // 10, n - 1, n}):
        if not 0 <= count <= n:
            continue
        bound = lower_confidence_bound(count, n, alpha)
        reference = proportion_confint(count, n, alpha=2 * alpha, method="beta")[0]
        assert abs(bound - reference) <= 1e-9
        # The same bound from its definition: the α quantile of Beta(k, n − k + 1).
        exact = 0.0 if count == 0 else beta.ppf(alpha, count, n - count + 1)
        assert abs(bound - exact) <= 1e-9


def test_lower_bound_known_values():
    # All n draws agree: the bound solves p^n = α.
    assert lower_confidence_bound(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000), abs=1e-12)
    # A one-sided bound is above the two-sided bound at the same α.
    assert lower_confidence_bound(700, 1000, 0.05) > proportion_confint(700, 1000, alpha=0.05, method="beta")[0]


@pytest.mark.parametrize("count, n, alpha", [(-1, 10, 0.01), (11, 10, 0.01), (0, 0, 0.01), (5, 10, 0.0), (5, 10, 1.0)])
def test_lower_bound_rejects_bad_input(count, n, alpha):
    with pytest.raises(ValueError):
        lower_confidence_bound(count, n, alpha)


def test_certify_abstains_exactly_when_the_bound_is_at_most_one_half():
    n, alpha, sigma = 1000, 0.001, 0.5
    counts = np.arange(n + 1)
    bounds = np.array([lower_confidence_bound(int(k), n, alpha) for k in counts])
    threshold = int(np.argmax(bounds > 0.5))  # the smallest count that certifies
    assert bounds[threshold - 1] <= 0.5 < bounds[threshold]
    for count in (threshold - 1, threshold, n):
        cert = certify_decision([0, 10, 0], [n - count, count, 0], sigma, alpha)
        assert cert.top_class == 1 and cert.count == count
        assert cert.pA_lower == pytest.approx(bounds[count], abs=1e-12)
        if count < threshold:
            assert cert.abstain and cert.prediction is None and cert.radius == 0.0
        else:
            assert cert.prediction == 1
            assert cert.radius == pytest.approx(sigma * norm.ppf(bounds[count]), rel=1e-12)
            assert cert.radius > 0


def test_certify_boundary_uses_less_or_equal(monkeypatch):
    monkeypatch.setattr(smoothing, "lower_confidence_bound", lambda count, n, alpha: 0.5)
    assert certify_decision([5, 0], [10, 0], 0.25, 0.001).abstain
    monkeypatch.setattr(smoothing, "lower_confidence_bound", lambda count, n, alpha: 0.5 + 1e-9)
    cert = certify_decision([5, 0], [10, 0], 0.25, 0.001)
    assert cert.prediction == 0 and cert.radius == pytest.approx(0.25 * norm.ppf(0.5 + 1e-9))


def test_certify_bounds_the_selected_class_not_the_most_frequent_estimate():
    # Selection picks class 2; the estimation draws favour class 0, but only class 2 is bounded.
    cert = certify_decision([1, 0, 9], [900, 0, 100], 0.25, 0.001)
    assert cert.top_class == 2 and cert.count == 100 and cert.abstain
    # Ties in selection go to the lower class index (numpy argmax).
    assert certify_decision([4, 4, 1], [0, 1000, 0], 0.25, 0.001).top_class == 0


def test_predict_matches_the_binomial_test():
    counts = [3, 60, 37, 0]
    pred = predict_decision(counts, alpha=0.05)
    p_value = binomtest(60, 97, 0.5).pvalue
    assert pred.top_class == 1 and pred.count == 60 and pred.runner_up_count == 37
    assert pred.p_value == pytest.approx(p_value, abs=1e-12)
    assert (pred.prediction is None) == (p_value > 0.05)
    # The two-sided exact binomial test from its definition: the total probability under Bin(97, 1/2) of every
    # count no more likely than 60, in exact rational arithmetic: 0.0249911...
    pmf = [Fraction(math.comb(97, k), 2**97) for k in range(98)]
    exact = float(sum(p for p in pmf if p <= pmf[60]))
    assert exact == pytest.approx(0.024991, abs=5e-7)
    assert pred.p_value == pytest.approx(exact, rel=1e-9)
    assert predict_decision(counts, alpha=0.01).abstain
    assert predict_decision([0, 1000, 0], alpha=0.001).prediction == 1
    # A tie for the top two is never significant; the lower index is reported as top.
    tie = predict_decision([50, 50, 0], alpha=0.5)
    assert tie.abstain and tie.top_class == 0 and tie.p_value == pytest.approx(1.0)


def test_radius_grid_and_summary_figures():
    assert radius_grid(0.0) == [0.0]
    assert radius_grid(0.74) == [0.0, 0.25, 0.5]
    assert radius_grid(0.75) == [0.0, 0.25, 0.5, 0.75]
    records = [
        {"radius": 0.8, "correct": True},
        {"radius": 0.3, "correct": True},
        {"radius": 0.6, "correct": False},  # certified but wrong: counts as 0
        {"radius": 0.0, "correct": False},  # abstained
    ]
    assert certified_accuracy_curve(records) == [
        {"radius": 0.0, "accuracy": 0.5},
        {"radius": 0.25, "accuracy": 0.5},
        {"radius": 0.5, "accuracy": 0.25},
        {"radius": 0.75, "accuracy": 0.25},
    ]
    assert average_certified_radius(records) == pytest.approx((0.8 + 0.3) / 4)
    assert certified_accuracy_curve([]) == [] and average_certified_radius([]) == 0.0
    assert math.isclose(certified_accuracy_curve([{"radius": 0.0, "correct": False}])[0]["accuracy"], 0.0)
