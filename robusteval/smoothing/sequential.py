"""Sequential certification on a radius grid: stop drawing noise once every grid radius is decided.

CERTIFY (Cohen et al. 2019) spends n estimation draws on every image, but a
leaderboard only asks "is this image certified at r = 0.25, 0.5, ...?". With
p_A the probability that the base classifier returns the class ĉ picked by the
n0 selection draws, the smoothed classifier is certified at radius r exactly
when p_A > Φ(r/σ), so each grid radius is a test of p_A against a threshold,
and most images settle every test long before n draws.

Method (Clopper–Pearson bounds union-bounded over a fixed schedule of looks):

- Looks. The estimation draws of an image are examined at the cumulative
  counts n_1 < n_2 < ... < n_K = n_max: n_k = round(first_look · growth^(k−1))
  while below n_max, then n_max. The schedule is fixed before any draw.
- α-spending. Look k spends α_k of the error budget, half of it on each side:
  α_K = α/2 at the final look, where the borderline images are decided, and
  α_k = α / (2(K − 1)) at each earlier look (α_1 = α when K = 1). Σ_k α_k = α.
- Bounds. At look k with s_k successes (draws returning ĉ) among n_k, the
  one-sided Clopper–Pearson bounds at level α_k/2 each,
  L_k = Beta⁻¹(α_k/2; s_k, n_k − s_k + 1) and U_k = Beta⁻¹(1 − α_k/2; s_k + 1, n_k − s_k),
  and the running intersection [max_{j≤k} L_j, min_{j≤k} U_j] is reported.
- Guarantee. Each interval misses p_A with probability at most α_k, so by the
  union bound P(∃k: p_A ∉ [L_k, U_k]) ≤ Σ α_k = α: the intervals form a
  confidence sequence, valid at every look simultaneously and therefore at the
  data-dependent look where the image stops. On that event every decision at
  every look and radius is right at once: a radius is certified only if
  p_A > Φ(r/σ), declared not certifiable only if p_A < Φ(r/σ). Hence the
  probability of any wrong certificate (or wrong refusal) for an image is at
  most α, as with CERTIFY at level α. The radius σ·Φ⁻¹(L) of the running
  lower bound at the stop is a valid certificate too (at least the largest
  certified grid radius). Conditional on ĉ the estimation draws are fresh
  i.i.d. Bernoulli(p_A), since the n0 selection draws are a separate stream.
- Decisions. Radius 0 is always on the grid (threshold 1/2: not abstaining).
  A grid radius is decided when L > Φ(r/σ) (certified), U < Φ(r/σ) (not
  certifiable), or when not even all successes up to n_max could lift L above
  Φ(r/σ) (out of the budget's reach; a deterministic fact, spending no α).
  An image stops at the first look where every grid radius is decided, or at
  n_max; radii undecided at n_max are not certified.

The union bound over a geometric schedule costs a log K factor in α, a few
per cent of draws, against sharper betting confidence sequences
(Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
betting", JRSS-B 2024), in exchange for exact, auditable bounds and
decisions that depend only on the counts at a handful of looks, which is what
a batched sampler wants.

References: Horváth et al., "Boosting randomized smoothing with variance
reduced classifiers" / adaptive sampling for predetermined radii, ICLR 2022;
Chen et al., "Input-specific robustness certification for randomized
smoothing", AAAI 2022; Voráček, "Treatment of statistical estimation problems
in randomized smoothing for adversarial robustness", NeurIPS 2024 (confidence
sequences for "is x robust at r").

The state machine (`SequentialTest.start`, `draws_needed`, `observe`) keeps
per-image arrays so a batched sampler can run many images at different looks:
it asks each image for the draws up to its next look, reports the cumulative
count of ĉ when they are in, and retires the image once `done`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# scipy is imported where it is used, so `import robusteval` stays fast.

DEFAULT_FIRST_LOOK = 100
DEFAULT_GROWTH = 1.5


def look_schedule(n_max: int, first_look: int = DEFAULT_FIRST_LOOK, growth: float = DEFAULT_GROWTH) -> np.ndarray:
    """Cumulative draw counts at the looks: round(first_look · growth^k) while below n_max, then n_max."""
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1 draw, got {n_max}")
    if first_look < 1:
        raise ValueError(f"first_look must be at least 1 draw, got {first_look}")
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a finite factor > 1, got {growth}")
    looks: list[int] = []
    size = float(first_look)
    while round(size) < n_max:
        if not looks or round(size) > looks[-1]:
            looks.append(int(round(size)))
        size *= growth
    looks.append(int(n_max))
    return np.array(looks, dtype=np.int64)


def spend_alpha(alpha: float, looks: int) -> np.ndarray:
    """Error spent at each look: α/2 at the last, the other α/2 equally over the earlier ones (sums to α)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a probability in (0, 1), got {alpha}")
    if looks < 1:
        raise ValueError(f"need at least one look, got {looks}")
    if looks == 1:
        return np.array([alpha])
    spent = np.full(looks, alpha / (2 * (looks - 1)))
    spent[-1] = alpha / 2
    return spent


def clopper_pearson(successes: np.ndarray, draws: np.ndarray, alpha_side: np.ndarray | float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper–Pearson lower and upper bounds, each missing with probability ≤ alpha_side.

    Element-wise over arrays: L = Beta⁻¹(a; s, n − s + 1) (0 when s = 0) and
    U = Beta⁻¹(1 − a; s + 1, n − s) (1 when s = n).
    """
    from scipy.stats import beta

    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(draws, dtype=np.float64)
    a = np.broadcast_to(np.asarray(alpha_side, dtype=np.float64), np.broadcast_shapes(s.shape, n.shape))
    if np.any(n < 1) or np.any(s < 0) or np.any(s > n):
        raise ValueError("need 0 <= successes <= draws and draws >= 1")
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(s > 0, beta.ppf(a, np.maximum(s, 1), n - s + 1), 0.0)
        upper = np.where(s < n, beta.ppf(1 - a, s + 1, np.maximum(n - s, 1)), 1.0)
    return lower, upper


@dataclass
class SequentialState:
    """Per-image progress: looks done, cumulative successes, running bounds, and whether it stopped."""

    looks_done: np.ndarray  # int64: looks passed (0 before the first)
    successes: np.ndarray  # int64: draws returning ĉ, at the last look passed
    lower: np.ndarray  # float64: running max of the lower bounds (0 before the first look)
    upper: np.ndarray  # float64: running min of the upper bounds (1 before the first look)
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
    radius: float  # σ·Φ⁻¹(pA_lower), 0 when abstaining

    @property
    def abstain(self) -> bool:
        return not self.certified[0]


class SequentialTest:
    """The sequential decision of every grid radius for images with a Bernoulli(p_A) stream each.

    radii: the grid (≥ 0; radius 0 is added); the design (looks, α per look,
    thresholds Φ(r/σ)) is fixed at construction, before any draw.
    """

    def __init__(self, sigma: float, radii: Sequence[float], alpha: float, n_max: int,
                 first_look: int = DEFAULT_FIRST_LOOK, growth: float = DEFAULT_GROWTH):
        from scipy.stats import norm

        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite noise level > 0, got {sigma}")
        grid = sorted({0.0, *(float(r) for r in radii)})
        if any(not math.isfinite(r) or r < 0 for r in grid):
            raise ValueError(f"radii must be finite and >= 0, got {list(radii)}")
        self.sigma = float(sigma)
        self.alpha = float(alpha)
        self.radii = np.array(grid)
        self.thresholds = norm.cdf(self.radii / self.sigma)
        self.looks = look_schedule(n_max, first_look, growth)
        self.look_alpha = spend_alpha(alpha, len(self.looks))
        self.n_max = int(n_max)

    def bounds(self, successes: np.ndarray, look: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """The Clopper–Pearson bounds of look `look` (0-based) with `successes` among its draws."""
        look = np.asarray(look)
        return clopper_pearson(successes, self.looks[look], self.look_alpha[look] / 2)

    def start(self, images: int) -> SequentialState:
        return SequentialState(
            looks_done=np.zeros(images, dtype=np.int64), successes=np.zeros(images, dtype=np.int64),
            lower=np.zeros(images), upper=np.ones(images), done=np.zeros(images, dtype=bool),
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
        lower, upper = self.bounds(successes, look)
        state.lower[images] = np.maximum(state.lower[images], lower)
        state.upper[images] = np.minimum(state.upper[images], upper)
        state.successes[images] = successes
        state.looks_done[images] = look + 1
        state.done[images] = self._settled(state, images)

    def _settled(self, state: SequentialState, images: np.ndarray) -> np.ndarray:
        from scipy.stats import binom

        looks_done = state.looks_done[images]  # ≥ 1 here
        lower = state.lower[images][:, None]
        upper = state.upper[images][:, None]
        t = self.thresholds[None, :]
        undecided = ~((lower > t) | (upper < t))
        settled = (looks_done >= len(self.looks)) | ~undecided.any(axis=1)
        # The rest are settled when their lowest undecided threshold t (hence every higher one) is out of the
        # budget's reach: no later look j shows L_j > t even if all draws until then succeed. By the
        # Clopper–Pearson duality L_j(s, n_j) > t exactly when P(Bin(n_j, t) >= s) < a_j.
        open_ = np.flatnonzero(~settled)
        if open_.size:
            lowest = self.thresholds[np.argmax(undecided[open_], axis=1)][:, None]
            future = np.arange(len(self.looks))[None, :]
            later = future >= looks_done[open_][:, None]
            drawn = self.looks[looks_done[open_] - 1][:, None]
            best = state.successes[images][open_][:, None] + self.looks[None, :] - drawn
            tail = binom.sf(best - 1, self.looks[None, :], lowest)
            reachable = later & (tail < self.look_alpha[None, :] / 2)
            settled[open_] = ~reachable.any(axis=1)
        return settled

    def outcome(self, state: SequentialState, image: int) -> SequentialOutcome:
        """The decisions for one image (certified grid radii, radius, bounds, draws)."""
        from scipy.stats import norm

        lower = float(state.lower[image])
        certified = tuple(bool(c) for c in lower > self.thresholds)
        largest = float(self.radii[np.flatnonzero(certified)[-1]]) if certified[0] else None
        radius = float(self.sigma * norm.ppf(lower)) if certified[0] else 0.0
        return SequentialOutcome(
            draws=int(self.draws_done(state)[image]), successes=int(state.successes[image]), pA_lower=lower,
            pA_upper=float(state.upper[image]), certified=certified, largest_certified_radius=largest,
            radius=radius,
        )
