"""GMMC: the Generative Max-Mahalanobis Classifier (Yang, Ye, Ye, Li & Ji 2021).

A feature extractor φ(x) ∈ R^d and fixed class centres μ_y define a Gaussian
mixture in feature space with identity covariance and a uniform prior:

    log p(x, y) = −½‖φ(x) − μ_y‖² + const,
    logits_y(x) = −½‖φ(x) − μ_y‖²        (so p(y | x) is their softmax),
    E(x) = −logsumexp_y logits_y(x)      (= −log p(x) + const).

The centres are the Max-Mahalanobis centres of Pang, Du & Zhu 2018: equal
norm, pairwise inner product −C²/(L − 1), i.e. the vertices of a regular
simplex, built by their recursive construction (Algorithm 1), with norm C = 10
as in GMMC's experiments.

Training modes (recipe option `mode`), as in the paper:
- discriminative: the Max-Mahalanobis centre loss, mean ½‖φ(x) − μ_y‖² (the
  official `train_gmmc.py`: minus the true class's logit, averaged; it pulls
  each feature onto its own centre and never pushes it from the others, so
  logits do not grow without bound as under softmax cross-entropy);
- generative: maximise log p(x | y) by contrastive divergence, with
  class-conditional SGLD chains from a replay buffer for the model samples;
- joint: the paper's joint schedule, discriminative first (a fraction of the
  epochs), then generative (the authors' scripts: 50 of 150 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset
from robusteval.model_zoo.jem import EnergyCNN
from robusteval.model_zoo.registry import register_model
from robusteval.training import SGLDRecipe, TrainContext
from robusteval.training.loops import EnergyLosses, EnergyObjective, train_sgld_style
from robusteval.training.sgld import SGLDConfig, sgld, uniform_noise

MODES = ("discriminative", "generative", "joint")


def max_mahalanobis_centres(num_classes: int, dim: int, norm: float = 10.0) -> Tensor:
    """The L Max-Mahalanobis centres in R^d (Pang et al. 2018, Algorithm 1), each of length `norm`.

    μ_1 = e_1; for i = 2..L, the first i − 1 coordinates of μ_i solve
    ⟨μ_i, μ_j⟩ = −1/(L − 1) for j < i and coordinate i makes ‖μ_i‖ = 1; then
    all are scaled by `norm`. Needs d ≥ L − 1 (the simplex spans L − 1 dims).
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes for Max-Mahalanobis centres, got {num_classes}")
    if dim < num_classes - 1:
        raise ValueError(f"feature dim must be >= num_classes - 1 = {num_classes - 1}, got {dim}")
    if norm <= 0:
        raise ValueError(f"centre norm must be > 0, got {norm}")
    mu = torch.zeros(num_classes, max(dim, num_classes), dtype=torch.float64)
    mu[0, 0] = 1.0
    for i in range(1, num_classes):
        for j in range(i):
            mu[i, j] = -(1.0 / (num_classes - 1) + mu[i] @ mu[j]) / mu[j, j]
        # Clamp: the last centre's remaining coordinate is 0 up to round-off.
        mu[i, i] = torch.sqrt(torch.clamp(1.0 - mu[i].pow(2).sum(), min=0.0))
    # With d = L − 1 the last coordinate column is identically zero: drop it.
    return (norm * mu[:, :dim]).float()


class GMMC(JointModel):
    """GMMC as a JointModel: Mahalanobis logits, mixture energy, SGLD samples.

    σ is not an input: logits and energy at σ > 0 are those of the noisy image.
    """

    capabilities = frozenset({"logits", "energy", "sample"})

    def __init__(
        self,
        info: DatasetInfo,
        feature_dim: int = 16,
        centre_norm: float = 10.0,
        width: int = 16,
        sample_config: SGLDConfig | None = None,
    ):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.phi = EnergyCNN(info.input_shape[0], feature_dim, width)
        # Fixed, not learnt: a buffer, saved with the weights so a checkpoint is self-describing.
        self.register_buffer("centres", max_mahalanobis_centres(info.num_classes, feature_dim, centre_norm))
        self.sample_config = sample_config or SGLDConfig(steps=200, step_size=0.01, noise=0.005)

    def squared_distances(self, x: Tensor) -> Tensor:
        """‖φ(x) − μ_y‖² for every class, (B, L)."""
        features = self.phi(x)
        return (features.unsqueeze(1) - self.centres.unsqueeze(0)).pow(2).sum(-1)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -0.5 * self.squared_distances(x)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -torch.logsumexp(-0.5 * self.squared_distances(x), dim=1)

    def class_energy(self, x: Tensor, y: Tensor) -> Tensor:
        """½‖φ(x) − μ_y‖² = −log p(x | y) up to a constant."""
        return 0.5 * (self.phi(x) - self.centres[y]).pow(2).sum(-1)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        start = uniform_noise(n, self.input_shape, generator).to(self.device)
        if y is None:
            return sgld(lambda x: self._energy(x, x.new_zeros(x.shape[0])), start, self.sample_config, generator)
        return sgld(lambda x: self.class_energy(x, y), start, self.sample_config, generator)


@dataclass(frozen=True)
class GMMCRecipe(SGLDRecipe):
    """The SGLD-style loop in a `mode`; generative steps weigh the samples' energy by `beta`."""

    mode: str = "joint"
    discriminative_fraction: float = 1 / 3  # of the epochs, in joint mode
    beta: float = 1.0

    def check(self) -> None:
        super().check()
        if self.mode not in MODES:
            self._fail("mode", f"one of {', '.join(MODES)}")
        self._require_fraction("discriminative_fraction")
        self._require_non_negative("beta")

    def discriminative_epochs(self, epochs: int) -> int:
        if self.mode == "joint":
            return round(self.discriminative_fraction * epochs)
        return epochs if self.mode == "discriminative" else 0


def gmmc_objective(model: GMMC, recipe: GMMCRecipe, epochs: int) -> EnergyObjective:
    """Generative: E(x⁺, y⁺) − β·E(x⁻, y⁻) + L2 energy penalty, chains of the data's classes; else the centre loss."""

    def contrastive(x_data: Tensor, x_sample: Tensor, y: Tensor) -> EnergyLosses:
        distances = model.squared_distances(torch.cat([x_data, x_sample]))
        logits = -0.5 * distances[: len(x_data)]
        e_data = 0.5 * distances[: len(x_data)].gather(1, y.view(-1, 1)).squeeze(1)
        e_sample = 0.5 * distances[len(x_data) :].gather(1, y.view(-1, 1)).squeeze(1)
        loss = e_data.mean() - recipe.beta * e_sample.mean() + recipe.energy_reg * (
            e_data.pow(2).mean() + e_sample.pow(2).mean()
        )
        return EnergyLosses(loss, logits, e_data, e_sample)

    def discriminative(x_data: Tensor, y: Tensor) -> EnergyLosses:
        logits = -0.5 * model.squared_distances(x_data)
        # The official MMC loss: ½‖φ(x) − μ_y‖², i.e. −logits_y (not the softmax cross-entropy).
        return EnergyLosses(-logits.gather(1, y.view(-1, 1)).mean(), logits)

    return EnergyObjective(lambda y: y, contrastive, discriminative, recipe.discriminative_epochs(epochs))


def train_gmmc(model: GMMC, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """Train in the recipe's `mode`: discriminative, generative, or joint (discriminative, then generative).

    Generative steps: loss = E(x⁺, y⁺) − β·E(x⁻, y⁻) with E(x, y) = ½‖φ(x) − μ_y‖²,
    data (x⁺, y⁺) with a little Gaussian noise, and x⁻ from class-conditional
    SGLD chains (y⁻ = y⁺) of a replay buffer, as in the authors' code. β = 1
    is the exact maximum-likelihood gradient of log p(x | y); the authors'
    scripts use β = 0.5, which on digits left chains from noise unrecognisable
    (`standard` confidence 0.71 against 0.89 with β = 1). An L2 penalty on
    both energies (Du & Mordatch 2019) keeps them bounded. The SGLD step is
    0.01: the authors' step of 1 acts on a batch-mean energy (so 1/64 per
    image) on [-1, 1] images, about 0.004 here.
    """
    recipe = ctx.recipe_as(GMMCRecipe)
    objective = gmmc_objective(model, recipe, ctx.epochs)
    return train_sgld_style(model, model.phi, data, ctx, recipe, objective, f"gmmc ({recipe.mode})")


GMMC_RECIPE = GMMCRecipe(lr=1e-3, sgld_step_size=0.01)  # what differs from the SGLD loop's defaults


@register_model(
    "gmmc",
    family="joint",
    system="Generative Max-Mahalanobis Classifier",
    paper="Yang, Ye, Ye, Li & Ji 2021, Generative Max-Mahalanobis Classifiers for Image Classification, "
    "Generation and More (ECML PKDD)",
    capabilities={"logits", "energy", "sample"},
    trainer=train_gmmc,
    default_epochs=60,
    recipe=GMMC_RECIPE,
    description="A small conv net φ(x) ∈ R^16 with fixed Max-Mahalanobis centres (norm 10); "
    "logits −½‖φ(x) − μ_y‖², energy −logsumexp of them. Shipped weights: joint mode (the official Max-Mahalanobis "
    "centre loss ½‖φ(x) − μ_y‖² for the first third of the epochs, then generative with 20-step class-conditional SGLD from a replay buffer, "
    "5% reinit, β = 1, step 0.01, plus an L2 energy penalty). Train other modes with "
    "--option mode=discriminative|generative. sample() runs SGLD from uniform noise on ½‖φ(x) − μ_y‖².",
    randomness="none for logits and energy; sample() draws its SGLD noise from the caller's generator",
)
def gmmc(info: DatasetInfo) -> JointModel:
    return GMMC(info)
