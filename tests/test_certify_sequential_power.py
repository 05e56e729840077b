"""The spending design of sequential certification: power against CERTIFY, coverage, the exact allowance, giving up.

Streams are shared: one Bernoulli(p_A) stream per image, drawn as binomial increments between the looks, feeds
both the sequential test and CERTIFY at n = n_max (its count is the stream's count at the last look), so the
comparison is paired and the rates are compared on the same draws.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

from robusteval.core.interface import JointModel
from robusteval.smoothing.sequential import (
    LOWER_BETS,
    SequentialTest,
    betting_allowances,
    betting_bounds,
    exact_final_allowance,
    log_wealth,
)


def shared_streams(test: SequentialTest, p: float, streams: int, seed: int):
    """Run `streams` Bernoulli(p) streams through the test look by look; returns (state, failures at n_max)."""
    rng = np.random.default_rng(seed)
    steps = np.diff(np.concatenate([[0], test.looks]))
    failures = np.cumsum(rng.binomial(np.broadcast_to(steps, (streams, steps.size)), 1 - p), axis=1)
    state = test.start(streams)
    for look, draws in enumerate(test.looks):
        active = np.flatnonzero(~state.done)
        if not active.size:
            break
        test.observe(state, active, draws - failures[active, look])
    return state, failures[:, -1]


def certify_failures(n: int, threshold: float, alpha: float) -> int:
    """CERTIFY's allowance at n draws: the most failures whose one-sided Clopper–Pearson bound is above the
    threshold, i.e. the largest F with P(Binomial(n, 1 − threshold) ≤ F) ≤ α."""
    failures = np.arange(n + 1)
    return int(failures[binom.cdf(failures, n, 1 - threshold) <= alpha].max())


def band(n: int, allowed: int, rate: float) -> float:
    """The p_A at which CERTIFY at n draws certifies with probability `rate`."""
    return brentq(lambda p: binom.cdf(allowed, n, 1 - p) - rate, 0.5, 1 - 1e-12)


SIGMA, ALPHA, N_MAX = 0.25, 0.001, 10_000


@pytest.mark.parametrize("radius", [0.25, 0.5, 0.75])
def test_spending_design_keeps_certify_power_across_the_band(radius):
    """At p_A where CERTIFY (n = 10,000) certifies 5%, 50% and 95% of images, the sequential test certifies at least
    0.97 times as many on the same streams; the betting design (all of α on the sequence) fails it."""
    threshold = norm.cdf(radius / SIGMA)
    allowed = certify_failures(N_MAX, threshold, ALPHA)
    spending = SequentialTest(SIGMA, [radius], ALPHA, N_MAX)
    # Its allowance at n_max is CERTIFY's (5% of α on the sequence costs no failure here).
    assert spending.most_failures[1] == allowed == {0.25: 1474, 0.5: 182, 0.75: 3}[radius]
    for rate in [0.05, 0.5, 0.95]:
        p = band(N_MAX, allowed, rate)
        state, final = shared_streams(spending, p, 2000, seed=int(1e6 * p))
        sequential, certify = int(state.certified[:, 1].sum()), int((final <= allowed).sum())
        assert sequential >= 0.97 * certify, (radius, rate, sequential, certify)
        assert spending.draws_done(state).mean() < N_MAX  # ... and it still stops some images early
    # Today's design loses about half of them at the middle of the band (measured: 0.15-0.50x).
    betting = SequentialTest(SIGMA, [radius], ALPHA, N_MAX, design="betting")
    state, final = shared_streams(betting, band(N_MAX, allowed, 0.5), 1000, seed=11)
    assert state.certified[:, 1].sum() < 0.6 * (final <= allowed).sum()


def reference_allowance(looks: np.ndarray, early: np.ndarray, threshold: float, alpha: float) -> int:
    """exact_final_allowance by a transition matrix over every failure count (no FFT, no cap)."""
    n_max = int(looks[-1])
    q = 1 - threshold
    law = np.zeros(n_max + 1)
    law[0] = 1.0
    spent, previous = 0.0, 0
    for k, draws in enumerate(looks):
        step = binom.pmf(np.arange(n_max + 1), int(draws) - previous, q)
        law = np.array([law[: f + 1] @ step[f::-1] for f in range(n_max + 1)])
        previous = int(draws)
        if k < len(looks) - 1 and early[k] >= 0:
            spent += law[: early[k] + 1].sum()
            law[: early[k] + 1] = 0.0
    fits = [f for f in range(n_max + 1) if spent + law[: f + 1].sum() <= alpha]
    return max(fits) if fits else -1


@pytest.mark.parametrize("threshold, alpha", [(norm.cdf(2.0), 0.05), (0.9, 0.01), (0.6, 0.05)])
def test_exact_allowance_against_a_direct_computation(threshold, alpha):
    test = SequentialTest(0.25, [], 0.05, 400, first_look=20, growth=1.2)
    early = betting_allowances(test.looks, threshold, alpha / 10)
    # The betting allowances themselves, by scanning the reference wealth.
    for draws, allowed in zip(test.looks[::5], early[::5]):
        certifies = [f for f in range(draws + 1)
                     if log_wealth(LOWER_BETS, draws - f, f, threshold, "lower") >= math.log(10 / alpha)]
        assert allowed == (max(certifies) if certifies else -1)
    exact = exact_final_allowance(test.looks, early, threshold, alpha)
    assert exact == reference_allowance(test.looks, early, threshold, alpha)
    # Spending part of α early leaves the final allowance at or below CERTIFY's, never above.
    assert exact <= certify_failures(400, threshold, alpha)


def test_coverage_at_the_hardest_null_and_a_design_that_spends_alpha_twice_is_caught():
    """p_A exactly at Φ(r/σ): a certificate at r is wrong. α = 0.05, 20,000 streams.

    r is chosen so that CERTIFY's own rate there is α to within 10⁻⁶ (its Clopper–Pearson test is then exact, not
    conservative), so any α spent on top of it shows.
    """
    sigma, alpha, n_max, streams = 0.5, 0.05, 2000, 20_000
    allowed = certify_failures(n_max, 0.97, alpha)
    threshold = brentq(lambda c: binom.cdf(allowed, n_max, 1 - c) - alpha * (1 - 1e-6), 0.9, 0.999)
    radius = sigma * norm.ppf(threshold)
    # The largest rate a level-α method shows in 99.9% of simulations (binomial interval).
    tolerated = binom.ppf(0.999, streams, alpha) / streams
    test = SequentialTest(sigma, [radius], alpha, n_max, sequence_share=0.5)
    assert test.thresholds[1] == pytest.approx(threshold, rel=1e-12)
    state, _ = shared_streams(test, threshold, streams, seed=1)
    wrong = state.certified[:, 1].mean()
    assert wrong <= tolerated, wrong
    # The reported bound is valid at α too.
    assert (state.lower > threshold).mean() <= tolerated
    # Spending α twice: the sequence at α and CERTIFY's allowance at n_max at α as well (no union, no exact test).
    twice = SequentialTest(sigma, [radius], alpha, n_max, sequence_share=0.5)
    twice.sequence_alpha = alpha
    twice.most_failures = np.array([certify_failures(n_max, c, alpha) for c in twice.thresholds])
    state, _ = shared_streams(twice, threshold, streams, seed=1)
    # Its rate is α plus the early certificates that end with too many failures: 0.084 on these streams (the
    # valid design: 0.042).
    assert state.certified[:, 1].mean() > tolerated, state.certified[:, 1].mean()


def test_reported_bound_and_radius_are_those_of_the_split():
    """Early: the betting bound at the sequence's share of α; at n_max: the larger of it and Clopper–Pearson at the
    rest (a union bound)."""
    from robusteval.smoothing.decisions import lower_confidence_bound

    test = SequentialTest(SIGMA, [0.25, 0.5, 0.75], ALPHA, N_MAX)
    assert test.sequence_alpha == pytest.approx(0.05 * ALPHA)
    lower, upper = test.bounds(np.array([9990]), len(test.looks) - 1)
    assert lower[0] == pytest.approx(lower_confidence_bound(9990, N_MAX, 0.95 * ALPHA), rel=1e-9)
    assert upper[0] == betting_bounds(np.array([9990]), np.array([N_MAX]), ALPHA)[1][0]
    early, _ = test.bounds(np.array([500]), 40)
    assert early[0] == betting_bounds(np.array([500]), np.array([test.looks[40]]), 0.05 * ALPHA)[0][0]
    design = test.design()
    assert design["confidence_sequence"] == "betting+exact-at-n_max"
    assert design["alpha_spent"] == [pytest.approx(0.05 * ALPHA), pytest.approx(0.95 * ALPHA)]
    # The betting design writes what runs made before the spending design wrote (they resume unchanged).
    old = SequentialTest(SIGMA, [0.25, 0.5, 0.75], ALPHA, N_MAX, design="betting").design()
    assert old["confidence_sequence"] == "betting" and "alpha_spent" not in old
    with pytest.raises(ValueError, match="design"):
        SequentialTest(SIGMA, [0.25], ALPHA, N_MAX, design="clopper")
    with pytest.raises(ValueError, match="sequence_share"):
        SequentialTest(SIGMA, [0.25], ALPHA, N_MAX, sequence_share=1.0)


class ExtraColumnLater(JointModel):
    """Declares two classes but its logits have a third column, which wins from the `switch`-th pass on."""

    capabilities = frozenset({"logits"})
    name = "extra-column"

    def __init__(self, switch: int):
        super().__init__()
        self.num_classes, self.input_shape = 2, (1, 8, 8)
        self.switch, self.calls = switch, 0
        self.scale = torch.nn.Parameter(torch.ones(()))

    def _logits(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros((x.shape[0], 3), dtype=x.dtype) * self.scale
        logits[:, 2 if self.calls >= self.switch else 0] = 1.0
        return logits


@pytest.mark.parametrize("method", ["cohen", "sequential"])
def test_a_class_out_of_range_on_a_later_pass_is_refused_naming_the_model(method):
    from robusteval.smoothing.engine import certify
    from robusteval.smoothing.sampler import PredictionOutOfRange

    x, y = torch.rand((6, 1, 8, 8)), torch.zeros(6, dtype=torch.int64)
    sizes = {"n": 400} if method == "cohen" else {"n_max": 400, "radii": [0.25]}
    # Sanity: without the extra column winning, every image is certified as class 0.
    records = certify(ExtraColumnLater(switch=10**9), (x, y), sigma=0.25, n0=10, method=method, batch_size=100,
                      compile=False, **sizes).records
    assert all(r["prediction"] == 0 for r in records)
    model = ExtraColumnLater(switch=3)
    with pytest.raises(PredictionOutOfRange, match=r"model 'extra-column'.*from 0 to 2.*below 2"):
        certify(model, (x, y), sigma=0.25, n0=10, method=method, batch_size=100, compile=False, **sizes)
    assert model.calls >= 3  # the first passes were valid: it is a later pass that is refused
