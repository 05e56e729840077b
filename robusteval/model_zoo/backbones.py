"""Small networks shared by several models of the zoo."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robusteval.core.determinism import AdaptiveAvgPool2d


class SmallCNN(nn.Module):
    """Three 3×3 conv layers, one 2×2 max-pool, global average pooling, a linear head.

    Input is an image in [0, 1]; the model centres it itself. Global pooling
    lets the same network take 8×8 digits, 28×28 MNIST or 32×32 CIFAR.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - 0.5) / 0.5))


class DnCNN(nn.Module):
    """A small DnCNN (Zhang et al. 2017): predicts the noise, returns x − noise.

    A noise-level map (σ at every pixel) is an extra input channel, as in
    FFDNet, so one network covers σ ∈ [0, 0.5].
    """

    def __init__(self, channels: int = 1, width: int = 48, depth: int = 6):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels + 1, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma_map = sigma.view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return x - self.body(torch.cat([x - 0.5, sigma_map], dim=1))
