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
  random start and the full p schedule), then `escalation:vertex-search`
  (L∞) on the points Square left standing.

The vertex search uses the model's structure where it has no gradient to give:
the worst case of an L∞ ball is mostly found at its vertices, and a model that
acts on each pixel through a front end (rounding, bit-depth reduction) changes
its margin by one term per pixel. For each of the `VERTEX_TARGETS` classes
most likely after the true one (by the clean logits), the search starts at x
and visits the coordinates once per sweep in a seeded random order, setting
each to the lower end of the ball, the upper end or leaving it, whichever
raises logit_target − logit_true most (one batched forward pass per end and
coordinate); a point is done once a trial is misclassified. Up to
`VERTEX_SWEEPS` sweeps, stopping when a sweep improves nothing. When that
margin is a sum of per-coordinate terms (a linear classifier behind any
monotone per-pixel front end), one sweep finds its exact maximum over the
ball, so the stage finds every adversarial example there is. Images of more
than `VERTEX_COORDINATES` values are searched in that many contiguous groups
of coordinates. Cost: at most targets × coordinates × 2 × sweeps forward
passes of the points still standing.

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
from robusteval.core.vocabulary import gradient_variants, parse_defense

REMEDY_PREFIX = "remedy:"
ESCALATION_PREFIX = "escalation:"
RESCALED_RANGE = 10.0
SQUARE_QUERIES = 5000
SQUARE_FACTOR = 4  # restarts of `queries` each: 4× the queries
VERTEX_TARGETS = AUTOATTACK_TARGETS  # target classes of the vertex search (AutoAttack's 9 for targeted attacks)
VERTEX_SWEEPS = 2
VERTEX_COORDINATES = 1024  # larger images are searched in this many groups of coordinates
SQUARE_STAGE = "square-4x"
VERTEX_STAGE = "vertex-search"
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


def escalation_names(norm: str = "Linf") -> list[str]:
    """The gradient-free stages that run against "no usable gradient" under `norm`, in the order they run."""
    return [ESCALATION_PREFIX + SQUARE_STAGE] + ([ESCALATION_PREFIX + VERTEX_STAGE] if norm == "Linf" else [])


def is_black_box(label: str) -> bool:
    """Whether a stage label names an attack that queries only the model's outputs (Square, the vertex search)."""
    return "square" in label or VERTEX_STAGE in label


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
    """Square with SQUARE_FACTOR× `queries` (SQUARE_FACTOR restarts of `queries` each), then under L∞ the
    vertex search (`VertexSearch`), at one ε."""
    import torchattacks  # deferred: importing torchattacks costs ~0.8 s

    if norm == "L1":
        attack: Any = _Perturb(SquareAttack(expected, norm=norm, eps=eps, n_queries=queries,
                                            n_restarts=SQUARE_FACTOR, p_init=0.8, loss="margin", resc_schedule=True,
                                            verbose=False))
    else:
        attack = quietly(lambda: torchattacks.Square(expected, norm=norm, eps=eps, n_queries=queries,
                                                      n_restarts=SQUARE_FACTOR, p_init=0.8, loss="margin",
                                                      resc_schedule=True))
    stages = [_component(ESCALATION_PREFIX + SQUARE_STAGE, attack, device)]
    if norm == "Linf":
        stages.append(AttackComponent(ESCALATION_PREFIX + VERTEX_STAGE, VertexSearch(expected, eps), white_box=False))
    return stages


def recorded_attack_labels(attack: str, gradient: str | None = None, defense: str = "none") -> frozenset[str]:
    """Every attack name a run of `attack` can record as what broke a point (`broken_by`): the attack or its
    suite's members, the remedies and the escalation; each with its gradient variant (`name[full]`,
    `name[bpda]`, `name[surrogate:1]`) when the run attacked several (`--gradient auto`). Unknown attacks are
    a UsageError."""
    spec = resolve_attack(attack)
    names = [*(spec.members or (spec.name,)), *saturation_remedy_names(MIN_CLASSES_TARGETED_DLR), *escalation_names()]
    if gradient == "auto":
        modes = gradient_variants(gradient, parse_defense(defense))
        return frozenset(f"{name}[{mode}]" for name in names for mode in modes)
    return frozenset(names)


class VertexSearch:
    """The greedy coordinate search over the vertices of the L∞ ball described in the module docstring."""

    def __init__(self, model: nn.Module, eps: float):
        self.model = model
        self.eps = eps

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, seed: int) -> Tensor:
        seed_torch(seed, x.device)  # a randomized pipeline's draws, as every stage's
        generator = torch.Generator().manual_seed(seed)  # the order of the coordinates
        shape = x.shape
        flat = x.flatten(1)
        ends = ((flat - self.eps).clamp(0, 1), (flat + self.eps).clamp(0, 1))
        size = flat.shape[1]
        groups = torch.arange(size, device=x.device) * min(VERTEX_COORDINATES, size) // size  # coordinate → group
        logits = self.model(x)
        others = logits.scatter(1, y.view(-1, 1), float("-inf"))
        targets = others.topk(min(VERTEX_TARGETS, logits.shape[1] - 1), dim=1).indices
        found = flat.clone()
        done = logits.argmax(1) != y
        for t in range(targets.shape[1]):
            if bool(done.all()):
                break
            self._toward(flat, y, targets[:, t], ends, groups, generator, found, done, shape)
        return found.view(shape)

    def _toward(self, flat: Tensor, y: Tensor, target: Tensor, ends: tuple[Tensor, Tensor], groups: Tensor,
                generator: torch.Generator, found: Tensor, done: Tensor, shape: torch.Size) -> None:
        """Greedy sweeps raising logit_target − logit_y from x; fills `found` and `done` for the points fooled."""
        current = flat.clone()
        score = self._score(current, y, target, shape)[0]
        for _ in range(VERTEX_SWEEPS):
            improved = False
            for g in torch.randperm(int(groups.max()) + 1, generator=generator).tolist():
                active = (~done).nonzero().squeeze(1)
                if active.numel() == 0:
                    return
                columns = groups == g
                for end in ends:
                    if active.numel() == 0:
                        break
                    trial = current[active].clone()
                    trial[:, columns] = end[active][:, columns]
                    value, fooled = self._score(trial, y[active], target[active], shape)
                    better = value > score[active]
                    current[active[better]] = trial[better]
                    score[active[better]] = value[better]
                    improved |= bool(better.any())
                    found[active[fooled]] = trial[fooled]
                    done[active[fooled]] = True
                    active = active[~fooled]
            if not improved:
                return

    def _score(self, flat: Tensor, y: Tensor, target: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
        logits = self.model(flat.view(flat.shape[0], *shape[1:]))
        value = logits.gather(1, target.view(-1, 1)).squeeze(1) - logits.gather(1, y.view(-1, 1)).squeeze(1)
        return value, logits.argmax(1) != y
