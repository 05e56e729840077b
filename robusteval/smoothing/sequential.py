"""Sequential certification on a radius grid: stop drawing noise once every grid radius is decided.

CERTIFY (Cohen et al. 2019) spends n estimation draws on every image, but a
leaderboard only asks "is this image certified at r = 0.25, 0.5, ...?". With
p_A the probability that the base classifier returns the class ĉ picked by the
n0 selection draws, the smoothed classifier is certified at radius r exactly
when p_A > Φ(r/σ), so each grid radius is a test of p_A against a threshold,
and most images settle every test long before n draws.

Method (a betting confidence sequence for p_A, checked at a fixed schedule of looks, and in the default
"spending" design an exact test at n_max that spends what the sequence leaves of α):

- Bets. For a threshold c, a gambler who starts with wealth 1 and stakes a
  fraction μ ∈ (0, 1] on each draw x ∈ {0, 1} (1: the draw returns ĉ) ends
  with the wealth
      lower side (against "p_A ≤ c"):  W⁺_μ(c) = (1 + μ(1 − c)/c)^S · (1 − μ)^F,
      upper side (against "p_A ≥ c"):  W⁻_μ(c) = (1 − μ)^S · (1 + μc/(1 − c))^F,
  after S successes and F failures. Under p_A = c every draw multiplies the
  wealth by 1 in expectation, so W(p_A) is a non-negative martingale, and so
  is a mixture E(c) = Σ_j w_j W_μj(c) over a fixed grid of stakes with
  weights Σ w_j = 1 (`LOWER_BETS`, `UPPER_BETS`). W⁺ falls and W⁻ rises with
  c, so the mixtures are monotone in c.
- Bounds. At a look with S successes among n draws, the lower bound is
  L = inf{c : E⁺(c) < 1/α} and the upper bound U = sup{c : E⁻(c) < 1/α}
  (both by bisection, rounded to the safe side). Decisions need only E at
  the thresholds; the bounds are computed at the looks that decide a radius
  and at the last one, and their running intersection [max L, min U] is
  reported.
- Guarantee. By Ville's inequality P(sup_n E⁺_n(p_A) ≥ 1/α) ≤ α. A radius r is
  certified only when L > Φ(r/σ), i.e. E⁺(Φ(r/σ)) ≥ 1/α at some look, and if
  Φ(r/σ) ≥ p_A that implies E⁺(p_A) ≥ 1/α (monotonicity). So the probability
  that any grid radius is wrongly certified at any look, hence at the
  data-dependent look where the image stops, is at most α per image: CERTIFY's
  guarantee, with no price for looking often (no union bound over looks or
  radii). This is the "betting" design; the default spends α differently
  (below). Symmetrically, a radius is wrongly declared not certifiable (an
  abstention at that radius, never a wrong certificate) with probability at
  most α. The radius σ·Φ⁻¹(L) at the stop is a valid certificate as well (at
  least the largest certified grid radius). Conditional on ĉ the estimation
  draws are fresh i.i.d. Bernoulli(p_A), since the n0 selection draws are a
  separate stream.
- Spending design (the default). All of α on the betting sequence costs
  power where CERTIFY is strong: at n_max the mixture allows fewer failures
  than CERTIFY's Clopper–Pearson test at the same n (r = 0.75, σ = 0.25,
  n = 10,000: 1 against 3), and images near a threshold lose half their
  certificates. So the sequence certifies early at a share α_seq of α (5%,
  `sequence_share`), and at n_max a threshold c is certified with at most
  a(c) failures, the largest count for which
      P_c(the sequence certifies c at some look before n_max, or at most
          a(c) failures among the n_max draws) ≤ α,
  computed exactly (`exact_final_allowance`: the law of the failure count
  is propagated from look to look and the mass that certified early taken
  out). Both events only shrink as p_A falls (more failures on a coupled
  stream), so certifying c is wrong with probability ≤ α for every p_A ≤ c;
  a(c) is made non-increasing along the grid, so certifying a radius
  certifies every smaller one and the guarantee holds for the grid at once.
  The early certificates cost α only where they do not end within the
  allowance anyway, so a(c) is CERTIFY's count at r = 0.25, 0.5 and 0.75
  (σ = 0.25, α = 0.001, n = 10,000). The reported lower bound is the
  betting bound at α_seq, and at n_max the larger of it and the one-sided
  Clopper–Pearson bound at α − α_seq: valid at α by a union bound. It is a
  bound on p_A, not on the grid: at n_max an image certified at r with
  exactly a(c) failures may report a radius σΦ⁻¹(L) a little below r (the
  grid decision, largest_certified_radius, is the test above).
- Looks. The draws are examined at the cumulative counts n_1 = first_look,
  n_(k+1) = max(round(growth · n_k), n_k + min_step) while below n_max, then
  n_max (by default every 3%, at least 10 draws apart), fixed before any
  draw, so the decisions depend only on the counts at the looks and not on
  how a batched sampler splits the draws.
- Decisions. Radius 0 is always on the grid (threshold 1/2: not abstaining).
  A grid radius is decided when L > Φ(r/σ) (certified), U < Φ(r/σ) (not
  certifiable), or when not even all successes up to n_max could lift L above
  Φ(r/σ) (out of the budget's reach; a deterministic fact), or when it is
  given up (below). An image stops at the first look where every grid radius
  is decided, or at n_max; radii undecided at n_max are not certified.
- Giving up (stopping for futility, by conditional power as in stochastically
  curtailed trials). A certificate at threshold c at n_max allows at most
  F_c failures among the n_max draws (a(c) above; in the betting design the
  most for which E⁺(c) ≥ 1/α at n_max). With F failures among n draws so
  far, the chance to be certified *at* n_max, that the remaining n_max − n
  draws add at most F_c − F failures, is increasing in p_A and falls below
  δ (`futility`, 2%) for p_A below some p*. It is a lower bound on the
  chance to be certified *by* n_max (an early look can certify too), so
  the rule gives up a little sooner than one on that chance would; it is
  the rule, and the one these docs and the option name. The lowest
  undecided radius, and with it every higher one, is given up when the
  betting upper bound at level γ (`futility_alpha`, 5%) is below p*, i.e.
  E⁻_γ(p*) ≥ 1/γ. Giving up never certifies anything, so the α guarantee
  above is untouched; what it can cost is power: by Ville's inequality, with
  probability at least 1 − γ per image every radius given up had, at the
  true p_A, less than δ chance of being certified at n_max. (Measured on
  shared streams in the spending design: none of the power kept against
  CERTIFY is lost to it; tests/test_certify_sequential_power.py.) Images whose p_A
  sits near or below a threshold stop long before n_max instead of drawing
  to the budget to learn what was already all but sure. `futility=0` turns
  it off (images then stop only as above).
- Stakes. The growth rate of W⁺ is largest at μ = (p_A − c)/(1 − c); an image
  whose every draw is right wants μ = 1, where W⁺ = c^(−S) is the most any bet
  can win (Clopper–Pearson at a single fixed n needs the same S). Half the
  weight is on μ = 1, so such an image stops once c^(−S)/2 ≥ 1/α: ln 2 more
  than the fixed-n test, against ln K for a Clopper–Pearson union bound over K
  looks. The rest of the weight covers images with some failures.

References: Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2024 (betting confidence sequences and their
mixtures); Voráček, "Treatment of statistical estimation problems in
randomized smoothing for adversarial robustness", NeurIPS 2024 (confidence
sequences for "is x robust at r"); Horváth et al., adaptive sampling for
predetermined radii, ICLR 2022; Chen et al., "Input-specific robustness
certification for randomized smoothing", AAAI 2022; Lan, Simon & Halperin,
"Stochastically curtailed tests in long-term clinical trials", Sequential
Analysis 1982 (stopping for futility by conditional power).

The state machine (`SequentialTest.start`, `draws_needed`, `observe`) keeps
per-image arrays so a batched sampler can run many images at different looks:
it asks each image for the draws up to its next look, reports the cumulative
count of ĉ when they are in, and retires the image once `done`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# scipy is imported where it is used, so `import robusteval` stays fast.

DEFAULT_FIRST_LOOK = 100
# Looks cost no α here, only bookkeeping, and a stop overshoots its look by up to the growth: 3% (against 10%,
# which cost the digits models 4-5% more draws in all, measured by simulation on their CERTIFY counts).
DEFAULT_GROWTH = 1.03
# ...but never fewer new draws than this per look, so an image's rows in a pass stay worth the bookkeeping.
DEFAULT_MIN_STEP = 10
# Give a radius up when its chance to be certified at n_max is below 2% even at p_A's upper 95% bound. Chosen on
# simulations of the digits models' CERTIFY counts (the same Bernoulli streams for every design): 11% (cdn) and 27%
# (gaussian) fewer draws, certified accuracy unchanged at every grid radius; 5% / 10% saved 2-4% more.
DEFAULT_FUTILITY = 0.02
DEFAULT_FUTILITY_ALPHA = 0.05
# Designs: "spending" (the default) decides early on a betting sequence at a small share of α and at n_max by an exact
# test that spends the rest; "betting" (the design before it) spends all of α on the betting sequence.
SEQUENTIAL_DESIGNS = ("spending", "betting")
DEFAULT_DESIGN = "spending"
# The share of α on the betting sequence in the spending design. Its early certificates cost α only where they are
# not also certified at n_max; at 5% the exact test at n_max keeps CERTIFY's failure allowance at r = 0.25, 0.5 and
# 0.75 (σ = 0.25, α = 0.001, n_max = 10,000), where 10% loses one failure at r = 0.25 (benchmarks/RESULTS.md).
DEFAULT_SEQUENCE_SHARE = 0.05


def look_schedule(n_max: int, first_look: int = DEFAULT_FIRST_LOOK, growth: float = DEFAULT_GROWTH,
                  min_step: int = DEFAULT_MIN_STEP) -> np.ndarray:
    """Cumulative draw counts at the looks: each the previous one times `growth` (rounded) but at least
    `min_step` more, starting at `first_look`; the last is n_max."""
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1 draw, got {n_max}")
    if first_look < 1:
        raise ValueError(f"first_look must be at least 1 draw, got {first_look}")
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a finite factor > 1, got {growth}")
    if min_step < 1:
        raise ValueError(f"min_step must be at least 1 draw, got {min_step}")
    looks = [min(int(first_look), int(n_max))]
    while looks[-1] < n_max:
        looks.append(min(int(n_max), max(int(round(looks[-1] * growth)), looks[-1] + int(min_step))))
    return np.array(looks, dtype=np.int64)


@dataclass(frozen=True)
class BettingMixture:
    """A fixed grid of stakes μ_j ∈ (0, 1] with weights w_j (Σ w_j = 1), for one side of the bounds."""

    stakes: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.stakes) != len(self.weights) or not self.stakes:
            raise ValueError("need one weight per stake")
        if any(not 0 < m <= 1 for m in self.stakes) or any(w <= 0 for w in self.weights):
            raise ValueError("stakes must lie in (0, 1] and weights be > 0")
        if abs(sum(self.weights) - 1) > 1e-12:
            raise ValueError(f"weights must sum to 1, got {sum(self.weights)}")

    def as_dict(self) -> dict[str, list[float]]:
        return {"stakes": list(self.stakes), "weights": list(self.weights)}


def _shared(first: tuple[float, float], rest: tuple[float, ...]) -> BettingMixture:
    """`first` = (stake, weight); the remaining weight shared equally by `rest`."""
    stake, weight = first
    share = (1 - weight) / len(rest)
    return BettingMixture((stake, *rest), (weight, *([share] * len(rest))))


# Lower side: half on μ = 1 (every draw right: the most any bet wins), the rest for images with failures.
LOWER_BETS = _shared((1.0, 0.5), (0.999, 0.99, 0.97, 0.93, 0.85, 0.7, 0.5, 0.3, 0.15, 0.05))
# Upper side: the best stake (c − p_A)/c is small near the high thresholds, so the grid reaches down.
UPPER_BETS = BettingMixture((0.5, 0.3, 0.15, 0.07, 0.03, 0.015, 0.007, 0.003, 0.0015, 0.0007), (0.1,) * 10)


def log_wealth(bets: BettingMixture, successes: np.ndarray, failures: np.ndarray, c: np.ndarray,
               side: str) -> np.ndarray:
    """log E(c) of the mixture on the `side` ("lower": against p_A ≤ c; "upper": against p_A ≥ c), element-wise.

    Lower: Σ_j w_j (1 + μ_j(1 − c)/c)^S (1 − μ_j)^F; upper: Σ_j w_j (1 − μ_j)^S (1 + μ_j c/(1 − c))^F.
    """
    mu = np.asarray(bets.stakes)
    s, f, c = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(failures, np.float64),
                                  np.asarray(c, np.float64))
    s, f, c = s[..., None], f[..., None], c[..., None]
    win, lose = (s, f) if side == "lower" else (f, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = (1 - c) / c if side == "lower" else c / (1 - c)
        # (1 − μ)^0 is 1 even at μ = 1; a single loss at μ = 1 loses everything.
        losing = np.where(lose > 0, lose * np.log1p(-mu), 0.0)
        terms = np.log(np.asarray(bets.weights)) + win * np.log1p(mu * odds) + losing
        top = terms.max(axis=-1)
        safe_top = np.where(np.isfinite(top), top, 0.0)
        return safe_top + np.log(np.exp(terms - safe_top[..., None]).sum(axis=-1))


def betting_bounds(successes: np.ndarray, draws: np.ndarray, alpha: float, iterations: int = 48,
                   lower_bets: BettingMixture = LOWER_BETS, upper_bets: BettingMixture = UPPER_BETS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The betting bounds L = inf{c: E⁺(c) < 1/α} and U = sup{c: E⁻(c) < 1/α}, element-wise.

    Bisection on c (E⁺ falls and E⁻ rises with c); each bound is the end of
    the final bracket on the safe side (the lower bound never above the exact
    one, the upper never below), within 2^−48 of it; c stays inside (0, 1).
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(draws, dtype=np.float64)
    s, n = np.broadcast_arrays(s, n)
    if np.any(n < 1) or np.any(s < 0) or np.any(s > n):
        raise ValueError("need 0 <= successes <= draws and draws >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a probability in (0, 1), got {alpha}")
    level = math.log(1 / alpha)
    f = n - s

    def bisect(rejected: Callable[[np.ndarray], np.ndarray], rejected_side_low: bool) -> np.ndarray:
        low, high = np.zeros_like(s), np.ones_like(s)
        for _ in range(iterations):
            mid = (low + high) / 2
            hit = rejected(mid)
            # Lower bound: c is rejected (E⁺ ≥ 1/α) below L; upper bound: rejected above U.
            low, high = (np.where(hit, mid, low), np.where(hit, high, mid)) if rejected_side_low else \
                (np.where(hit, low, mid), np.where(hit, mid, high))
        return low if rejected_side_low else high

    lower = bisect(lambda c: log_wealth(lower_bets, s, f, c, "lower") >= level, True)
    upper = bisect(lambda c: log_wealth(upper_bets, s, f, c, "upper") >= level, False)
    return lower, upper


def betting_allowances(looks: np.ndarray, threshold: float, alpha: float, bets: BettingMixture = LOWER_BETS
                       ) -> np.ndarray:
    """The most failures at each look for which the lower betting mixture certifies `threshold` at level α
    (E⁺ ≥ 1/α), −1 where none does. E⁺ falls with each failure in place of a success, so bisection on it."""
    looks = np.asarray(looks, dtype=np.int64)
    level = math.log(1 / alpha)
    low, high = np.full(looks.shape, -1), looks + 1  # certifies at `low` (−1: vacuously), not at `high`
    while np.any(high - low > 1):
        middle = (low + high) // 2
        ok = log_wealth(bets, looks - middle, middle, threshold, "lower") >= level
        low, high = np.where(ok, middle, low), np.where(ok, high, middle)
    return low


@functools.lru_cache(maxsize=64)
def _cached_final_allowance(looks: tuple[int, ...], early: tuple[int, ...], threshold: float, alpha: float) -> int:
    # A run builds its test more than once (config, then counting); the allowance is a fixed function of the design.
    return exact_final_allowance(np.array(looks), np.array(early), threshold, alpha)


def _binomial_step(counts: np.ndarray, draws: int, failure_rate: float) -> np.ndarray:
    """The law of failures after `draws` more Bernoulli draws, from the law `counts` (indices 0..len − 1, the last
    an absorbing "more" state)."""
    from scipy.signal import fftconvolve
    from scipy.stats import binom

    size = counts.size - 1
    step = binom.pmf(np.arange(min(draws, size) + 1), draws, failure_rate)
    moved = np.clip(fftconvolve(counts[:-1], step)[:size], 0.0, None)
    return np.append(moved, max(0.0, counts.sum() - moved.sum()))


def exact_final_allowance(looks: np.ndarray, early: np.ndarray, threshold: float, alpha: float) -> int:
    """The most failures F among the looks[-1] draws for which "certified early or at most F failures at the end"
    has probability at most α when p_A = threshold (−1: none).

    early[k]: the most failures at look k that certify early (−1: none). The chance is computed exactly by
    propagating the law of the failure count from look to look (scipy's binomial law, FFT convolution) and taking
    out the mass that certifies early. Every certificate comes from that event and it only shrinks as p_A falls, so
    certifying at n_max with at most F failures (or earlier) is wrong with probability ≤ α for every
    p_A ≤ threshold.
    """
    from scipy.stats import binom

    failure_rate = 1.0 - threshold
    # No F beyond CERTIFY's (which has no early certificates) can qualify, so count failures up to it.
    cap = int(binom.ppf(alpha, int(looks[-1]), failure_rate)) + 2
    counts = np.zeros(cap + 2)
    counts[0] = 1.0
    spent, previous = 0.0, 0
    for draws, allowed in zip(looks[:-1], early[:-1]):
        counts = _binomial_step(counts, int(draws - previous), failure_rate)
        previous = int(draws)
        if allowed >= 0:
            stop = min(int(allowed), cap) + 1
            spent += counts[:stop].sum()
            counts[:stop] = 0.0
    final = np.cumsum(_binomial_step(counts, int(looks[-1] - previous), failure_rate)[:-1])
    # A relative margin for the floating-point sums (their error is ~1e−15 of these probabilities).
    fits = np.flatnonzero(spent + final <= alpha * (1 - 1e-9))
    return int(fits[-1]) if fits.size else -1


@dataclass
class SequentialState:
    """Per-image progress: looks done, cumulative successes, the grid's decisions and bounds so far, and whether
    it stopped."""

    looks_done: np.ndarray  # int64: looks passed (0 before the first)
    successes: np.ndarray  # int64: draws returning ĉ, at the last look passed
    # Running max / min of the bounds over the looks that decided a radius and the stopping look (the bisection
    # costs more than the decisions, which need the wealth at the thresholds only); 0 and 1 before.
    lower: np.ndarray  # float64
    upper: np.ndarray  # float64
    certified: np.ndarray  # bool (images, radii): E⁺(Φ(r/σ)) ≥ 1/α at some look
    refuted: np.ndarray  # bool (images, radii): E⁻(Φ(r/σ)) ≥ 1/α at some look (not certifiable)
    done: np.ndarray  # bool


@dataclass(frozen=True)
class SequentialOutcome:
    """The result for one image once it stopped."""

    draws: int  # estimation draws used (the last look's cumulative count)
    successes: int
    pA_lower: float
    pA_upper: float
    certified: tuple[bool, ...]  # per grid radius (radius 0 first)
    largest_certified_radius: float | None  # the largest certified grid radius; None when abstaining
    # σ·Φ⁻¹(pA_lower), 0 when abstaining; in the spending design it may fall a little below
    # largest_certified_radius for an image certified at n_max by the exact test (module docstring).
    radius: float

    @property
    def abstain(self) -> bool:
        return not self.certified[0]


class SequentialTest:
    """The sequential decision of every grid radius for images with a Bernoulli(p_A) stream each.

    radii: the grid (≥ 0; radius 0 is added); the design (looks, stakes,
    thresholds Φ(r/σ)) is fixed at construction, before any draw.
    """

    def __init__(self, sigma: float, radii: Sequence[float], alpha: float, n_max: int,
                 first_look: int = DEFAULT_FIRST_LOOK, growth: float = DEFAULT_GROWTH,
                 min_step: int = DEFAULT_MIN_STEP, lower_bets: BettingMixture = LOWER_BETS,
                 upper_bets: BettingMixture = UPPER_BETS, futility: float = DEFAULT_FUTILITY,
                 futility_alpha: float = DEFAULT_FUTILITY_ALPHA, design: str = DEFAULT_DESIGN,
                 sequence_share: float = DEFAULT_SEQUENCE_SHARE):
        from scipy.stats import norm  # deferred: scipy.stats costs ~0.6 s to import

        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite noise level > 0, got {sigma}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be a probability in (0, 1), got {alpha}")
        if not 0.0 <= futility < 1.0:
            raise ValueError(f"futility must be a chance in [0, 1) (0: never give up), got {futility}")
        if not 0.0 < futility_alpha < 1.0:
            raise ValueError(f"futility_alpha must be a probability in (0, 1), got {futility_alpha}")
        if design not in SEQUENTIAL_DESIGNS:
            raise ValueError(f"design must be one of {', '.join(SEQUENTIAL_DESIGNS)}, got {design!r}")
        if not 0.0 < sequence_share < 1.0:
            raise ValueError(f"sequence_share must be a share of alpha in (0, 1), got {sequence_share}")
        grid = sorted({0.0, *(float(r) for r in radii)})
        if any(not math.isfinite(r) or r < 0 for r in grid):
            raise ValueError(f"radii must be finite and >= 0, got {list(radii)}")
        self.sigma = float(sigma)
        self.alpha = float(alpha)
        self.radii = np.array(grid)
        self.thresholds = norm.cdf(self.radii / self.sigma)
        self.looks = look_schedule(n_max, first_look, growth, min_step)
        self.n_max = int(n_max)
        self.lower_bets, self.upper_bets = lower_bets, upper_bets
        self.futility, self.futility_alpha = float(futility), float(futility_alpha)
        self.design_name = design
        # The betting sequence's level: all of α in the betting design, its share in the spending design.
        self.sequence_alpha = self.alpha * (sequence_share if design == "spending" else 1.0)
        # The most failures at n_max that certify each threshold there (−1: none). Betting: the mixture at n_max;
        # spending: the exact test's allowance (at least the mixture's, which alone spends at most its share).
        self.most_failures = np.array([self._most_failures(c) for c in self.thresholds])
        if design == "spending":
            # Kept non-increasing along the grid, so certifying a radius certifies every smaller one at n_max as it
            # does at every earlier look; the per-image guarantee then covers the grid at once (the event that any
            # radius above the true one is certified is the event for the smallest such radius).
            self.most_failures = np.minimum.accumulate(self.most_failures)

    def _most_failures(self, threshold: float) -> int:
        """The most failures among n_max draws that certify `threshold` at the last look (−1: none can)."""
        early = betting_allowances(self.looks, threshold, self.sequence_alpha, self.lower_bets)
        if self.design_name == "betting":
            return int(early[-1])
        return max(int(early[-1]), _cached_final_allowance(tuple(self.looks.tolist()), tuple(early.tolist()),
                                                           float(threshold), self.alpha))

    def design(self) -> dict[str, object]:
        """What fixes the decisions besides σ, α, the radii and n_max: the looks, the stakes, the split of α and the
        giving up (for config.json; the betting design writes what runs before the spending design wrote, no
        `futility` key when it is off, so old run directories resume only under the design they were made with)."""
        futility = {"futility": {"chance": self.futility, "alpha": self.futility_alpha}} if self.futility else {}
        spending: dict[str, object] = {}
        if self.design_name == "spending":
            # (betting sequence, the Clopper–Pearson bound reported at n_max); the exact test's allowances follow.
            spending = {"alpha_spent": [self.sequence_alpha, self.alpha - self.sequence_alpha]}
        sequence = "betting" if self.design_name == "betting" else "betting+exact-at-n_max"
        return {"looks": self.looks.tolist(), "confidence_sequence": sequence,
                "bets": {"lower": self.lower_bets.as_dict(), "upper": self.upper_bets.as_dict()}, **spending,
                **futility}

    def bounds(self, successes: np.ndarray, look: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """The bounds at look `look` (0-based) with `successes` among its draws: the betting lower bound at the
        sequence's level (at the last look of the spending design, the larger of it and the one-sided
        Clopper–Pearson bound at the rest of α: valid at α by a union bound) and the betting upper bound at α."""
        look = np.asarray(look)
        lower, _ = betting_bounds(successes, self.looks[look], self.sequence_alpha, lower_bets=self.lower_bets,
                                  upper_bets=self.upper_bets)
        _, upper = betting_bounds(successes, self.looks[look], self.alpha, lower_bets=self.lower_bets,
                                  upper_bets=self.upper_bets)
        if self.design_name == "spending":
            from scipy.stats import beta

            last = np.broadcast_to(look == len(self.looks) - 1, np.shape(lower))
            s = np.broadcast_to(np.asarray(successes, dtype=np.float64), np.shape(lower))
            with np.errstate(invalid="ignore"):
                clopper = np.nan_to_num(beta.ppf(self.alpha - self.sequence_alpha, s, self.n_max - s + 1))
            lower = np.where(last, np.maximum(lower, clopper), lower)
        return lower, upper

    def start(self, images: int) -> SequentialState:
        grid = (images, len(self.radii))
        return SequentialState(
            looks_done=np.zeros(images, dtype=np.int64), successes=np.zeros(images, dtype=np.int64),
            lower=np.zeros(images), upper=np.ones(images),
            certified=np.zeros(grid, dtype=bool), refuted=np.zeros(grid, dtype=bool),
            done=np.zeros(images, dtype=bool),
        )

    def draws_done(self, state: SequentialState) -> np.ndarray:
        """Estimation draws each image has been observed at (0 before its first look)."""
        padded = np.concatenate([[0], self.looks])
        return padded[state.looks_done]

    def draws_needed(self, state: SequentialState) -> np.ndarray:
        """Draws each image needs before its next look (0 once done)."""
        padded = np.concatenate([self.looks, [self.looks[-1]]])
        needed = padded[state.looks_done] - self.draws_done(state)
        return np.where(state.done, 0, needed)

    def observe(self, state: SequentialState, images: np.ndarray, successes: np.ndarray) -> None:
        """Images `images` reached their next look with `successes` (cumulative) draws returning ĉ.

        Updates their bounds, look count and done flags in place.
        """
        images = np.asarray(images, dtype=np.int64)
        successes = np.asarray(successes, dtype=np.int64)
        if images.shape != successes.shape:
            raise ValueError("need one cumulative success count per observed image")
        if np.unique(images).size != images.size:
            raise ValueError("each image can reach one look at a time; got repeated images")
        if np.any(state.done[images]):
            raise ValueError("an image that stopped cannot be observed again")
        look = state.looks_done[images]
        before = state.successes[images]
        gained = successes - before
        if np.any(gained < 0) or np.any(gained > self.looks[look] - self.draws_done(state)[images]):
            raise ValueError("cumulative successes must grow by at most the draws since the previous look")
        draws, t = self.looks[look][:, None], self.thresholds[None, :]
        wins = successes[:, None]
        bet = log_wealth(self.lower_bets, wins, draws - wins, t, "lower") >= math.log(1 / self.sequence_alpha)
        # At n_max a threshold is certified with at most its allowance of failures (the mixture's, or the exact
        # test's in the spending design).
        at_end = (look == len(self.looks) - 1)[:, None] & (draws - wins <= self.most_failures[None, :])
        certified = state.certified[images] | bet | at_end
        refuted = state.refuted[images] | (
            log_wealth(self.upper_bets, wins, draws - wins, t, "upper") >= math.log(1 / self.alpha))
        news = (certified != state.certified[images]).any(axis=1) | (refuted != state.refuted[images]).any(axis=1)
        state.certified[images], state.refuted[images] = certified, refuted
        state.successes[images] = successes
        state.looks_done[images] = look + 1
        state.done[images] = self._settled(state, images)
        bounded = news | state.done[images]
        if bounded.any():
            chosen = images[bounded]
            lower, upper = self.bounds(successes[bounded], look[bounded])
            state.lower[chosen] = np.maximum(state.lower[chosen], lower)
            state.upper[chosen] = np.minimum(state.upper[chosen], upper)

    def _settled(self, state: SequentialState, images: np.ndarray) -> np.ndarray:
        looks_done = state.looks_done[images]  # ≥ 1 here
        undecided = ~(state.certified[images] | state.refuted[images])
        settled = (looks_done >= len(self.looks)) | ~undecided.any(axis=1)
        # The rest are settled when their lowest undecided threshold (hence every higher one) is out of the budget's
        # reach, or given up.
        open_ = np.flatnonzero(~settled)
        if open_.size:
            drawn = self.looks[looks_done[open_] - 1]
            successes = state.successes[images][open_]
            allowed = self.most_failures[np.argmax(undecided[open_], axis=1)]
            settled[open_] = ((drawn - successes) > allowed) | self._given_up(successes, drawn, allowed)
        return settled

    def _given_up(self, successes: np.ndarray, drawn: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Whether p_A is below p* with confidence 1 − γ, where at p* the draws left add at most
        `allowed` − failures failures with chance δ (the module docstring's "Giving up")."""
        from scipy.stats import beta  # deferred: scipy.stats costs ~0.6 s to import

        failures, left = drawn - successes, self.n_max - drawn
        spare = allowed - failures  # more failures the certificate can still take
        # Only where some but not every outcome of the draws left certifies: otherwise nothing to give up.
        open_ = (spare >= 0) & (spare < left)
        given_up = np.zeros(successes.shape, dtype=bool)
        if not self.futility or not open_.any():
            return given_up
        spare, left = spare[open_], left[open_]
        # P(Binomial(left, q) ≤ spare) = 1 − I_q(spare + 1, left − spare): it equals δ at this failure rate q*.
        p_star = 1.0 - beta.ppf(1.0 - self.futility, spare + 1, left - spare)
        wealth = log_wealth(self.upper_bets, successes[open_], failures[open_], p_star, "upper")
        given_up[open_] = wealth >= math.log(1 / self.futility_alpha)
        return given_up

    def outcome(self, state: SequentialState, image: int) -> SequentialOutcome:
        """The decisions for one image (certified grid radii, radius, bounds, draws)."""
        from scipy.stats import norm  # deferred: scipy.stats costs ~0.6 s to import

        lower = float(state.lower[image])
        certified = tuple(bool(c) for c in state.certified[image])
        largest = float(self.radii[np.flatnonzero(certified)[-1]]) if certified[0] else None
        radius = float(self.sigma * norm.ppf(lower)) if certified[0] else 0.0
        return SequentialOutcome(
            draws=int(self.draws_done(state)[image]), successes=int(state.successes[image]), pA_lower=lower,
            pA_upper=float(state.upper[image]), certified=certified, largest_certified_radius=largest,
            radius=radius,
        )
