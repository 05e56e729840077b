"""Sequential certification on a radius grid: the betting confidence sequence and the stopping rule (betting design).

Simulations are of Bernoulli(p_A) streams, the exact law of the estimation
draws given ĉ; they run the state machine the engine drives.
"""

import math

import numpy as np
import pytest
from scipy.stats import beta, binom, norm

from robusteval.smoothing.sequential import (
    LOWER_BETS,
    UPPER_BETS,
    BettingMixture,
    SequentialTest,
    betting_bounds,
    log_wealth,
    look_schedule,
)


def betting_test(*args, **options) -> SequentialTest:
    """The betting design (all of α on the confidence sequence), which these tests pin down; the spending design,
    the default, is tested in test_certify_sequential_power.py."""
    return SequentialTest(*args, design="betting", **options)


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
    # 3% apart but at least min_step draws: +10 while 3% is less, then geometric.
    assert look_schedule(1000, 100, 1.03, 10).tolist()[:3] == [100, 110, 120]
    looks = look_schedule(100_000, 100, 1.03, 10)
    assert all(b == max(round(1.03 * a), a + 10) for a, b in zip(looks[:-2], looks[1:-1]))
    assert looks[-1] == 100_000 and looks[-2] < 100_000 <= max(round(1.03 * looks[-2]), looks[-2] + 10)
    assert look_schedule(1000, 100, 2.0, 300).tolist() == [100, 400, 800, 1000]
    assert look_schedule(800, 100, 2.0).tolist() == [100, 200, 400, 800]
    assert look_schedule(50, 100, 2.0).tolist() == [50]
    assert look_schedule(1000, 10, 1.5, 1).tolist()[:5] == [10, 15, 22, 33, 50]  # rounded, never repeated
    looks = look_schedule(100_000)
    assert looks[0] == 100 and looks[-1] == 100_000 and np.all(np.diff(looks) > 0)
    for bad in [dict(n_max=0), dict(n_max=10, first_look=0), dict(n_max=10, growth=1.0),
                dict(n_max=10, min_step=0)]:
        with pytest.raises(ValueError):
            look_schedule(**bad)


def log_wealth_reference(bets: BettingMixture, successes: int, failures: int, c: float, side: str) -> float:
    """log E(c) written out term by term, independently of the vectorised code."""
    terms = []
    for mu, w in zip(bets.stakes, bets.weights):
        win, lose = (successes, failures) if side == "lower" else (failures, successes)
        odds = (1 - c) / c if side == "lower" else c / (1 - c)
        if lose and mu == 1.0:
            continue  # a single loss at the all-in stake loses everything
        terms.append(math.log(w) + win * math.log(1 + mu * odds) + (lose * math.log(1 - mu) if lose else 0.0))
    if not terms:
        return -math.inf
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def wealth(bets: BettingMixture, successes: int, failures: int, c: float, side: str) -> float:
    return math.exp(log_wealth_reference(bets, successes, failures, c, side))


@pytest.mark.parametrize("side, bets", [("lower", LOWER_BETS), ("upper", UPPER_BETS)])
@pytest.mark.parametrize("c", [0.3, 0.5, 0.84, 0.977, 0.99865])
def test_wealth_is_a_fair_bet_at_p_and_monotone_in_the_threshold(side, bets, c):
    # One draw at p_A = c: the expected wealth is exactly 1 (a martingale), for every stake and so the mixture.
    fair = c * wealth(bets, 1, 0, c, side) + (1 - c) * wealth(bets, 0, 1, c, side)
    assert fair == pytest.approx(1.0, rel=1e-12)
    for s, f in [(0, 0), (5, 0), (37, 3), (0, 4), (150, 20)]:
        assert float(log_wealth(bets, np.array(s), np.array(f), np.array(c), side)) == pytest.approx(
            log_wealth_reference(bets, s, f, c, side), rel=1e-10, abs=1e-10)
    grid = np.linspace(0.05, 0.999, 200)
    values = log_wealth(bets, np.full(200, 60), np.full(200, 5), grid, side)
    # E⁺ falls with c, E⁻ rises: what lets one e-process decide every grid radius without a union bound.
    assert np.all(np.diff(values) <= 1e-12) if side == "lower" else np.all(np.diff(values) >= -1e-12)


def test_betting_mixtures_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        BettingMixture((0.5, 0.2), (0.5, 0.6))
    with pytest.raises(ValueError, match="stakes"):
        BettingMixture((1.5,), (1.0,))
    with pytest.raises(ValueError, match="one weight"):
        BettingMixture((0.5, 0.2), (1.0,))


@pytest.mark.parametrize("n", [1, 7, 100, 10_000])
def test_bounds_invert_the_tests_and_all_successes_match_the_closed_form(n):
    alpha = 0.001
    counts = np.array(sorted({0, 1, n // 3, n // 2, n - 1, n}))
    lower, upper = betting_bounds(counts, np.full(len(counts), n), alpha)
    for count, lo, up in zip(counts, lower, upper):
        assert 0.0 <= lo <= count / n <= up <= 1.0
        # Just inside each bound the test does not reject; just outside (by the bisection's tolerance) it does.
        level = math.log(1 / alpha)
        if lo > 1e-9:
            assert log_wealth_reference(LOWER_BETS, count, n - count, lo, "lower") >= level - 1e-9
            assert log_wealth_reference(LOWER_BETS, count, n - count, min(lo + 1e-9, 1 - 1e-12), "lower") < level
        if up < 1 - 1e-9:
            assert log_wealth_reference(UPPER_BETS, count, n - count, up, "upper") >= level - 1e-9
            assert log_wealth_reference(UPPER_BETS, count, n - count, up - 1e-9, "upper") < level
    # All draws agree: no valid bound beats Clopper–Pearson at a fixed n, α^(1/n) (E⁺ ≤ c^(−n)), and the half
    # weight on the all-in stake gets within a factor 2 in α of it.
    assert (alpha / 2) ** (1 / n) - 1e-12 <= lower[-1] <= alpha ** (1 / n)
    assert upper[-1] == 1.0 and lower[0] == 0.0


@pytest.mark.parametrize("alpha", [0.05, 0.001])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999, 0.9999])
def test_confidence_sequence_covers_p_at_every_look(alpha, p):
    """Each side misses p_A at some look with probability ≤ α (20,000 simulated streams at the design's looks);
    the same check catches Clopper–Pearson at full α at every look."""
    test = betting_test(0.25, [0.25], alpha, n_max=10_000)
    streams = 20_000
    rng = np.random.default_rng(int(p * 1e4) + int(alpha * 1e4))
    increments = np.diff(np.concatenate([[0], test.looks]))
    successes = np.cumsum(rng.binomial(increments, p, size=(streams, len(increments))), axis=1)
    failures = test.looks[None, :] - successes
    level = math.log(1 / alpha)
    # A bound misses p exactly when the test at c = p rejects (the bounds invert the tests).
    low_missed = (log_wealth(LOWER_BETS, successes, failures, np.array(p), "lower") >= level).any(axis=1)
    high_missed = (log_wealth(UPPER_BETS, successes, failures, np.array(p), "upper") >= level).any(axis=1)
    assert low_missed.sum() <= tolerated_failures(streams, alpha), low_missed.mean()
    assert high_missed.sum() <= tolerated_failures(streams, alpha), high_missed.mean()
    if p <= 0.99:
        # Spending the whole α at every look without a union bound misses far more often; the simulation sees it.
        naive_lower = beta.ppf(alpha, np.maximum(successes, 1), failures + 1)
        naive_missed = ((successes > 0) & (naive_lower > p)).any(axis=1)
        assert naive_missed.sum() > tolerated_failures(streams, alpha)


def test_certain_image_stops_at_the_first_look_whose_bet_clears_the_largest_radius():
    sigma, alpha, n_max = 0.25, 0.001, 100_000
    radii = [0.25, 0.5, 0.75]
    test = betting_test(sigma, radii, alpha, n_max)
    looks = test.looks.tolist()
    assert looks[:4] == [100, 110, 120, 130] and looks[-1] == n_max and np.all(np.diff(looks) > 0)
    target = norm.cdf(0.75 / sigma)
    # Independently: the first look where the mixture's wealth at Φ(0.75/σ) after n_k successes reaches 1/α.
    first = next(k for k, n in enumerate(looks) if wealth(LOWER_BETS, n, 0, target, "lower") >= 1 / alpha)
    # Bracketed by theory: no bet beats the fixed-n Clopper–Pearson count; the all-in half alone needs ln(2/α).
    assert math.log(1 / alpha) / -math.log(target) <= looks[first] <= math.log(2 / alpha) / -math.log(target) * 1.03
    assert looks[first] < 6_000  # p = 1 certifies r = 0.75 at σ = 0.25 after ~5,500 draws, not 100,000
    state = simulate(test, 1.0, 5)
    assert np.all(test.draws_done(state) == looks[first])
    outcome = test.outcome(state, 0)
    assert outcome.certified == (True, True, True, True) and outcome.largest_certified_radius == 0.75
    assert outcome.pA_lower == pytest.approx(betting_bounds(np.array([looks[first]]), np.array([looks[first]]),
                                                            alpha)[0][0], rel=1e-12)
    assert outcome.pA_lower > target
    assert outcome.radius == pytest.approx(sigma * norm.ppf(outcome.pA_lower), rel=1e-12) and outcome.radius > 0.75


def test_radius_beyond_the_budget_does_not_keep_a_certain_image_running():
    # r = 2 at σ = 0.25 needs p_A > Φ(8): no count below 100,000 draws can show it, so it is decided at once.
    test = betting_test(0.25, [0.25, 0.5, 0.75, 2.0], 0.001, 100_000)
    state = simulate(test, 1.0, 3)
    plain = simulate(betting_test(0.25, [0.25, 0.5, 0.75], 0.001, 100_000), 1.0, 3)
    assert np.all(test.draws_done(state) == test.draws_done(plain)) and test.draws_done(state)[0] < 6_000
    outcome = test.outcome(state, 0)
    assert outcome.certified == (True, True, True, True, False) and outcome.largest_certified_radius == 0.75


def test_image_at_a_threshold_runs_until_the_budget_cannot_decide_it():
    sigma, alpha, n_max = 0.25, 0.001, 20_000
    threshold = norm.cdf(0.5 / sigma)
    # Without giving up (the confidence sequence alone); giving up is tested below.
    test = betting_test(sigma, [0.25, 0.5, 0.75], alpha, n_max=n_max, futility=0)
    state = simulate(test, threshold, 300, seed=3)
    draws = test.draws_done(state)
    # Stopping before the budget runs out needs a test at the true p_A to reject: probability ≤ α per side.
    early = [i for i in range(300) if draws[i] < n_max]
    for i in early:
        successes = state.successes[i]
        decided = state.certified[i, 2] or state.refuted[i, 2]
        # ... or r = 0.5 out of reach: even all successes up to n_max leave E⁺(Φ(0.5/σ)) below 1/α.
        reachable = wealth(LOWER_BETS, successes + n_max - draws[i], draws[i] - successes, threshold,
                           "lower") >= 1 / alpha
        assert decided or not reachable
    assert np.mean([state.certified[i, 2] or state.refuted[i, 2] for i in range(300)]) <= 0.01
    assert np.median(draws) >= 0.7 * n_max
    assert all(test.outcome(state, i).certified[:2] == (True, True) for i in range(300))
    # ... whereas images far from every threshold stop early.
    far = simulate(test, 0.93, 500, seed=4)
    assert np.median(test.draws_done(far)) <= 1500


def run_streams(test: SequentialTest, cumulative: np.ndarray):
    """Run fixed Bernoulli streams (cumulative success counts, one row per image) through the state machine, so
    that two designs see the same draws."""
    state = test.start(cumulative.shape[0])
    while not state.done.all():
        active = np.flatnonzero(~state.done)
        reached = test.draws_done(state)[active] + test.draws_needed(state)[active]
        test.observe(state, active, cumulative[active, reached - 1])
    return state


def test_giving_up_stops_images_below_a_threshold_early_and_loses_almost_no_certificate():
    sigma, alpha, n_max, streams = 0.25, 0.001, 10_000, 1000
    on = betting_test(sigma, [0.25, 0.5, 0.75], alpha, n_max)
    off = betting_test(sigma, [0.25, 0.5, 0.75], alpha, n_max, futility=0)
    threshold = norm.cdf(0.5 / sigma)
    rng = np.random.default_rng(6)
    for p in [0.97, threshold, 0.98, 0.982, 0.984]:
        cumulative = np.cumsum(rng.random((streams, n_max)) < p, axis=1)
        given_up, kept_on = run_streams(on, cumulative), run_streams(off, cumulative)
        # Same draws: giving up only ever ends an image sooner, so it never certifies what drawing on would not.
        assert not (given_up.certified & ~kept_on.certified).any()
        lost = int((kept_on.certified & ~given_up.certified).any(axis=1).sum())
        # The guarantee: lost with probability at most γ + δ; the design loses far fewer (0-3 in 1,000 here).
        assert lost <= tolerated_failures(streams, on.futility + on.futility_alpha)
        assert lost <= 0.01 * streams, (p, lost)
        draws_on, draws_off = on.draws_done(given_up).mean(), off.draws_done(kept_on).mean()
        assert draws_on <= draws_off
        if p <= threshold:  # r = 0.5 cannot be certified: most of the budget was spent to learn it
            assert draws_on <= 0.6 * draws_off, (p, draws_on, draws_off)
    assert on.design()["futility"] == {"chance": 0.02, "alpha": 0.05} and "futility" not in off.design()


def test_a_radius_is_given_up_when_its_chance_at_the_upper_bound_falls_below_the_futility():
    """Every look of every stream, against an independent computation of the rule.

    F_c (the most failures a certificate at n_max allows) by scanning failure counts with the reference
    wealth; U_γ from the upper betting bound at level γ; the chance that the draws left add at most F_c − F
    failures is the binomial CDF at 1 − U_γ.
    """
    sigma, alpha, n_max = 0.25, 0.001, 3000
    test = betting_test(sigma, [0.5], alpha, n_max)
    threshold = norm.cdf(0.5 / sigma)
    scanned = [max(f for f in range(n_max + 1)
                   if log_wealth_reference(LOWER_BETS, n_max - f, f, c, "lower") >= math.log(1 / alpha))
               for c in (0.5, threshold)]
    assert test.most_failures.tolist() == scanned
    most = scanned[1]
    rng = np.random.default_rng(7)
    cumulative = np.cumsum(rng.random((60, n_max)) < np.repeat([0.97, 0.975, 0.98], 20)[:, None], axis=1)
    state = test.start(60)
    given_up = 0
    while not state.done.all():
        active = np.flatnonzero(~state.done)
        reached = test.draws_done(state)[active] + test.draws_needed(state)[active]
        successes = cumulative[active, reached - 1]
        test.observe(state, active, successes)
        for image, n, s in zip(active, reached, successes):
            if state.certified[image].all() or state.refuted[image, 1] or n == n_max or n - s > most:
                continue  # decided, or at the budget, or out of reach: not the rule under test
            upper = betting_bounds(np.array([s]), np.array([n]), test.futility_alpha)[1][0]
            chance = binom.cdf(most - (n - s), n_max - n, 1 - upper)
            if abs(chance - test.futility) > 1e-6:
                assert state.done[image] == (chance < test.futility), (n, s, chance)
            given_up += int(state.done[image])
    assert given_up >= 20  # most images at p_A ≤ Φ(2) are given up before n_max


def test_no_radius_above_the_exact_one_is_certified_beyond_the_alpha_rate():
    """The smoothed linear classifier sign(w·x + b): p_A = Φ(d/σ) with d the exact radius.

    Images sit just inside each grid radius (d slightly below r, the hardest
    case for soundness); a certificate at r is then wrong, and must happen at
    most at rate α per image.
    """
    sigma, alpha, n_max = 0.5, 0.05, 20_000
    radii = np.array([0.25, 0.5, 0.75, 1.0])
    test = betting_test(sigma, radii, alpha, n_max)
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
    # An invalid design is caught by the same check: every stake at full weight (the best bet in hindsight,
    # weights summing to 11, not 1).
    greedy = object.__new__(BettingMixture)
    object.__setattr__(greedy, "stakes", LOWER_BETS.stakes)
    object.__setattr__(greedy, "weights", (1.0,) * len(LOWER_BETS.stakes))
    naive = betting_test(sigma, radii, alpha, n_max, lower_bets=greedy)
    naive_state = simulate(naive, norm.cdf(exact / sigma), len(exact), seed=5)
    assert wrong_certificates(naive, naive_state, exact) > tolerated_failures(len(exact), alpha)


def wrong_certificates(test: SequentialTest, state, exact: np.ndarray) -> int:
    """Images certified at some grid radius above their exact radius."""
    certified = state.certified
    return int((certified & (test.radii[None, :] > exact[:, None])).any(axis=1).sum())


def test_state_machine_steps_look_by_look():
    test = betting_test(0.5, [0.5], 0.01, n_max=1000, first_look=100, growth=2.0)
    assert test.looks.tolist() == [100, 200, 400, 800, 1000]
    state = test.start(3)
    assert test.draws_needed(state).tolist() == [100, 100, 100]
    test.observe(state, np.array([0, 2]), np.array([100, 60]))
    assert test.draws_needed(state).tolist() == [0, 100, 100]  # image 0 is certified at r = 0.5 and stops
    assert state.done.tolist() == [True, False, False]
    # 60 of 100 is far below Φ(1) = 0.84: r = 0.5 is refuted at once (radius 0 is still open), so the look's
    # bounds are kept.
    assert state.refuted[2].tolist() == [False, True] and not state.certified[2].any()
    lower, upper = betting_bounds(np.array([60]), np.array([100]), 0.01)
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
    # Given up at the first look (a 1/2 majority by 1,000 draws is out of sight at 32/100) ...
    assert result.draws == 100 and result.successes == 32 and result.pA_upper > 0.5
    # ... which without giving up takes until the upper bound falls below 1/2.
    drawing_on = betting_test(0.5, [0.5], 0.01, n_max=1000, first_look=100, growth=2.0, futility=0)
    result = drawing_on.outcome(simulate(drawing_on, 0.3, 2), 0)
    assert result.abstain and result.pA_upper < 0.5 and result.draws < 1000


def test_bad_designs_are_rejected():
    with pytest.raises(ValueError, match="sigma"):
        betting_test(0.0, [0.25], 0.001, 1000)
    with pytest.raises(ValueError, match="radii"):
        betting_test(0.25, [-0.25], 0.001, 1000)
    with pytest.raises(ValueError, match="alpha"):
        betting_test(0.25, [0.25], 0.0, 1000)
    with pytest.raises(ValueError, match="n_max"):
        betting_test(0.25, [0.25], 0.001, 0)
    for bad in [dict(futility=1.0), dict(futility=-0.1), dict(futility_alpha=0.0)]:
        with pytest.raises(ValueError, match="futility"):
            betting_test(0.25, [0.25], 0.001, 1000, **bad)
    assert betting_test(0.25, [0.5, 0.25, 0.5], 0.001, 1000).radii.tolist() == [0.0, 0.25, 0.5]
    assert math.isclose(betting_test(0.25, [], 0.001, 1000).thresholds[0], 0.5)
