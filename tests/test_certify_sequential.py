"""Sequential certification on a radius grid: the confidence sequence, its α-spending and the stopping rule.

Simulations are of Bernoulli(p_A) streams, the exact law of the estimation
draws given ĉ; they run the state machine the engine drives.
"""

import math

import numpy as np
import pytest
from scipy.stats import binom, norm
from statsmodels.stats.proportion import proportion_confint

from robusteval.smoothing.sequential import SequentialTest, clopper_pearson, look_schedule, spend_alpha


def simulate(test: SequentialTest, p: float | np.ndarray, streams: int, seed: int = 0):
    """Run `streams` Bernoulli(p) streams through the state machine until all stop; return the state."""
    rng = np.random.default_rng(seed)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (streams,))
    state = test.start(streams)
    successes = np.zeros(streams, dtype=np.int64)
    rounds = 0
    while not state.done.all():
        active = np.flatnonzero(~state.done)
        needed = test.draws_needed(state)[active]
        assert np.all(needed > 0)
        successes[active] += rng.binomial(needed, p[active])
        test.observe(state, active, successes[active])
        rounds += 1
        assert rounds <= len(test.looks)
    return state


def tolerated_failures(streams: int, alpha: float) -> int:
    """The most failures a method that misses with probability α shows in 99.9% of simulations."""
    return int(binom.ppf(0.999, streams, alpha))


def test_look_schedule_is_geometric_and_ends_at_n_max():
    assert look_schedule(1000, 100, 2.0).tolist() == [100, 200, 400, 800, 1000]
    assert look_schedule(800, 100, 2.0).tolist() == [100, 200, 400, 800]
    assert look_schedule(50, 100, 2.0).tolist() == [50]
    assert look_schedule(1000, 10, 1.5).tolist()[:5] == [10, 15, 22, 34, 51]  # rounded, never repeated
    looks = look_schedule(100_000)
    assert looks[0] == 100 and looks[-1] == 100_000 and np.all(np.diff(looks) > 0)
    for bad in [dict(n_max=0), dict(n_max=10, first_look=0), dict(n_max=10, growth=1.0)]:
        with pytest.raises(ValueError):
            look_schedule(**bad)


def test_alpha_is_spent_half_at_the_last_look():
    spent = spend_alpha(0.001, 5)
    assert spent.sum() == pytest.approx(0.001, rel=1e-12)
    assert spent[-1] == pytest.approx(0.0005) and np.allclose(spent[:-1], 0.000125)
    assert spend_alpha(0.01, 1).tolist() == [0.01]
    with pytest.raises(ValueError):
        spend_alpha(1.0, 3)


@pytest.mark.parametrize("n", [1, 7, 100, 10_000])
def test_bounds_are_one_sided_clopper_pearson(n):
    a = 0.0004
    counts = np.array(sorted({0, 1, n // 3, n // 2, n - 1, n}))
    lower, upper = clopper_pearson(counts, np.full(len(counts), n), a)
    for count, lo, up in zip(counts, lower, upper):
        # Each side of the two-sided exact interval at level 2a is the one-sided bound at level a.
        ref_lo, ref_up = proportion_confint(int(count), n, alpha=2 * a, method="beta")
        assert lo == pytest.approx(0.0 if count == 0 else ref_lo, abs=1e-10)
        assert up == pytest.approx(1.0 if count == n else ref_up, abs=1e-10)
    # All draws agree: the lower bound solves p^n = a.
    assert lower[-1] == pytest.approx(a ** (1 / n), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.001])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999, 0.9999])
def test_confidence_sequence_covers_p_at_every_look(alpha, p):
    """P(∃ look: p ∉ [L_k, U_k]) ≤ α over 20,000 simulated streams; the check detects a method missing more."""
    test = SequentialTest(0.25, [0.25], alpha, n_max=10_000)
    streams = 20_000
    rng = np.random.default_rng(int(p * 1e4) + int(alpha * 1e4))
    increments = np.diff(np.concatenate([[0], test.looks]))
    successes = np.cumsum(rng.binomial(increments, p, size=(streams, len(increments))), axis=1)
    lower, upper = clopper_pearson(successes, test.looks, test.look_alpha / 2)
    missed = ((lower > p) | (upper < p)).any(axis=1)
    assert missed.sum() <= tolerated_failures(streams, alpha), missed.mean()
    # The running intersection the state machine keeps covers on the same event.
    running_lower, running_upper = np.maximum.accumulate(lower, axis=1), np.minimum.accumulate(upper, axis=1)
    assert np.array_equal(((running_lower > p) | (running_upper < p)).any(axis=1), missed)
    if p <= 0.99:
        # Spending the whole α at every look (no union bound) misses far more often; the simulation sees it.
        naive_lower, naive_upper = clopper_pearson(successes, test.looks, alpha / 2)
        naive_missed = ((naive_lower > p) | (naive_upper < p)).any(axis=1)
        assert naive_missed.sum() > tolerated_failures(streams, alpha)


def test_certain_image_stops_at_the_first_look_whose_bound_clears_the_largest_radius():
    sigma, alpha, n_max = 0.25, 0.001, 100_000
    radii = [0.25, 0.5, 0.75]
    test = SequentialTest(sigma, radii, alpha, n_max)
    looks = [100, 150, 225, 338, 506, 759, 1139, 1709, 2563, 3844, 5767, 8650, 12975, 19462, 29193, 43789, 65684,
             98526, 100_000]
    assert test.looks.tolist() == looks
    # Independently: with all n_k draws successes the lower bound is a_k^(1/n_k), a_k = α / (2(K − 1)) / 2.
    side = [alpha / (2 * (len(looks) - 1)) / 2] * (len(looks) - 1) + [alpha / 4]
    target = norm.cdf(0.75 / sigma)
    passing = [k for k, n in enumerate(looks) if side[k] ** (1 / n) > target]
    first = passing[0]
    assert looks[first] == 8650  # p = 1 certifies r = 0.75 at σ = 0.25 after 8,650 draws, not 100,000
    assert side[first - 1] ** (1 / looks[first - 1]) < target - 1e-5  # no round-off at the boundary
    state = simulate(test, 1.0, 5)
    assert np.all(test.draws_done(state) == looks[first])
    outcome = test.outcome(state, 0)
    assert outcome.certified == (True, True, True, True) and outcome.largest_certified_radius == 0.75
    assert outcome.pA_lower == pytest.approx(side[first] ** (1 / looks[first]), rel=1e-12)
    assert outcome.radius == pytest.approx(sigma * norm.ppf(outcome.pA_lower), rel=1e-12) and outcome.radius > 0.75


def test_radius_beyond_the_budget_does_not_keep_a_certain_image_running():
    # r = 2 at σ = 0.25 needs p_A > Φ(8): no count below 100,000 draws can show it, so it is decided at once.
    test = SequentialTest(0.25, [0.25, 0.5, 0.75, 2.0], 0.001, 100_000)
    state = simulate(test, 1.0, 3)
    assert np.all(test.draws_done(state) == 8650)
    outcome = test.outcome(state, 0)
    assert outcome.certified == (True, True, True, True, False) and outcome.largest_certified_radius == 0.75


def test_image_at_a_threshold_runs_to_n_max():
    sigma, alpha = 0.25, 0.001
    threshold = norm.cdf(0.5 / sigma)
    test = SequentialTest(sigma, [0.25, 0.5, 0.75], alpha, n_max=29_193)
    assert test.looks[-2:].tolist() == [19_462, 29_193]
    state = simulate(test, threshold, 500, seed=3)
    # Stopping earlier needs the sequence to miss p_A on one side: probability at most α per image.
    assert np.mean(test.draws_done(state) == 29_193) >= 0.99
    assert all(test.outcome(state, i).certified[:2] == (True, True) for i in range(500))
    # ... whereas images far from every threshold stop early.
    far = simulate(test, 0.93, 500, seed=4)
    assert np.median(test.draws_done(far)) <= 2563


def test_image_at_a_threshold_stops_where_the_rest_of_the_budget_cannot_decide_it():
    sigma, alpha = 0.25, 0.001
    threshold = norm.cdf(0.5 / sigma)
    test = SequentialTest(sigma, [0.25, 0.5, 0.75], alpha, n_max=20_000)
    assert test.looks[-2:].tolist() == [19_462, 20_000]
    state = simulate(test, threshold, 200, seed=3)
    draws = test.draws_done(state)
    assert np.mean(draws == 19_462) >= 0.99
    # Even 538 successes out of the last 538 draws could not lift the final lower bound above Φ(0.5/σ).
    for i in np.flatnonzero(draws == 19_462):
        best = test.bounds(np.array([state.successes[i] + 538]), len(test.looks) - 1)[0][0]
        assert best <= threshold and state.lower[i] <= threshold <= state.upper[i]


def test_no_radius_above_the_exact_one_is_certified_beyond_the_alpha_rate():
    """The smoothed linear classifier sign(w·x + b): p_A = Φ(d/σ) with d the exact radius.

    Images sit just inside each grid radius (d slightly below r, the hardest
    case for soundness); a certificate at r is then wrong, and must happen at
    most at rate α per image.
    """
    sigma, alpha, n_max = 0.5, 0.05, 20_000
    radii = np.array([0.25, 0.5, 0.75, 1.0])
    test = SequentialTest(sigma, radii, alpha, n_max)
    per_radius = 4000
    exact = np.repeat(radii, per_radius) * np.tile([0.999, 0.99, 0.98, 0.95], per_radius)
    state = simulate(test, norm.cdf(exact / sigma), len(exact), seed=5)
    wrong = wrong_certificates(test, state, exact)
    assert wrong <= tolerated_failures(len(exact), alpha), wrong / len(exact)
    for image in range(0, len(exact), 997):
        outcome = test.outcome(state, image)
        assert outcome.certified == tuple(state.lower[image] > test.thresholds)
        if outcome.certified[0]:
            assert outcome.radius >= outcome.largest_certified_radius
    # A test without the union bound over looks (full α at every look) is caught by the same check.
    naive = SequentialTest(sigma, radii, alpha, n_max)
    naive.look_alpha = np.full(len(naive.looks), alpha)
    naive_state = simulate(naive, norm.cdf(exact / sigma), len(exact), seed=5)
    assert wrong_certificates(naive, naive_state, exact) > tolerated_failures(len(exact), alpha)


def wrong_certificates(test: SequentialTest, state, exact: np.ndarray) -> int:
    """Images certified at some grid radius above their exact radius."""
    certified = state.lower[:, None] > test.thresholds[None, :]
    return int((certified & (test.radii[None, :] > exact[:, None])).any(axis=1).sum())


def test_state_machine_steps_look_by_look():
    test = SequentialTest(0.5, [0.5], 0.01, n_max=1000, first_look=100, growth=2.0)
    assert test.looks.tolist() == [100, 200, 400, 800, 1000]
    state = test.start(3)
    assert test.draws_needed(state).tolist() == [100, 100, 100]
    test.observe(state, np.array([0, 2]), np.array([100, 60]))
    assert test.draws_needed(state).tolist() == [0, 100, 100]  # image 0 is certified at r = 0.5 and stops
    assert state.done.tolist() == [True, False, False]
    lower, upper = clopper_pearson(np.array([60]), np.array([100]), 0.01 / 8 / 2)
    assert state.lower[2] == pytest.approx(lower[0]) and state.upper[2] == pytest.approx(upper[0])
    with pytest.raises(ValueError, match="stopped"):
        test.observe(state, np.array([0]), np.array([200]))
    with pytest.raises(ValueError, match="grow"):
        test.observe(state, np.array([2]), np.array([59]))  # fewer successes than before
    with pytest.raises(ValueError, match="grow"):
        test.observe(state, np.array([2]), np.array([161]))  # more successes than draws
    # The running bounds never widen: a look whose interval is wider keeps the earlier one.
    test.observe(state, np.array([2]), np.array([60 + 50]))
    assert state.lower[2] >= lower[0] and state.upper[2] <= upper[0]
    outcome = test.outcome(state, 0)
    assert outcome.draws == 100 and outcome.successes == 100 and outcome.largest_certified_radius == 0.5
    abstaining = simulate(test, 0.3, 2)
    result = test.outcome(abstaining, 0)
    assert result.abstain and result.radius == 0.0 and result.largest_certified_radius is None
    assert result.pA_upper < 0.5 and result.draws < 1000


def test_bad_designs_are_rejected():
    with pytest.raises(ValueError, match="sigma"):
        SequentialTest(0.0, [0.25], 0.001, 1000)
    with pytest.raises(ValueError, match="radii"):
        SequentialTest(0.25, [-0.25], 0.001, 1000)
    with pytest.raises(ValueError, match="alpha"):
        SequentialTest(0.25, [0.25], 0.0, 1000)
    with pytest.raises(ValueError, match="n_max"):
        SequentialTest(0.25, [0.25], 0.001, 0)
    assert SequentialTest(0.25, [0.5, 0.25, 0.5], 0.001, 1000).radii.tolist() == [0.0, 0.25, 0.5]
    assert math.isclose(SequentialTest(0.25, [], 0.001, 1000).thresholds[0], 0.5)
