"""What the batch attacker and the run checks read of a prepared attack: a small protocol, so that they
depend on these fields and not on the engine's `AttackJob` (which keeps them)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from robusteval.attacks.catalog import AttackSpec
from robusteval.core.interface import JointModel
from robusteval.core.vocabulary import DefenseSpec
from robusteval.runs.shards import Shard


class AttackPlan(Protocol):
    """A prepared attack evaluation as the batch attacker and the run checks see it."""

    model: JointModel
    x: Tensor  # the run's points (CPU), moved to `device` a batch at a time
    y: Tensor
    spec: AttackSpec
    norm: str
    eps: list[float]
    defense: DefenseSpec
    variants: list[str]  # the gradient modes attacked: ["full"], ["bpda"] or both
    eot: int
    steps: int | None
    step_size: float | None
    seed: int
    batch_size: int
    device: torch.device
    large_eps_check: bool
    masking_checks: bool
    shard: Shard | None

    @property
    def n(self) -> int: ...
