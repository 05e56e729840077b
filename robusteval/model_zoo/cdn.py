"""cdn: Classification–Denoising Network (Thiry & Guth 2024), at digits scale.

One noise-conditional network f(x, σ) → logits models the joint density of
noisy images and labels, log p_σ(x, y) = f_y(x, σ) + const. From it:

- classification: p(y | x, σ) = softmax f(x, σ);
- energy: −log p_σ(x) = −logsumexp_y f_y(x, σ) + const;
- denoising by Tweedie–Miyasawa: E[x0 | x] = x + σ²∇ₓ log p_σ(x) = x + σ²∇ₓ logsumexp f(x, σ),
  and class-conditionally E[x0 | x, y] = x + σ²∇ₓ f_y(x, σ).

Training: cross-entropy on noisy inputs plus denoising score matching, both
integrated over σ drawn log-uniformly in [0.01, 1].

σ enters through an embedding of log σ and through the network's input and
output scaling (f = G(c_in(σ)·(x − ½), log σ) / (σ·c_in(σ)), c_in = 1/√(σ² + σ_d²)),
which keeps ∇ₓ f ≈ −n/σ reachable with O(1) input gradients of G over two
decades of σ. The network is evaluated at σ clamped to its trained range
[0.01, 1]: clean input (σ = 0) is classified and scored as at σ = 0.01, which
is below the digits' own quantisation step (1/16); the Tweedie formula uses the
true σ, so denoise(x, 0) = x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset
from robusteval.model_zoo.diffusion import input_gradient
from robusteval.model_zoo.noise_nets import ConditionedEnergyNet
from robusteval.model_zoo.registry import register_model
from robusteval.training import DiffusionRecipe, TrainContext
from robusteval.training.loops import (
    DiffusionLosses,
    DiffusionObjective,
    FigureNames,
    train_diffusion_style,
)

SIGMA_MIN = 0.01
SIGMA_MAX = 1.0
# Standard deviation of digits pixels (≈ 0.42): the input scaling's σ_data.
SIGMA_DATA = 0.5


def _check_denoising_sigma(sigma: Tensor) -> None:
    """Tweedie needs the score at the real σ: outside the trained range the network would answer for the
    clamped σ (at σ = 1 for any larger σ) and the denoiser would pair that score with the real σ². σ = 0 is
    exact (nothing to remove)."""
    noisy = sigma[sigma > 0]
    if noisy.numel() and bool(((noisy < SIGMA_MIN * (1 - 1e-6)) | (noisy > SIGMA_MAX * (1 + 1e-6))).any()):
        raise ValueError(f"cdn denoises at sigma in its training range [{SIGMA_MIN:g}, {SIGMA_MAX:g}] (or 0), got "
                         f"sigma from {float(noisy.min()):g} to {float(noisy.max()):g}")


class ClassificationDenoisingNetwork(JointModel):
    """The CDN joint model: logits, energy and Tweedie–Miyasawa denoising from one network."""

    capabilities = frozenset({"logits", "denoise", "energy"})

    def __init__(self, info: DatasetInfo, width: int = 256, blocks: int = 2):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.net = ConditionedEnergyNet(info.input_shape, info.num_classes, width=width, blocks=blocks)

    def joint_logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        """f(x, σ) = log p_σ(x, y) + const for x = x0 + σ·n in the [0, 1] pixel scale; σ is (B,)."""
        s = sigma.clamp(SIGMA_MIN, SIGMA_MAX)
        c_in = (s.pow(2) + SIGMA_DATA**2).rsqrt()
        # log σ mapped to [0, 1] over the trained range: the embedding's coordinate.
        coordinate = (s.log() - math.log(SIGMA_MIN)) / (math.log(SIGMA_MAX) - math.log(SIGMA_MIN))
        g = self.net(c_in.view(-1, 1, 1, 1) * (x - 0.5), coordinate)
        return g / (s * c_in).view(-1, 1)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.joint_logits(x, sigma)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -self.joint_logits(x, sigma).logsumexp(1)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        _check_denoising_sigma(sigma)
        score = input_gradient(lambda z: self.joint_logits(z, sigma).logsumexp(1), x)
        return x + sigma.view(-1, 1, 1, 1).pow(2) * score

    def denoise_class(self, x: Tensor, sigma: float | Tensor, y: Tensor) -> Tensor:
        """E[x0 | x, y] = x + σ²∇ₓ f_y(x, σ): the class-conditional Tweedie–Miyasawa denoiser."""
        self._require("denoise")
        s = self._check(x, sigma)
        _check_denoising_sigma(s)
        y = torch.as_tensor(y, dtype=torch.long, device=x.device)
        if y.shape != (x.shape[0],) or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"y must be {x.shape[0]} class indices in [0, {self.num_classes}), got {y.tolist()}")
        score = input_gradient(lambda z: self.joint_logits(z, s).gather(1, y.view(-1, 1)).squeeze(1), x)
        return x + s.view(-1, 1, 1, 1).pow(2) * score


@dataclass(frozen=True)
class CDNRecipe(DiffusionRecipe):
    """The diffusion-style loop with σ drawn log-uniformly in [sigma_min, sigma_max]."""

    ce_weight: float = 1.0
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX

    def check(self) -> None:
        super().check()
        self._require_positive("sigma_min")
        if not self.sigma_max > self.sigma_min:
            self._fail("sigma_max", f"> sigma_min = {self.sigma_min}")


def cdn_objective(model: ClassificationDenoisingNetwork, ctx: TrainContext, recipe: CDNRecipe) -> DiffusionObjective:
    """CE of softmax f(x0 + σn, σ) + denoising score matching ‖x + σ²∇ₓ logsumexp f − x0‖²/σ², σ log-uniform."""
    log_min, log_max = math.log(recipe.sigma_min), math.log(recipe.sigma_max)

    def losses(x0: Tensor, y: Tensor) -> DiffusionLosses:
        sigma = torch.exp(log_min + (log_max - log_min) * ctx.rand(x0.shape[0]))
        noise = ctx.randn_like(x0)
        x = (x0 + sigma.view(-1, 1, 1, 1) * noise).requires_grad_(True)
        logits = model.joint_logits(x, sigma)
        (score,) = torch.autograd.grad(logits.logsumexp(1).sum(), x, create_graph=True)
        # ‖denoised − x0‖²/σ² = ‖σ·score + n‖²: score matching weighted so every σ counts alike.
        dsm_loss = (sigma.view(-1, 1, 1, 1) * score + noise).pow(2).flatten(1).sum(1).mean()
        return DiffusionLosses(dsm_loss, F.cross_entropy(logits, y), logits)

    return losses


def train_cdn(model: ClassificationDenoisingNetwork, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    recipe = ctx.recipe_as(CDNRecipe)
    return train_diffusion_style(
        model, model.net, data, ctx, recipe, cdn_objective(model, ctx, recipe), "cdn", FigureNames("dsm", "noisy_accuracy")
    )


@register_model(
    "cdn",
    family="joint",
    system="Classification–Denoising Network (CDN)",
    paper="Thiry & Guth 2024, Classification-Denoising Networks (arXiv:2410.03505)",
    capabilities={"logits", "denoise", "energy"},
    trainer=train_cdn,
    default_epochs=250,
    recipe=CDNRecipe(),
    description=(
        "Noise-conditional network f(x, σ) → logits with log p_σ(x, y) = f_y (σ through a log σ embedding and "
        "input/output scaling); classification softmax f(x, σ), energy −logsumexp f, denoising by "
        "Tweedie–Miyasawa x + σ²∇ₓ logsumexp f (and x + σ²∇ₓ f_y per class). Trained with cross-entropy on noisy "
        "inputs + denoising score matching over σ log-uniform in [0.01, 1]."
    ),
)
def cdn(info: DatasetInfo) -> JointModel:
    return ClassificationDenoisingNetwork(info)
