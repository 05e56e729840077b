"""Stochastic gradient Langevin dynamics and a replay buffer for energy-based models.

Shared by `jem` and `gmmc`. Images live in the [0, 1] pixel scale of the
contract; chains are clamped to [0, 1] after every step so that samples are
valid images.

The update is the one used by JEM (Grathwohl et al. 2020) and its follow-ups:

    x ← clamp(x − α ∇ₓ E(x) + s · n, 0, 1),   n ~ N(0, I)

with a step size α and a noise scale s chosen independently (the "SGLD" of
these papers is not a calibrated Langevin sampler: s is far below √(2α)).
JEM's α = 1, s = 0.01 on [-1, 1] images correspond to α = 1/4, s = 0.005 on
[0, 1] images (the gradient doubles and the displacement halves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from robusteval.core import draws

EnergyFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SGLDConfig:
    """Step size α, noise scale s and number of steps of a chain."""

    steps: int = 20
    step_size: float = 0.25
    noise: float = 0.005

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"SGLD steps must be >= 0, got {self.steps}")
        if self.step_size <= 0:
            raise ValueError(f"SGLD step_size must be > 0, got {self.step_size}")
        if self.noise < 0:
            raise ValueError(f"SGLD noise must be >= 0, got {self.noise}")


def sgld(
    energy: EnergyFn,
    start: Tensor,
    config: SGLDConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run `config.steps` SGLD steps on `energy` (a (B,) tensor per batch) from `start`.

    Only ∇ₓ is taken: parameter gradients are neither computed into `.grad`
    nor kept, so this can run inside a training step. Works under a caller's
    `torch.no_grad()` (gradients are enabled locally). Noise is drawn from
    `generator` on its device (a CPU generator, or none: the same chains on any
    device) and moved to the chain's device.
    """
    x = start.detach().clone()
    for _ in range(config.steps):
        with torch.enable_grad():
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        noise = draws.randn(tuple(x.shape), generator, x.device, x.dtype)
        x = (x.detach() - config.step_size * grad + config.noise * noise).clamp_(0.0, 1.0)
    return x.detach()


def uniform_noise(n: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """n images of i.i.d. U[0, 1] pixels: the chains' initial distribution (on the CPU, drawn on the
    generator's device)."""
    return draws.rand((n, *shape), generator, "cpu")


class ReplayBuffer:
    """Persistent chains for PCD training (Tieleman 2008; Du & Mordatch 2019; JEM).

    Holds `size` images on the CPU, started as uniform noise. `draw` picks
    slots at random and restarts each picked chain from fresh noise with
    probability `reinit`; `store` writes the advanced chains back.

    With `num_classes` set the buffer is class-conditional, as JEM's
    `class_cond_p_x_sample` and GMMC's buffers are: slot i belongs to class
    i mod num_classes, and `draw(..., y=labels)` only picks slots of those
    classes.
    """

    def __init__(
        self,
        size: int,
        shape: tuple[int, ...],
        generator: torch.Generator,
        reinit: float = 0.05,
        num_classes: int | None = None,
    ):
        if size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        if not 0.0 <= reinit <= 1.0:
            raise ValueError(f"reinit must be a probability in [0, 1], got {reinit}")
        if num_classes is not None and (num_classes < 1 or size % num_classes):
            raise ValueError(f"buffer size {size} must be a positive multiple of num_classes {num_classes}")
        self.shape = tuple(shape)
        self.generator = generator
        self.reinit = float(reinit)
        self.num_classes = num_classes
        self.images = uniform_noise(size, self.shape, generator)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def draw(self, n: int, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(slot indices, starting images) for n chains; class-y slots when y is given."""
        if y is None:
            index = torch.randint(0, len(self), (n,), generator=self.generator)
        else:
            if self.num_classes is None:
                raise ValueError("this replay buffer is unconditional; draw it without y")
            per_class = len(self) // self.num_classes
            y = y.detach().cpu().long()
            index = y + self.num_classes * torch.randint(0, per_class, (n,), generator=self.generator)
        start = self.images[index].clone()
        fresh = torch.rand(n, generator=self.generator) < self.reinit
        if bool(fresh.any()):
            start[fresh] = uniform_noise(int(fresh.sum()), self.shape, self.generator)
        return index, start

    def store(self, index: Tensor, images: Tensor) -> None:
        """Write advanced chains back to their slots."""
        self.images[index] = images.detach().cpu()
