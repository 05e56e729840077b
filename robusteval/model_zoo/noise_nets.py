"""Small noise-conditioned networks shared by the zoo's energy-parameterised joint models.

`ConditionedEnergyNet` maps an image and a scalar noise coordinate (a diffusion
time or a normalised log σ) to class logits f(x, ·). cdn and egc read those
logits as an unnormalised log joint density, log p(x, y) = f_y, so the
network's *input gradient* is their score and denoiser. Two design choices
follow from that:

- smooth activations (SiLU), because the score is a derivative of the network
  and is itself trained (double backpropagation): with ReLU the score would be
  piecewise constant;
- a conv stem followed by residual MLP blocks: on 8×8 digits this keeps one
  forward pass at batch 500 to a few milliseconds on one CPU core (the attack
  engine calls it many thousands of times) while the stem's transpose in the
  backward pass gives the score a local, translation-equivariant structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.model_zoo.diffusion import sinusoidal_embedding


def noise_levels(coordinate: Tensor) -> tuple[Tensor, Tensor]:
    """The noise levels to embed and each sample's row among them.

    On the CPU: each distinct level once (batches usually share one level: attacks, certification), which
    is what the shipped weights' recorded figures were computed with. torch.unique has an output size
    known only after it ran, so on a GPU it waits for the device on every forward pass, and a compiled
    graph breaks there; on a GPU and when compiling, every sample's level is embedded instead (static
    shapes, no synchronisation; the same values up to float rounding, since a matrix product's rounding
    depends on how many rows it has).
    """
    if coordinate.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.unique(coordinate, return_inverse=True)
    return coordinate, torch.arange(coordinate.shape[0], device=coordinate.device)


class NoiseEmbedding(nn.Module):
    """Sin–cos features of a (B,) noise coordinate, then a two-layer MLP."""

    def __init__(self, dim: int, features: int = 64):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, coordinate: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(coordinate, self.features))


class FiLMResidualBlock(nn.Module):
    """h + W₂ SiLU(W₁ SiLU(LN(h)·(1 + γ(e)) + β(e))): a residual MLP block modulated by the noise embedding."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(embed_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, embedding: Tensor, index: Tensor) -> Tensor:
        """`embedding` holds one row per distinct noise level; `index` picks each sample's row."""
        scale, shift = self.film(embedding)[index].chunk(2, dim=1)
        z = F.silu(self.norm(h) * (1 + scale) + shift)
        return h + self.fc2(F.silu(self.fc1(z)))


class ConditionedEnergyNet(nn.Module):
    """(x, noise coordinate) → class logits, smooth in x.

    x is (B, C, H, W) already in the model's internal scale; `coordinate` is (B,).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        stem_channels: int = 16,
        width: int = 256,
        blocks: int = 2,
        embed_dim: int = 128,
    ):
        super().__init__()
        channels, height, width_px = input_shape
        self.embedding = NoiseEmbedding(embed_dim)
        self.stem = nn.Conv2d(channels, stem_channels, 3, padding=1)
        self.project = nn.Linear(stem_channels * height * width_px, width)
        self.blocks = nn.ModuleList(FiLMResidualBlock(width, embed_dim) for _ in range(blocks))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, coordinate: Tensor) -> Tensor:
        levels, index = noise_levels(coordinate)
        embedding = self.embedding(levels)
        h = self.project(F.silu(self.stem(x)).flatten(1))
        for block in self.blocks:
            h = block(h, embedding, index)
        # No normalisation before the head: a normalised (bounded) feature would bound the energy,
        # so it could not keep growing away from the data.
        return self.head(F.silu(h))
