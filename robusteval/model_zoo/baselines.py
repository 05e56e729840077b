"""Discriminative baselines: standard, Gaussian augmentation, PGD-AT, denoised smoothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset, dataset_info
from robusteval.model_zoo.backbones import DnCNN, SmallCNN
from robusteval.model_zoo.registry import (
    load_shipped_weights,
    register_model,
    registered,
)
from robusteval.training import Recipe, TrainContext

BATCH_SIZE = 64
LEARNING_RATE = 1e-3


class CNNClassifier(JointModel):
    """The shared small CNN as a JointModel. σ is not an input: it just sees the image."""

    capabilities = frozenset({"logits"})

    def __init__(self, info: DatasetInfo):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.net = SmallCNN(info.input_shape[0], info.num_classes)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(x)


class DenoisedClassifier(JointModel):
    """A DnCNN denoiser in front of a classifier (Salman et al. 2020, denoised smoothing).

    logits(x, σ) classifies denoise(x, σ) for noisy rows and x itself at σ = 0.
    """

    capabilities = frozenset({"logits", "denoise"})

    def __init__(self, info: DatasetInfo):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.classifier = SmallCNN(info.input_shape[0], info.num_classes)
        self.denoiser = DnCNN(info.input_shape[0])

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser(x, sigma)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        noisy = (sigma > 0).view(-1, 1, 1, 1)
        cleaned = torch.where(noisy, self.denoiser(x, sigma), x)
        return self.classifier(cleaned)


@dataclass(frozen=True)
class GaussianRecipe(Recipe):
    """Cross-entropy on x + σ·n (Cohen et al.)."""

    sigma: float = 0.25

    def check(self) -> None:
        super().check()
        self._require_positive("sigma")


@dataclass(frozen=True)
class PGDRecipe(Recipe):
    """Cross-entropy on L∞ PGD examples of radius eps, `steps` steps (Madry et al.)."""

    eps: float = 0.1
    steps: int = 10

    def check(self) -> None:
        super().check()
        self._require_positive("eps", "steps")


@dataclass(frozen=True)
class DenoiserRecipe(Recipe):
    """MSE of a denoiser over σ ~ U[0, sigma_max]."""

    sigma_max: float = 0.5

    def check(self) -> None:
        super().check()
        self._require_positive("sigma_max")


def _classifier_training(
    model: CNNClassifier, data: ImageDataset, ctx: TrainContext, perturb, desc: str
) -> dict[str, float]:
    """Adam on cross-entropy of perturb(x, y); shows loss and accuracy per epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=ctx.epochs)
    bar = ctx.epoch_bar(desc)
    loss_sum = correct = seen = 0.0
    for _ in bar:
        loss_sum = correct = seen = 0.0
        for x, y in ctx.batches(data, BATCH_SIZE):
            model.train()
            inputs = perturb(x, y)
            logits = model.net(inputs)
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        schedule.step()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}


def train_standard(model: CNNClassifier, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    return _classifier_training(model, data, ctx, lambda x, y: x, "standard")


def train_gaussian(model: CNNClassifier, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    sigma = ctx.recipe_as(GaussianRecipe).sigma
    # Cohen et al.: classify x + σ·n, without clipping to [0, 1].
    return _classifier_training(model, data, ctx, lambda x, y: x + sigma * ctx.randn_like(x), f"gaussian σ={sigma}")


def pgd_linf(model: CNNClassifier, x: Tensor, y: Tensor, eps: float, steps: int, ctx: TrainContext) -> Tensor:
    """Madry et al.'s PGD: random start in the ε-ball, `steps` signed-gradient steps of 2.5·ε/steps."""
    step_size = 2.5 * eps / steps
    was_training = model.training
    model.eval()
    delta = (ctx.rand(*x.shape) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model.net(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


def train_pgd_at(model: CNNClassifier, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    recipe = ctx.recipe_as(PGDRecipe)
    eps, steps = recipe.eps, recipe.steps
    return _classifier_training(
        model, data, ctx, lambda x, y: pgd_linf(model, x, y, eps, steps, ctx), f"pgd-at ε={eps}"
    )


def train_dncnn(model: DenoisedClassifier, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """Keep the shipped `standard` classifier; train the denoiser alone with MSE over σ ∈ U[0, σ_max]."""
    entry, info = registered("standard"), dataset_info(data.name)  # `standard` is registered above, in this module
    standard = entry.build(info)
    load_shipped_weights(standard, entry.card, info)
    model.classifier.load_state_dict(standard.net.state_dict())
    model.classifier.requires_grad_(False)
    sigma_max = ctx.recipe_as(DenoiserRecipe).sigma_max
    optimiser = torch.optim.Adam(model.denoiser.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=ctx.epochs)
    bar = ctx.epoch_bar("dncnn")
    mse_sum = seen = 0.0
    for _ in bar:
        mse_sum = seen = 0.0
        for x, _y in ctx.batches(data, BATCH_SIZE):
            sigma = ctx.rand(x.shape[0]) * sigma_max
            noisy = x + sigma.view(-1, 1, 1, 1) * ctx.randn_like(x)
            loss = F.mse_loss(model.denoiser(noisy, sigma), x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            mse_sum += float(loss.detach()) * len(x)
            seen += len(x)
        schedule.step()
        bar.set_postfix(mse=f"{mse_sum / seen:.5f}")
    return {"train_denoise_mse": mse_sum / seen}


@register_model(
    "standard",
    family="baseline",
    system="Standard CNN",
    paper="baseline: small CNN trained with cross-entropy only",
    capabilities={"logits"},
    trainer=train_standard,
    default_epochs=30,
    description="3-conv CNN trained with cross-entropy on clean images.",
)
def standard(info: DatasetInfo) -> JointModel:
    return CNNClassifier(info)


def _register_gaussian(name: str, sigma: float, epochs: int) -> None:
    register_model(
        name,
        family="baseline",
        system="Gaussian data augmentation",
        paper="Cohen, Rosenfeld & Kolter 2019, Certified Adversarial Robustness via Randomized Smoothing (ICML)",
        capabilities={"logits"},
        trainer=train_gaussian,
        default_epochs=epochs,
        recipe=GaussianRecipe(sigma=sigma),
        description=f"The small CNN trained on x + N(0, {sigma}²) (no clipping): the classic smoothing base classifier.",
    )(CNNClassifier)


# Stronger noise makes the task harder: more epochs keep clean accuracy >= 95%.
_register_gaussian("gaussian", 0.25, epochs=60)
_register_gaussian("gaussian-s0.12", 0.12, epochs=40)
_register_gaussian("gaussian-s0.5", 0.5, epochs=100)


@register_model(
    "pgd-at",
    family="baseline",
    system="PGD adversarial training",
    paper="Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks (ICLR)",
    capabilities={"logits"},
    trainer=train_pgd_at,
    default_epochs=30,
    recipe=PGDRecipe(eps=0.1, steps=10),
    description="The small CNN trained on L∞ PGD examples (ε = 0.1, 10 steps of 2.5ε/10, random start).",
)
def pgd_at(info: DatasetInfo) -> JointModel:
    return CNNClassifier(info)


@register_model(
    "dncnn+standard",
    family="baseline",
    system="Denoised smoothing",
    paper="Salman et al. 2020, Denoised Smoothing: A Provable Defense for Pretrained Classifiers (NeurIPS)",
    capabilities={"logits", "denoise"},
    trainer=train_dncnn,
    default_epochs=40,
    recipe=DenoiserRecipe(sigma_max=0.5),
    description="A DnCNN (noise-level map input) trained with MSE for σ ∈ [0, 0.5], in front of the shipped `standard`.",
)
def dncnn_standard(info: DatasetInfo) -> JointModel:
    return DenoisedClassifier(info)
