"""What a certify or predict run computes: `SmoothingSettings`, and `certify_settings` from either method's options.

Kept apart from the engine so the options of both certification methods (CERTIFY's n, the sequential
method's radii and n_max) are checked in one place before anything is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from robusteval.core.errors import UsageError
from robusteval.core.names import resolve_name
from robusteval.core.vocabulary import CERTIFY_METHODS, SMOOTHING_KINDS, SMOOTHING_MODES
from robusteval.smoothing.sampler import ESTIMATION, PREDICTION, SELECTION, Phase
from robusteval.smoothing.sequential import (
    DEFAULT_DESIGN,
    DEFAULT_FUTILITY,
    SEQUENTIAL_DESIGNS,
    SequentialTest,
)

DEFAULT_SEQUENTIAL_RADII = (0.25, 0.5, 0.75, 1.0)
DEFAULT_N_MAX = 100_000


@dataclass(frozen=True)
class SmoothingSettings:
    """What a certify or predict run computes (n0 is 0 for predict)."""

    kind: str
    sigma: float
    n: int
    alpha: float
    n0: int = 0
    mode: str = "direct"
    seed: int = 0
    # method "sequential": n is the budget n_max, radii the grid every image is decided on, futility the chance to
    # be certified at n_max below which a radius is given up (0: never), design "spending" or "betting".
    method: str = "cohen"
    radii: tuple[float, ...] = ()
    futility: float = DEFAULT_FUTILITY
    design: str = DEFAULT_DESIGN

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", resolve_name(self.kind, SMOOTHING_KINDS, "smoothing kind"))
        object.__setattr__(self, "mode", resolve_name(self.mode, SMOOTHING_MODES, "smoothing mode"))
        object.__setattr__(self, "method", resolve_name(self.method, CERTIFY_METHODS, "certification method"))
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        self._check_method()
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise UsageError(f"sigma must be a finite noise level > 0, got {self.sigma}")
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n < 1:
            raise UsageError(f"n must be at least 1 noise draw, got {self.n}")
        if self.kind == "certify" and self.n0 < 1:
            raise UsageError(f"n0 must be at least 1 selection draw, got {self.n0}")
        if self.kind == "predict" and self.n0 != 0:
            raise UsageError("predict uses n draws only; n0 must be 0")

    def _check_method(self) -> None:
        if self.method != "sequential":
            if self.radii:
                raise UsageError("radii is the grid of the sequential method; CERTIFY (cohen) has none")
            return
        if self.kind != "certify":
            raise UsageError("the sequential method certifies; predict has no radius grid")
        if not self.radii or any(not (math.isfinite(r) and r > 0) for r in self.radii):
            raise UsageError(f"radii must be a non-empty grid of finite radii > 0, got {list(self.radii)}")
        if list(self.radii) != sorted(set(self.radii)):
            raise UsageError(f"radii must be increasing and distinct, got {list(self.radii)}")
        if not 0 <= self.futility < 1:
            raise UsageError(f"futility must be a chance in [0, 1) (0: never give up a radius), got {self.futility}")
        if self.design not in SEQUENTIAL_DESIGNS:
            raise UsageError(f"design must be one of {', '.join(SEQUENTIAL_DESIGNS)}, got {self.design!r}")

    @property
    def phases(self) -> list[Phase]:
        if self.kind == "certify":
            return [Phase(SELECTION, self.n0), Phase(ESTIMATION, self.n)]
        return [Phase(PREDICTION, self.n)]

    def sequential_test(self) -> SequentialTest:
        """The sequential test of the grid (method "sequential"), fixed before any draw."""
        return SequentialTest(self.sigma, self.radii, self.alpha, self.n, futility=self.futility, design=self.design)


def certify_settings(*, sigma: float, n0: int, n: int | None, alpha: float, mode: str, seed: int, method: str,
                     radii: Sequence[float] | None, n_max: int | None,
                     futility: float | None = None, design: str | None = None) -> SmoothingSettings:
    """The settings of a certify run from the options of either method (n is CERTIFY's, n_max, radii, futility and
    design the sequential method's; giving one to the other method is an error rather than silently ignored)."""
    if resolve_name(method, CERTIFY_METHODS, "certification method") == "cohen":
        if n_max is not None or radii is not None or futility is not None or design is not None:
            raise UsageError("n_max, radii, futility and design belong to the sequential method; CERTIFY "
                             "(method 'cohen') uses n")
        return SmoothingSettings("certify", sigma=sigma, n=10_000 if n is None else n, alpha=alpha, n0=n0,
                                 mode=mode, seed=seed)
    if n is not None:
        raise UsageError("the sequential method draws up to n_max per image; n is CERTIFY's (method 'cohen')")
    budget = DEFAULT_N_MAX if n_max is None else n_max
    if budget < 1:
        raise UsageError(f"n_max must be at least 1 estimation draw, got {budget}")
    return SmoothingSettings("certify", sigma=sigma, n=budget, alpha=alpha, n0=n0, mode=mode, seed=seed,
                             method="sequential", radii=DEFAULT_SEQUENTIAL_RADII if radii is None else tuple(radii),
                             futility=DEFAULT_FUTILITY if futility is None else futility,
                             design=DEFAULT_DESIGN if design is None else design)
