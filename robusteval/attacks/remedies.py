"""The engine's adaptive stages: what it runs by itself when a check finds the attack blind.

- Softmax saturation (the cross-entropy's input gradient underflows to zero
  while the margin's does not): scale-invariant attacks on the points still
  standing, `remedy:apgd-dlr` (untargeted DLR, >= 3 classes),
  `remedy:apgd-t` (targeted DLR, >= 4 classes) and `remedy:apgd-ce-rescaled`
  (APGD-CE on the logits divided by their own per-point range, a constant
  on the backward pass, so softmax sees logits spanning `RESCALED_RANGE`
  units: the decision is unchanged and the gradient no longer underflows).
- No usable gradient (the margin gradient is zero too: rounding, a step
  function, a module autograd cannot see into): `escalation:square-4x`,
  Square with 4× the queries, spent as 4 restarts of the published 5,000
  (each restart attacks the points the previous ones missed, from a fresh
  random start and the full p schedule).

The engine names these stages in `broken_by`; the attack's own components
always run first at each ε, so `standard_robust_accuracy` stays the attack's
own figure.
"""

from __future__ import annotations

from typing import Any

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from robusteval.attacks.catalog import (
    AUTOATTACK_TARGETS,
    MIN_CLASSES_DLR,
    MIN_CLASSES_TARGETED_DLR,
    AttackComponent,
    quietly,
    resolve_attack,
    seed_torch,
)

REMEDY_PREFIX = "remedy:"
ESCALATION_PREFIX = "escalation:"
RESCALED_RANGE = 10.0
SQUARE_QUERIES = 5000
SQUARE_FACTOR = 4  # restarts of `queries` each: 4× the queries
APGD_STEPS = 100


class RescaledLogits(nn.Module):
    """Logits scaled so that each row spans RESCALED_RANGE units; the scale is a constant for autograd."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        logits = self.module(x)
        spread = (logits.amax(1, keepdim=True) - logits.amin(1, keepdim=True)).detach()
        return logits * (RESCALED_RANGE / spread.clamp_min(1e-12))


def saturation_remedy_names(num_classes: int) -> list[str]:
    """The remedies that can run on a model with `num_classes` classes, in the order they run."""
    names = []
    if num_classes >= MIN_CLASSES_DLR:
        names.append("apgd-dlr")
    if num_classes >= MIN_CLASSES_TARGETED_DLR:
        names.append("apgd-t")
    return [REMEDY_PREFIX + name for name in [*names, "apgd-ce-rescaled"]]


def escalation_names() -> list[str]:
    return [ESCALATION_PREFIX + f"square-{SQUARE_FACTOR}x"]


def _component(name: str, attack: object, device: torch.device) -> AttackComponent:
    attack.set_device(device)  # type: ignore[attr-defined]

    def run(x: Tensor, y: Tensor, seed: int) -> Tensor:
        seed_torch(seed, device)
        if hasattr(attack, "seed"):
            attack.seed = seed  # type: ignore[attr-defined]
        return attack(x, y).detach()  # type: ignore[operator]

    return AttackComponent(name, run, white_box="square" not in name)


class _Perturb:
    """A pyautoattack attack called as torchattacks' are (`attack(x, y)`, `seed`, `set_device`).

    torchattacks has no L1 attacks; under L1 the remedies and the escalation are AutoAttack's own L1 APGD and
    Square (the same algorithms with the L1 projection and L1 proposals).
    """

    def __init__(self, attack: Any):
        self.attack = attack
        self.seed = 0

    def set_device(self, device: torch.device) -> None:
        self.attack.device = device

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self.attack.seed = self.seed
        with torch.no_grad():
            return self.attack.perturb(x, y)


def _apgd(model: nn.Module, *, norm: str, eps: float, steps: int, loss: str, eot: int, targets: int = 0) -> Any:
    """APGD with its published settings: torchattacks' for L∞ and L2, pyautoattack's for L1."""
    import torchattacks  # deferred: importing torchattacks costs ~0.8 s

    if norm != "L1":
        if targets:
            return quietly(lambda: torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1,
                                                       eot_iter=eot, rho=0.75, n_classes=targets + 1))
        return quietly(lambda: torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, loss=loss,
                                                  eot_iter=eot, rho=0.75))
    if targets:
        return _Perturb(APGDAttack_targeted(model, n_iter=steps, norm=norm, n_restarts=1, eps=eps, eot_iter=eot,
                                            rho=0.75, n_target_classes=targets, verbose=False))
    return _Perturb(APGDAttack(model, n_iter=steps, norm=norm, n_restarts=1, eps=eps, loss=loss, eot_iter=eot,
                               rho=0.75, verbose=False))


def saturation_remedies(attacked: nn.Module, *, norm: str, eps: float, num_classes: int, device: torch.device,
                        eot: int, steps: int | None) -> list[AttackComponent]:
    """The scale-invariant attacks against softmax saturation, at one ε (APGD with its published settings)."""
    steps = steps or APGD_STEPS
    components = []
    for label in saturation_remedy_names(num_classes):
        name = label[len(REMEDY_PREFIX):]
        if name == "apgd-dlr":
            attack = _apgd(attacked, norm=norm, eps=eps, steps=steps, loss="dlr", eot=eot)
        elif name == "apgd-t":
            attack = _apgd(attacked, norm=norm, eps=eps, steps=steps, loss="dlr", eot=eot,
                           targets=min(AUTOATTACK_TARGETS, num_classes - 1))
        else:
            attack = _apgd(RescaledLogits(attacked), norm=norm, eps=eps, steps=steps, loss="ce", eot=eot)
        components.append(_component(label, attack, device))
    return components


def gradient_free_escalation(expected: nn.Module, *, norm: str, eps: float, device: torch.device,
                             queries: int = SQUARE_QUERIES) -> list[AttackComponent]:
    """Square with SQUARE_FACTOR× `queries` (SQUARE_FACTOR restarts of `queries` each), at one ε."""
    import torchattacks  # deferred: importing torchattacks costs ~0.8 s

    if norm == "L1":
        attack: Any = _Perturb(SquareAttack(expected, norm=norm, eps=eps, n_queries=queries,
                                            n_restarts=SQUARE_FACTOR, p_init=0.8, loss="margin", resc_schedule=True,
                                            verbose=False))
    else:
        attack = quietly(lambda: torchattacks.Square(expected, norm=norm, eps=eps, n_queries=queries,
                                                      n_restarts=SQUARE_FACTOR, p_init=0.8, loss="margin",
                                                      resc_schedule=True))
    return [_component(escalation_names()[0], attack, device)]


def recorded_attack_labels(attack: str, gradient: str | None = None) -> frozenset[str]:
    """Every attack name a run of `attack` can record as what broke a point (`broken_by`): the attack or its
    suite's members, the remedies and the escalation; each with its gradient variant (`name[full]`,
    `name[bpda]`) when the run used both (`--gradient auto`). Unknown attacks are a UsageError."""
    spec = resolve_attack(attack)
    names = [*(spec.members or (spec.name,)), *saturation_remedy_names(MIN_CLASSES_TARGETED_DLR), *escalation_names()]
    if gradient == "auto":
        return frozenset(f"{name}[{mode}]" for name in names for mode in ("full", "bpda"))
    return frozenset(names)
