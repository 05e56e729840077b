"""Every attack name a user can type: its norms, its published defaults, and how to build it.

Single attacks come from torchattacks 3.5.1; the suites come from the
`pyautoattack` package with AutoAttack's own settings. An attack is built,
for one ε, into a list of `AttackComponent`s (one for a single attack, one
per member for a suite); the engine runs them in order on the points that are
still correct and records which component broke each point.

Defaults are the published ones, stated relative to ε where the library
states them for one ε: torchattacks' PGD takes steps of 2/255 at ε = 8/255,
so here α = ε/4; its PGD-L2 takes 0.2 at ε = 1, so α = 0.2·ε. APGD, FAB and
Square use their papers' settings (100 iterations, 100 iterations, 5000
queries), not torchattacks' shortened defaults.

EOT (expectation over transformation) against randomized defenses: attacks
with their own EOT parameter (`eot-pgd`, `apgd-*`, the suites' APGD) average
the gradient over `eot` forward passes; every other attack sees the
expectation model, the mean over `eot` noise draws computed in one pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from robusteval.core.errors import UsageError
from robusteval.core.names import resolve_name
from robusteval.core.vocabulary import NORMS

logger = logging.getLogger(__name__)


# AutoAttack's standard version targets 9 classes in APGD-T and FAB-T; its L1 version (Croce & Hein 2021,
# "Mind the box") 5 in APGD-T, with 5 restarts of APGD-CE and both APGDs on the ε schedule 3ε, 2ε, ε.
AUTOATTACK_TARGETS = 9
AUTOATTACK_TARGETS_L1_APGD = 5
# The targeted DLR loss reads the 4th-largest logit, the untargeted one the 3rd.
MIN_CLASSES_TARGETED_DLR = 4
MIN_CLASSES_DLR = 3


@dataclass(frozen=True)
class AttackSpec:
    """What `robusteval list attacks` shows, and what the engine needs to know."""

    name: str
    norms: tuple[str, ...]
    source: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # a suite's attacks, in the order they run
    white_box: bool = True
    minimization: bool = False  # finds a minimal perturbation once, projected onto each ε-ball
    native_eot: bool = False
    eot_default: int | None = None  # an EOT count the published attack fixes

    @property
    def is_suite(self) -> bool:
        return bool(self.members)

    def defaults_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.defaults.items()) or "-"


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("fgsm", ("Linf",), "torchattacks.FGSM", "fast gradient sign method (Goodfellow et al. 2015)",
                   {"steps": 1}),
        AttackSpec("pgd", ("Linf",), "torchattacks.PGD", "projected gradient descent (Madry et al. 2018)",
                   {"steps": 10, "step_size": "eps/4", "random_start": True}),
        AttackSpec("pgd-l2", ("L2",), "torchattacks.PGDL2", "projected gradient descent, L2 ball",
                   {"steps": 10, "step_size": "0.2*eps", "random_start": True}),
        AttackSpec("cw-l2", ("L2",), "torchattacks.CW", "Carlini & Wagner L2 (minimal perturbation, projected per eps)",
                   {"steps": 50, "c": 1, "kappa": 0, "lr": 0.01}, minimization=True),
        AttackSpec("apgd-ce", ("Linf", "L2"), "torchattacks.APGD", "Auto-PGD on cross-entropy (Croce & Hein 2020)",
                   {"steps": 100, "restarts": 1, "rho": 0.75}, native_eot=True),
        AttackSpec("apgd-dlr", ("Linf", "L2"), "torchattacks.APGD", "Auto-PGD on the DLR loss (needs >= 3 classes)",
                   {"steps": 100, "restarts": 1, "rho": 0.75}, native_eot=True),
        AttackSpec("apgd-t", ("Linf", "L2"), "torchattacks.APGDT",
                   "targeted Auto-PGD on the targeted DLR loss (needs >= 4 classes)",
                   {"steps": 100, "restarts": 1, "targets": "min(9, classes-1)"}, native_eot=True),
        AttackSpec("fab-t", ("Linf", "L2"), "torchattacks.FAB",
                   "targeted fast adaptive boundary attack (Croce & Hein 2020)",
                   {"steps": 100, "restarts": 1, "targets": "min(9, classes-1)", "alpha_max": 0.1, "eta": 1.05,
                    "beta": 0.9}),
        AttackSpec("square", ("Linf", "L2"), "torchattacks.Square",
                   "Square Attack, black-box (Andriushchenko et al. 2020)",
                   {"queries": 5000, "restarts": 1, "p_init": 0.8, "loss": "margin"}, white_box=False),
        AttackSpec("eot-pgd", ("Linf",), "torchattacks.EOTPGD", "PGD with expectation over transformation",
                   {"steps": 10, "step_size": "eps/4", "eot": "2 (20 on randomized defenses)"},
                   native_eot=True, eot_default=2),
        AttackSpec("autoattack", ("Linf", "L2", "L1"), "pyautoattack.AutoAttack(version='standard')",
                   "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (L1: APGD with the L1 projection, "
                   "5 restarts of APGD-CE, 5 targets of APGD-T, ε schedule 3ε, 2ε, ε)",
                   {"apgd_steps": 100, "targets": "min(9, classes-1)", "fab_steps": 100, "square_queries": 5000},
                   members=("apgd-ce", "apgd-t", "fab-t", "square")),
        AttackSpec("autoattack-rand", ("Linf", "L2"), "pyautoattack.AutoAttack(version='rand')",
                   "AutoAttack for randomized defenses: APGD-CE, APGD-DLR with EOT",
                   {"apgd_steps": 100, "eot": 20}, members=("apgd-ce", "apgd-dlr"), native_eot=True, eot_default=20),
    )
}


def default_steps(spec: AttackSpec) -> int:
    """The iterations `--steps` overrides when not given: the published default (APGD's for the suites, queries
    for Square)."""
    for key in ("steps", "apgd_steps", "queries"):
        if isinstance(spec.defaults.get(key), int):
            return int(spec.defaults[key])
    raise AssertionError(f"attack {spec.name} has no default step count")  # pragma: no cover


def resolve_attack(name: str) -> AttackSpec:
    """The spec of a user-typed attack name (case-insensitive); unknown names suggest close matches."""
    return ATTACKS[resolve_name(name, ATTACKS, "attack")]


def resolve_norm(norm: str) -> str:
    """'Linf', 'L2' or 'L1' from a user-typed norm ('linf', 'inf', 'l2', '1' ...)."""
    aliases = {"inf": "Linf", "l_inf": "Linf", "linfinity": "Linf", "2": "L2", "l_2": "L2", "1": "L1", "l_1": "L1"}
    return resolve_name(aliases.get(norm.lower(), norm), NORMS, "norm")


def check_norm(spec: AttackSpec, norm: str) -> None:
    if norm not in spec.norms:
        raise UsageError(f"attack '{spec.name}' supports the norm(s) {', '.join(spec.norms)}, not {norm}; "
                         f"pass --norm {spec.norms[0]} or choose another attack (see `robusteval list attacks`)")


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's CPU generator, and the CUDA generator of `device` when it is a GPU.

    `torch.manual_seed` seeds every CUDA device too; where CUDA is built but not
    initialised, each call then records a stack trace (tens of milliseconds).
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


# --- components ---------------------------------------------------------------------------------
@dataclass
class AttackComponent:
    """One attack at one ε: `run(x, y, seed)` returns candidate adversarial examples for (x, y)."""

    name: str
    run: Callable[[Tensor, Tensor, int], Tensor]
    white_box: bool = True
    minimization: bool = False


@dataclass
class BuiltAttack:
    components: list[AttackComponent]
    skipped: list[str]  # members that cannot run on this model, with the reason


def _apgd_schedule(attack: Any, steps: int) -> None:
    """Set pyautoattack APGD's iteration count and the checkpoints its constructor derives from it."""
    attack.n_iter = steps
    attack.n_iter_orig = steps
    attack.n_iter_2 = max(int(0.22 * steps), 1)
    attack.n_iter_min = max(int(0.06 * steps), 1)
    attack.size_decr = max(int(0.03 * steps), 1)


def quietly(build: Callable[[], Any]) -> Any:
    """`build()` with what it prints to stdout sent to the debug log instead."""
    # torchattacks prints (to stdout) when a model has no parameters to read the device from.
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        made = build()
    if captured.getvalue().strip():
        logger.debug("torchattacks: %s", captured.getvalue().strip())
    return made


def build_attack(
    spec: AttackSpec,
    attacked: nn.Module,
    expected: nn.Module,
    *,
    norm: str,
    eps: float,
    num_classes: int,
    device: torch.device,
    eot: int = 1,
    steps: int | None = None,
    step_size: float | None = None,
) -> BuiltAttack:
    """Build `spec` at one ε against a deployed pipeline.

    `attacked` is what attacks with native EOT see (one noise draw per
    forward pass); `expected` is the expectation model (the mean over `eot`
    draws) that every other attack sees. For deterministic pipelines both
    are the same module.
    """
    check_norm(spec, norm)
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    if spec.name in ("autoattack", "autoattack-rand"):
        return _build_autoattack(spec, attacked, expected, norm=norm, eps=eps, num_classes=num_classes,
                                 device=device, eot=eot, steps=steps)
    return _build_torchattack(spec, attacked, expected, norm=norm, eps=eps, num_classes=num_classes,
                              device=device, eot=eot, steps=steps, step_size=step_size)


def _build_torchattack(spec: AttackSpec, attacked: nn.Module, expected: nn.Module, *, norm: str, eps: float,
                       num_classes: int, device: torch.device, eot: int, steps: int | None,
                       step_size: float | None) -> BuiltAttack:
    import torchattacks  # deferred: importing torchattacks costs ~0.8 s

    name = spec.name
    if name == "apgd-dlr" and num_classes < MIN_CLASSES_DLR:
        return BuiltAttack([], [f"apgd-dlr: the DLR loss needs >= {MIN_CLASSES_DLR} classes, "
                                f"the model has {num_classes}"])
    if name == "apgd-t" and num_classes < MIN_CLASSES_TARGETED_DLR:
        return BuiltAttack([], [f"apgd-t: the targeted DLR loss needs >= {MIN_CLASSES_TARGETED_DLR} classes, "
                                f"the model has {num_classes}"])
    # torchattacks' targeted attacks take n_classes and target n_classes - 1 classes.
    target_classes = min(AUTOATTACK_TARGETS, num_classes - 1) + 1
    model = attacked if spec.native_eot else expected
    if name == "fgsm":
        attack = quietly(lambda: torchattacks.FGSM(model, eps=eps))
    elif name == "pgd":
        attack = quietly(lambda: torchattacks.PGD(model, eps=eps,
                                                   alpha=step_size if step_size is not None else eps / 4,
                                                   steps=steps or 10, random_start=True))
    elif name == "pgd-l2":
        attack = quietly(lambda: torchattacks.PGDL2(model, eps=eps,
                                                     alpha=step_size if step_size is not None else 0.2 * eps,
                                                     steps=steps or 10, random_start=True))
    elif name == "eot-pgd":
        attack = quietly(lambda: torchattacks.EOTPGD(model, eps=eps,
                                                      alpha=step_size if step_size is not None else eps / 4,
                                                      steps=steps or 10, eot_iter=eot, random_start=True))
    elif name == "cw-l2":
        attack = quietly(lambda: torchattacks.CW(model, c=1, kappa=0, steps=steps or 50,
                                                  lr=step_size if step_size is not None else 0.01))
    elif name in ("apgd-ce", "apgd-dlr"):
        attack = quietly(lambda: torchattacks.APGD(model, norm=norm, eps=eps, steps=steps or 100, n_restarts=1,
                                                    loss="ce" if name == "apgd-ce" else "dlr", eot_iter=eot, rho=0.75))
    elif name == "apgd-t":
        attack = quietly(lambda: torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps or 100, n_restarts=1,
                                                     eot_iter=eot, rho=0.75, n_classes=target_classes))
    elif name == "fab-t":
        attack = quietly(lambda: torchattacks.FAB(model, norm=norm, eps=eps, steps=steps or 100, n_restarts=1,
                                                   multi_targeted=True, n_classes=target_classes))
    elif name == "square":
        attack = quietly(lambda: torchattacks.Square(model, norm=norm, eps=eps, n_queries=steps or 5000,
                                                      n_restarts=1, p_init=0.8, loss="margin", resc_schedule=True))
    else:  # pragma: no cover - every catalog entry is handled above
        raise AssertionError(f"no builder for attack {name}")
    attack.set_device(device)

    def run(x: Tensor, y: Tensor, seed: int) -> Tensor:
        seed_torch(seed, device)
        if hasattr(attack, "seed"):
            attack.seed = seed
        return attack(x, y).detach()

    return BuiltAttack([AttackComponent(name, run, white_box=spec.white_box, minimization=spec.minimization)], [])


def _build_autoattack(spec: AttackSpec, attacked: nn.Module, expected: nn.Module, *, norm: str, eps: float,
                      num_classes: int, device: torch.device, eot: int, steps: int | None) -> BuiltAttack:
    version = "standard" if spec.name == "autoattack" else "rand"
    suite = AutoAttack(attacked, norm=norm, eps=eps, version=version, seed=0, device=device)
    suite.logger = logging.getLogger("auto-attack")
    # AutoAttack's own counts (its _set_version), capped at the model's other classes.
    apgd_targets = AUTOATTACK_TARGETS_L1_APGD if norm == "L1" and version == "standard" else AUTOATTACK_TARGETS
    suite.apgd_targeted.n_target_classes = min(apgd_targets, num_classes - 1)
    suite.fab.n_target_classes = min(AUTOATTACK_TARGETS, num_classes - 1)
    # APGD averages its gradients over eot draws itself; FAB and Square see the expectation model.
    suite.apgd.eot_iter = eot
    suite.apgd_targeted.eot_iter = eot
    suite.fab.predict = expected
    suite.square.predict = expected
    if steps is not None:
        _apgd_schedule(suite.apgd, steps)
        _apgd_schedule(suite.apgd_targeted, steps)
        suite.fab.n_iter = steps

    skipped: list[str] = []
    components: list[AttackComponent] = []
    for member in suite.attacks_to_run:
        if member == "apgd-t" and num_classes < MIN_CLASSES_TARGETED_DLR:
            skipped.append(f"apgd-t: the targeted DLR loss needs >= {MIN_CLASSES_TARGETED_DLR} classes, "
                           f"the model has {num_classes}")
            continue
        if member == "apgd-dlr" and num_classes < MIN_CLASSES_DLR:
            skipped.append(f"apgd-dlr: the DLR loss needs >= {MIN_CLASSES_DLR} classes, the model has {num_classes}")
            continue
        components.append(AttackComponent(member, _autoattack_member(suite, member), white_box=member != "square"))
    return BuiltAttack(components, skipped)


def _autoattack_member(suite: Any, member: str) -> Callable[[Tensor, Tensor, int], Tensor]:
    """Run one member the way AutoAttack.run_standard_evaluation does (same settings, same seeding)."""

    def run(x: Tensor, y: Tensor, seed: int) -> Tensor:
        with torch.no_grad():
            if member in ("apgd-ce", "apgd-dlr"):
                suite.apgd.loss = "ce" if member == "apgd-ce" else "dlr"
                suite.apgd.seed = seed
                adv = suite.apgd.perturb(x, y)
            elif member == "apgd-t":
                suite.apgd_targeted.seed = seed
                adv = suite.apgd_targeted.perturb(x, y)
            elif member == "fab-t":
                suite.fab.targeted = True
                suite.fab.n_restarts = 1
                suite.fab.seed = seed
                adv = suite.fab.perturb(x, y)
            elif member == "square":
                suite.square.seed = seed
                adv = suite.square.perturb(x, y)
            else:  # pragma: no cover - the suites' members are listed above
                raise AssertionError(f"unknown AutoAttack member {member}")
        return adv.detach()

    return run
