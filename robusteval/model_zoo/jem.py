"""JEM: the Joint Energy-based Model (Grathwohl et al. 2020).

A classifier f(x) → logits is read as an energy-based model of the joint
density: p(x, y) ∝ exp(f_y(x)), so p(y | x) is the usual softmax and
p(x) ∝ exp(logsumexp_y f_y(x)), i.e. E(x) = −logsumexp_y f_y(x).

Training maximises log p(y | x) + log p(x). The gradient of log p(x) needs
samples of the model, which persistent contrastive divergence draws with SGLD
from a replay buffer of chains (5% restarted from uniform noise each draw),
as in the paper. Training images carry a little Gaussian noise (σ = 0.03 on
[-1, 1], 0.015 here), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.determinism import AdaptiveAvgPool2d
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset
from robusteval.model_zoo.registry import register_model
from robusteval.training import SGLDRecipe, TrainContext
from robusteval.training.loops import EnergyLosses, EnergyObjective, train_sgld_style
from robusteval.training.sgld import SGLDConfig, sgld, uniform_noise


class EnergyCNN(nn.Module):
    """A small conv net for energy-based models: no normalisation layers, smooth activations.

    JEM removes batch norm (it makes f(x) depend on the batch, which breaks
    SGLD), and a smooth activation (SiLU/Swish, as in Du & Mordatch 2019)
    gives Langevin chains gradients that vary smoothly. Adaptive pooling to
    2×2 keeps where strokes are (an energy must see layout) while any input
    size works.
    """

    def __init__(self, in_channels: int, out_features: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.SiLU(),
            AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, 8 * width),
            nn.SiLU(),
        )
        self.head = nn.Linear(8 * width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - 0.5) / 0.5))


class JEM(JointModel):
    """JEM as a JointModel: logits f(x), energy −logsumexp f(x), samples by SGLD.

    σ is not an input of JEM: logits and energy at σ > 0 are those of the
    noisy image itself (JEM models p(x) of clean images only).
    """

    capabilities = frozenset({"logits", "energy", "sample"})

    def __init__(self, info: DatasetInfo, width: int = 16, sample_config: SGLDConfig | None = None):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.net = EnergyCNN(info.input_shape[0], info.num_classes, width)
        # Inference chains start from uniform noise; longer than training's short-run chains.
        self.sample_config = sample_config or SGLDConfig(steps=100, step_size=0.25, noise=0.005)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(x)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -torch.logsumexp(self.net(x), dim=1)

    def class_energy(self, x: Tensor, y: Tensor) -> Tensor:
        """−f_y(x) = −log p(x, y) up to a constant: the energy of class-conditional chains."""
        return -self.net(x).gather(1, y.view(-1, 1)).squeeze(1)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        start = uniform_noise(n, self.input_shape, generator).to(self.device)
        if y is None:
            return sgld(lambda x: self._energy(x, x.new_zeros(x.shape[0])), start, self.sample_config, generator)
        return sgld(lambda x: self.class_energy(x, y), start, self.sample_config, generator)


def jem_objective(model: JEM, ctx: TrainContext, recipe: SGLDRecipe, num_classes: int) -> EnergyObjective:
    """Cross-entropy + PCD maximum likelihood of p(x): E(data) − E(samples), plus the L2 energy penalty."""

    def chain_labels(y: Tensor) -> Tensor:
        # Class-conditional chains (JEM's class_cond_p_x_sample): y ~ uniform, x ~ p(x | y).
        return ctx.randint(num_classes, len(y))

    def contrastive(x_data: Tensor, x_sample: Tensor, y: Tensor) -> EnergyLosses:
        logits = model.net(torch.cat([x_data, x_sample]))
        logits_data, logits_sample = logits[: len(x_data)], logits[len(x_data) :]
        ce = F.cross_entropy(logits_data, y)
        e_data = -torch.logsumexp(logits_data, 1)
        e_sample = -torch.logsumexp(logits_sample, 1)
        # −log p(x) gradient: E(data) − E(samples); plus the energy-magnitude penalty.
        loss = ce + (e_data.mean() - e_sample.mean()) + recipe.energy_reg * (e_data.pow(2).mean() + e_sample.pow(2).mean())
        return EnergyLosses(loss, logits_data, e_data, e_sample)

    return EnergyObjective(chain_labels, contrastive)


def train_jem(model: JEM, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """Cross-entropy + PCD maximum likelihood of p(x) with SGLD from a replay buffer.

    Stabilised as the paper's follow-ups do: an L2 penalty on the energies of
    data and samples (Du & Mordatch 2019) keeps them from drifting, and the
    learning rate warms up linearly (JEM's code warms up too).
    """
    recipe = ctx.recipe_as(SGLDRecipe)
    objective = jem_objective(model, ctx, recipe, data.num_classes)
    return train_sgld_style(model, model.net, data, ctx, recipe, objective, "jem")


JEM_RECIPE = SGLDRecipe()  # the SGLD loop's defaults are JEM's recipe at this scale


@register_model(
    "jem",
    family="joint",
    system="Joint Energy-based Model",
    paper="Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi & Swersky 2020, Your Classifier is Secretly "
    "an Energy Based Model and You Should Treat it Like One (ICLR)",
    capabilities={"logits", "energy", "sample"},
    trainer=train_jem,
    default_epochs=60,
    recipe=JEM_RECIPE,
    description="A small conv net (no batch norm, SiLU) read as an EBM, E(x) = −logsumexp f(x); trained with "
    "cross-entropy + PCD with 20-step SGLD from a class-conditional replay buffer (5% reinit from uniform "
    "noise, training noise 0.015); stabilised with an L2 energy penalty (Du & Mordatch 2019) and LR warm-up. "
    "sample() runs SGLD from uniform noise on −f_y (or −logsumexp f without y).",
    randomness="none for logits and energy; sample() draws its SGLD noise from the caller's generator",
)
def jem(info: DatasetInfo) -> JointModel:
    return JEM(info)
