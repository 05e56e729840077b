"""What an attack evaluation computes: `AttackSettings` as the caller asks for it, and `ResolvedAttackSettings`,
every default filled in and checked, from which `AttackJob` is built.

Kept apart from the engine (as `robusteval.smoothing.settings` is) so the options are checked in one place,
and the engine depends on the resolved settings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from robusteval.attacks.catalog import AttackSpec
from robusteval.attacks.defenses import DECISION_DRAWS
from robusteval.core.errors import UsageError
from robusteval.core.vocabulary import DefenseSpec, gradient_variants, parse_gradient

# Small images attack fastest in large batches (per-call overhead, Square's 5,000 queries per batch);
# the state is saved after every ε of a batch, so a large batch loses little work to a kill.
DEFAULT_BATCH_SIZE = 500
DEFAULT_EOT = 20


@dataclass(frozen=True)
class AttackSettings:
    """What an attack evaluation computes, as the caller asked for it (defaults resolved by `prepare_attack`)."""

    attack: str = "autoattack"
    norm: str = "Linf"
    eps: Sequence[float] | float | None = None
    n: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    defense: str = "none"
    gradient: str | None = None
    eot: int | None = None
    steps: int | None = None
    step_size: float | None = None
    seed: int = 0
    large_eps_check: bool = True
    masking_checks: bool = True
    decision_draws: int = DECISION_DRAWS


@dataclass(frozen=True)
class ResolvedAttackSettings:
    """`AttackSettings` resolved against the model and data: nothing left to default, every value checked.

    `n`: the leading points of the data set attacked; `eps`: distinct and increasing.
    """

    spec: AttackSpec
    norm: str
    eps: tuple[float, ...]
    n: int
    batch_size: int
    defense: DefenseSpec
    gradient: str  # full | bpda | auto
    eot: int
    steps: int | None
    step_size: float | None
    seed: int
    large_eps_check: bool
    masking_checks: bool
    decision_draws: int

    @property
    def variants(self) -> list[str]:
        """The gradient modes attacked: the one asked for, or for auto those whose worst case per point is kept."""
        return gradient_variants(self.gradient, self.defense)


def eps_list(eps: Sequence[float] | float) -> list[float]:
    """The radii, checked, distinct and increasing."""
    values = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not values or any(not math.isfinite(e) or e < 0 for e in values):
        raise UsageError(f"eps must be a non-empty list of finite values >= 0, got {values}")
    return sorted(set(values))


def check_counts(settings: AttackSettings) -> None:
    """Batch size, steps, decision draws and step size are positive."""
    if settings.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {settings.batch_size}")
    if settings.steps is not None and settings.steps < 1:
        raise UsageError(f"steps must be >= 1, got {settings.steps}")
    if settings.decision_draws < 1:
        raise UsageError(f"decision_draws must be >= 1, got {settings.decision_draws}")
    if settings.step_size is not None and not (math.isfinite(settings.step_size) and settings.step_size > 0):
        raise UsageError(f"step_size must be a positive number, got {settings.step_size}")


def resolve_gradient(gradient: str | None, defense: DefenseSpec) -> str:
    """The gradient mode: 'auto' through a denoiser or chain and 'full' otherwise, unless given."""
    if gradient is None:
        return "auto" if defense.differentiates_through else "full"
    parsed = parse_gradient(gradient, defense)
    if not defense.differentiates_through:
        # Without a denoiser or a chain there is nothing to take gradients through: any choice would be ignored.
        raise UsageError(f"--gradient {gradient} applies to denoise, purify and sgld defenses only (the defense "
                         f"is '{defense}')")
    return parsed


def resolve_eot(eot: int | None, spec: AttackSpec, randomized: bool) -> int:
    """Noise draws per gradient: the attack's own default, else DEFAULT_EOT against randomness and 1 without."""
    if eot is None:
        if spec.eot_default is not None and (spec.name == "autoattack-rand" or not randomized):
            eot = spec.eot_default
        else:
            eot = DEFAULT_EOT if randomized else 1
    if eot < 1:
        raise UsageError(f"eot must be >= 1, got {eot}")
    return int(eot)
