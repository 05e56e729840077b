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

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.determinism import AdaptiveAvgPool2d

from robusteval.data import DatasetInfo, ImageDataset
from robusteval.interface import JointModel
from robusteval.model_zoo.registry import register_model
from robusteval.model_zoo.sgld import ReplayBuffer, SGLDConfig, sgld, uniform_noise
from robusteval.training import TrainContext


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


def train_jem(model: JEM, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """Cross-entropy + PCD maximum likelihood of p(x) with SGLD from a replay buffer.

    Stabilised as the paper's follow-ups do: an L2 penalty on the energies of
    data and samples (Du & Mordatch 2019) keeps them from drifting, and the
    learning rate warms up linearly (JEM's code warms up too).
    """
    cpu_started = time.process_time()
    opts = ctx.options
    batch_size = int(opts["batch_size"])
    chain = SGLDConfig(int(opts["sgld_steps"]), float(opts["sgld_step_size"]), float(opts["sgld_noise"]))
    data_noise = float(opts["data_noise"])
    energy_reg = float(opts["energy_reg"])
    buffer = ReplayBuffer(
        int(opts["buffer_size"]), data.input_shape, ctx.generator, float(opts["reinit"]),
        num_classes=data.num_classes,
    )
    optimiser = torch.optim.Adam(model.net.parameters(), lr=float(opts["lr"]))
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = ctx.epochs * steps_per_epoch
    warmup = int(opts["warmup_steps"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda i: min(1.0, (i + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * i / total))
    )
    bar = ctx.epoch_bar("jem")
    sums: dict[str, float] = {}
    seen = 0
    for _ in bar:
        sums = {"ce": 0.0, "correct": 0.0, "e_data": 0.0, "e_sample": 0.0}
        seen = 0
        for x, y in ctx.batches(data, batch_size):
            model.train()
            x_data = x + data_noise * ctx.randn_like(x)
            # Class-conditional chains (JEM's class_cond_p_x_sample): y ~ uniform, x ~ p(x | y).
            y_chain = ctx.randint(data.num_classes, len(x))
            index, start = buffer.draw(len(x), y_chain)
            x_sample = sgld(lambda v: model.class_energy(v, y_chain), start.to(ctx.device), chain, ctx.generator)
            buffer.store(index, x_sample)

            logits = model.net(torch.cat([x_data, x_sample]))
            logits_data, logits_sample = logits[: len(x)], logits[len(x) :]
            ce = F.cross_entropy(logits_data, y)
            e_data = -torch.logsumexp(logits_data, 1)
            e_sample = -torch.logsumexp(logits_sample, 1)
            # −log p(x) gradient: E(data) − E(samples); plus the energy-magnitude penalty.
            loss = ce + (e_data.mean() - e_sample.mean()) + energy_reg * (e_data.pow(2).mean() + e_sample.pow(2).mean())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()

            sums["ce"] += float(ce.detach()) * len(y)
            sums["correct"] += float((logits_data.argmax(1) == y).sum())
            sums["e_data"] += float(e_data.detach().sum())
            sums["e_sample"] += float(e_sample.detach().sum())
            seen += len(y)
        bar.set_postfix(
            ce=f"{sums['ce'] / seen:.3f}", acc=f"{sums['correct'] / seen:.3f}",
            e_data=f"{sums['e_data'] / seen:.2f}", e_sample=f"{sums['e_sample'] / seen:.2f}",
        )
    return {
        "train_cross_entropy": sums["ce"] / seen,
        "train_accuracy": sums["correct"] / seen,
        "train_energy_data": sums["e_data"] / seen,
        "train_energy_samples": sums["e_sample"] / seen,
        # Single-threaded CPU time: what an idle core would take, whatever else shares the machine.
        "train_cpu_seconds": time.process_time() - cpu_started,
    }


JEM_RECIPE = {
    "batch_size": 64,
    "lr": 2e-3,
    "warmup_steps": 200,
    "sgld_steps": 20,
    "sgld_step_size": 0.25,
    "sgld_noise": 0.005,
    "buffer_size": 1000,
    "reinit": 0.05,
    "data_noise": 0.015,
    "energy_reg": 0.01,
}


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
