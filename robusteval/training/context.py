"""What every trainer gets: the epochs, the seeded generator, the recipe; minibatches and accuracy.

Training is deterministic on the CPU: one seed drives every random draw, and
training runs single-threaded so the weights do not depend on the number of
cores (a multi-threaded reduction may sum in another order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from robusteval.core import draws
from robusteval.core.interface import JointModel
from robusteval.data import ImageDataset
from robusteval.training.recipes import Recipe

R = TypeVar("R", bound=Recipe)


@dataclass
class TrainContext:
    """What a trainer gets besides the model and the data."""

    epochs: int
    seed: int
    generator: torch.Generator
    progress: bool = True
    recipe: Recipe = field(default_factory=Recipe)
    # Where the model trains. Every draw comes from the CPU `generator` and is moved here, so a run's
    # random stream is the same on every device (its arithmetic is not: see README, Reproduction).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def recipe_as(self, kind: type[R]) -> R:
        """The recipe, typed; a trainer handed another kind of recipe fails here, before any step."""
        if not isinstance(self.recipe, kind):
            raise TypeError(f"this trainer needs a {kind.__name__}, got {type(self.recipe).__name__}")
        return self.recipe

    def epoch_bar(self, desc: str) -> tqdm:
        """A progress bar over epochs; trainers set its postfix to loss and accuracy."""
        return tqdm(range(self.epochs), desc=desc, disable=not self.progress, unit="epoch", leave=True)

    def randn_like(self, x: Tensor) -> Tensor:
        return draws.randn(tuple(x.shape), self.generator, x.device, x.dtype)

    def rand(self, *shape: int) -> Tensor:
        return draws.rand(shape, self.generator, self.device)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generator).to(self.device)

    def batches(self, data: ImageDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled pass over the data set, each minibatch on the training device."""
        for x, y in minibatches(data, batch_size, self.generator):
            yield x.to(self.device), y.to(self.device)


def minibatches(data: ImageDataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over the data set."""
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        yield data.x[index], data.y[index]


@torch.no_grad()
def accuracy(model: JointModel, data: ImageDataset, sigma: float = 0.0, batch_size: int = 500) -> float:
    """Top-1 accuracy of logits(x, σ) on clean x (σ = 0) or on x + σ·n with a fixed noise seed."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(model.device)
        y = data.y[start : start + batch_size].to(model.device)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        correct += int((model.logits(x, sigma).argmax(1) == y).sum())
    return correct / len(data)
