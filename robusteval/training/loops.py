"""The two training loops the joint models share; each model supplies only its objective.

- `train_diffusion_style` (cdn, egc, jdm): Adam, cosine LR over the epochs,
  an exponential moving average of the weights that replaces them at the
  end; a batch's loss is the model's denoising term + ce_weight · its
  cross-entropy.
- `train_sgld_style` (jem, gmmc): persistent contrastive divergence, with
  class-conditional SGLD chains from a replay buffer for the model samples,
  Adam with linear warm-up then cosine decay per step; optional
  discriminative-only epochs first (gmmc's joint schedule).

The shipped weights are reproduced bit for bit by `robusteval train`, so the
loops keep a fixed order of random draws (shuffle, then the objective's draws,
then the chains') and of floating-point operations; change either and the
shipped weights must be retrained.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.data import ImageDataset
from robusteval.training.context import TrainContext
from robusteval.training.recipes import DiffusionRecipe, SGLDRecipe
from robusteval.training.sgld import ReplayBuffer, sgld


# --- diffusion-style -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionLosses:
    """One batch of a diffusion-style objective: loss = denoising + ce_weight · ce."""

    denoising: Tensor
    ce: Tensor
    logits: Tensor  # whose accuracy the progress bar and the figures track


# (clean images, labels) -> the batch's losses; draws its noise from the TrainContext.
DiffusionObjective = Callable[[Tensor, Tensor], DiffusionLosses]


@dataclass(frozen=True)
class FigureNames:
    """What a loop calls its figures: train_<loss>, train_ce, train_<accuracy>."""

    loss: str
    accuracy: str


def train_diffusion_style(
    model: nn.Module,
    net: nn.Module,
    data: ImageDataset,
    ctx: TrainContext,
    recipe: DiffusionRecipe,
    objective: DiffusionObjective,
    desc: str,
    names: FigureNames,
) -> dict[str, float]:
    """Train `net` (the part of `model` that has weights) on `objective`; keep its EMA weights."""
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=ctx.epochs)
    ema = copy.deepcopy(net).requires_grad_(False)
    bar = ctx.epoch_bar(desc)
    loss_sum = ce_sum = correct = seen = 0.0
    for _ in bar:
        loss_sum = ce_sum = correct = seen = 0.0
        for x, y in ctx.batches(data, recipe.batch_size):
            model.train()
            losses = objective(x, y)
            loss = losses.denoising + recipe.ce_weight * losses.ce
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for average, current in zip(ema.parameters(), net.parameters()):
                    average.lerp_(current, 1 - recipe.ema_decay)
            loss_sum += float(losses.denoising.detach()) * len(y)
            ce_sum += float(losses.ce.detach()) * len(y)
            correct += float((losses.logits.detach().argmax(1) == y).sum())
            seen += len(y)
        schedule.step()
        bar.set_postfix(
            {names.loss: f"{loss_sum / seen:.4f}", "ce": f"{ce_sum / seen:.3f}", names.accuracy: f"{correct / seen:.3f}"}
        )
    net.load_state_dict(ema.state_dict())
    return {f"train_{names.loss}": loss_sum / seen, "train_ce": ce_sum / seen, f"train_{names.accuracy}": correct / seen}


# --- SGLD-style ----------------------------------------------------------------------------------
class ClassEnergyModel(Protocol):
    def train(self, mode: bool = True) -> nn.Module: ...

    def class_energy(self, x: Tensor, y: Tensor) -> Tensor:
        """E(x, y) = −log p(x, y) + const, (B,): what the class-conditional chains descend."""
        ...


@dataclass(frozen=True)
class EnergyLosses:
    """One batch of an SGLD-style objective; energies are None in discriminative steps."""

    loss: Tensor
    logits: Tensor  # of the data batch
    e_data: Tensor | None = None
    e_sample: Tensor | None = None


@dataclass(frozen=True)
class EnergyObjective:
    """What a model puts into the SGLD-style loop.

    `chain_labels(y)` picks the classes of the batch's chains (it may draw from
    the TrainContext); `contrastive(x_data, x_sample, y)` is the generative
    step's loss; `discriminative(x_data, y)` the loss of a discriminative-only
    epoch, for the first `discriminative_epochs` epochs.
    """

    chain_labels: Callable[[Tensor], Tensor]
    contrastive: Callable[[Tensor, Tensor, Tensor], EnergyLosses]
    discriminative: Callable[[Tensor, Tensor], EnergyLosses] | None = None
    discriminative_epochs: int = 0


def warmup_cosine(optimiser: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR factor: linear warm-up over `warmup_steps`, times a cosine decay over `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda i: min(1.0, (i + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * i / total_steps)),
    )


def train_sgld_style(
    model: ClassEnergyModel,
    net: nn.Module,
    data: ImageDataset,
    ctx: TrainContext,
    recipe: SGLDRecipe,
    objective: EnergyObjective,
    desc: str,
) -> dict[str, float]:
    """Train `net` by PCD: each generative step advances a batch of buffer chains, then steps on the loss."""
    if objective.discriminative_epochs > 0 and objective.discriminative is None:
        raise ValueError("discriminative epochs need a discriminative objective")
    cpu_started = time.process_time()
    buffer = ReplayBuffer(recipe.buffer_size, data.input_shape, ctx.generator, recipe.reinit, num_classes=data.num_classes)
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = warmup_cosine(optimiser, ctx.epochs * math.ceil(len(data) / recipe.batch_size), recipe.warmup_steps)
    chain = recipe.chain
    bar = ctx.epoch_bar(desc)
    sums: dict[str, float] = {}
    seen = 0
    for epoch in bar:
        generative = epoch >= objective.discriminative_epochs
        sums = {"ce": 0.0, "correct": 0.0, "e_data": 0.0, "e_sample": 0.0}
        seen = 0
        for x, y in ctx.batches(data, recipe.batch_size):
            model.train()
            x_data = x + recipe.data_noise * ctx.randn_like(x)
            if generative:
                y_chain = objective.chain_labels(y)
                index, start = buffer.draw(len(x), y_chain)
                x_sample = sgld(lambda v: model.class_energy(v, y_chain), start.to(ctx.device), chain, ctx.generator)
                buffer.store(index, x_sample)
                losses = objective.contrastive(x_data, x_sample, y)
            else:
                assert objective.discriminative is not None
                losses = objective.discriminative(x_data, y)
            optimiser.zero_grad(set_to_none=True)
            losses.loss.backward()
            optimiser.step()
            schedule.step()
            logits = losses.logits.detach()
            sums["ce"] += float(F.cross_entropy(logits, y)) * len(y)
            sums["correct"] += float((logits.argmax(1) == y).sum())
            if losses.e_data is not None and losses.e_sample is not None:
                sums["e_data"] += float(losses.e_data.detach().sum())
                sums["e_sample"] += float(losses.e_sample.detach().sum())
            seen += len(y)
        postfix = {"ce": f"{sums['ce'] / seen:.3f}", "acc": f"{sums['correct'] / seen:.3f}"}
        if generative:
            postfix.update(e_data=f"{sums['e_data'] / seen:.2f}", e_sample=f"{sums['e_sample'] / seen:.2f}")
        bar.set_postfix(postfix)
    figures = {"train_cross_entropy": sums["ce"] / seen, "train_accuracy": sums["correct"] / seen}
    if ctx.epochs > objective.discriminative_epochs:
        figures.update(train_energy_data=sums["e_data"] / seen, train_energy_samples=sums["e_sample"] / seen)
    # Single-threaded CPU time: what an idle core would take, whatever else shares the machine.
    figures["train_cpu_seconds"] = time.process_time() - cpu_started
    return figures
