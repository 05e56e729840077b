"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

The smoothed classifier is g(x) = argmax_c P(f(x + σ·n) = c), n ~ N(0, I).
These functions turn Monte-Carlo class counts of the base classifier f into
Cohen et al.'s decisions:

- CERTIFY: the class ĉ picked from n0 selection draws is counted in n fresh
  draws; p̲A is the one-sided (1 − α) Clopper–Pearson lower bound of its
  probability; abstain when p̲A ≤ 1/2, otherwise g is certified constant
  within the L2 radius σ·Φ⁻¹(p̲A).
- PREDICT: the top two counts of n draws; a two-sided binomial test of
  nA against nA + nB at 1/2; abstain unless its p-value is ≤ α.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# scipy and statsmodels are imported where they are used, so `import robusteval` stays fast.

# Certified-accuracy curves are reported on radii 0, 0.25, 0.5, ...
RADIUS_GRID_STEP = 0.25


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a probability in (0, 1), got {alpha}")


def lower_confidence_bound(count: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion.

    That is the lower end of the two-sided (1 − 2α) exact interval.
    """
    # deferred: statsmodels costs ~0.8 s to import
    from statsmodels.stats.proportion import proportion_confint

    _check_alpha(alpha)
    if n <= 0 or not 0 <= count <= n:
        raise ValueError(f"need 0 <= count <= n and n >= 1, got count={count}, n={n}")
    return float(proportion_confint(count, n, alpha=2 * alpha, method="beta")[0])


@dataclass(frozen=True)
class Certificate:
    """The outcome of CERTIFY for one input.

    prediction is None when the smoothed classifier abstains (radius 0 then).
    top_class is ĉ, the class the selection draws picked, abstaining or not.
    """

    prediction: int | None
    radius: float
    pA_lower: float
    top_class: int
    count: int

    @property
    def abstain(self) -> bool:
        return self.prediction is None


def certify_decision(
    selection_counts: Sequence[int], estimation_counts: Sequence[int], sigma: float, alpha: float
) -> Certificate:
    """CERTIFY from the class counts of the n0 selection draws and the n estimation draws.

    ĉ is the most frequent class of the selection draws (the lowest index on
    ties); only its estimation count enters the bound.
    """
    from scipy.stats import norm  # deferred: scipy.stats costs ~0.6 s to import

    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    selection = np.asarray(selection_counts, dtype=np.int64)
    estimation = np.asarray(estimation_counts, dtype=np.int64)
    if selection.ndim != 1 or selection.shape != estimation.shape or selection.sum() <= 0 or estimation.sum() <= 0:
        raise ValueError("selection and estimation counts must be non-empty per-class count vectors of one length")
    top_class = int(np.argmax(selection))
    count = int(estimation[top_class])
    p_lower = lower_confidence_bound(count, int(estimation.sum()), alpha)
    if p_lower <= 0.5:
        return Certificate(None, 0.0, p_lower, top_class, count)
    return Certificate(top_class, float(sigma * norm.ppf(p_lower)), p_lower, top_class, count)


@dataclass(frozen=True)
class Prediction:
    """The outcome of PREDICT for one input; prediction is None when it abstains."""

    prediction: int | None
    top_class: int
    count: int
    runner_up_count: int
    p_value: float

    @property
    def abstain(self) -> bool:
        return self.prediction is None


def predict_decision(counts: Sequence[int], alpha: float) -> Prediction:
    """PREDICT from the class counts of n draws: abstain unless nA beats nB at level α."""
    from scipy.stats import binomtest  # deferred: scipy.stats costs ~0.6 s to import

    _check_alpha(alpha)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2 or counts.sum() <= 0:
        raise ValueError("counts must be a per-class count vector of at least two classes with a positive sum")
    order = np.argsort(-counts, kind="stable")  # ties: the lower class index first
    top, runner_up = int(order[0]), int(order[1])
    count_a, count_b = int(counts[top]), int(counts[runner_up])
    p_value = float(binomtest(count_a, count_a + count_b, 0.5).pvalue)
    return Prediction(None if p_value > alpha else top, top, count_a, count_b, p_value)


def radius_grid(max_radius: float, step: float = RADIUS_GRID_STEP) -> list[float]:
    """0, step, 2·step, ... up to the largest multiple of step not above max_radius."""
    if max_radius < 0 or not math.isfinite(max_radius):
        raise ValueError(f"max_radius must be finite and >= 0, got {max_radius}")
    # The small tolerance keeps a radius of exactly k·step (up to round-off) on the grid.
    points = int(math.floor(max_radius / step + 1e-9)) + 1
    return [k * step for k in range(points)]


def certified_accuracy_curve(records: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Fraction of records that are correct with a certified radius >= r, for r on the grid.

    The grid runs from 0 up to the largest radius any record reached.
    """
    records = list(records)
    if not records:
        return []
    correct_radii = np.array([float(r["radius"]) for r in records if r["correct"]])
    top = max(float(r["radius"]) for r in records)
    total = len(records)
    return [
        {"radius": radius, "accuracy": float((correct_radii >= radius).sum()) / total}
        for radius in radius_grid(top)
    ]


def average_certified_radius(records: Iterable[Mapping[str, Any]]) -> float:
    """Mean certified radius, counting wrong and abstained inputs as 0."""
    records = list(records)
    if not records:
        return 0.0
    return float(sum(float(r["radius"]) for r in records if r["correct"]) / len(records))
