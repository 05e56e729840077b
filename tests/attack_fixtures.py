"""Shared fixtures of the attack tests: a binary linear classifier with known adversarial distances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import robusteval

SHAPE = (1, 8, 8)


class LinearBinary(nn.Module):
    """Two logits ±(w·x + b)/2: class 1 exactly where w·x + b > 0."""

    def __init__(self, w: Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: Tensor) -> Tensor:
        margin = x.flatten(1) @ self.w + self.b
        return torch.stack([-margin / 2, margin / 2], dim=1)


def linear_problem(n: int = 200, seed: int = 0) -> tuple[robusteval.JointModel, Tensor, Tensor, Tensor]:
    """A wrapped linear classifier, points x (n, 1, 8, 8), labels y and signed L2 distances to its boundary.

    Each point is placed at a chosen signed L2 distance d ∈ [-1, 1] from the
    hyperplane w·x + b = 0 through the mid-grey image; its label is the side
    it lies on, so the clean accuracy is 100%.
    """
    g = torch.Generator().manual_seed(seed)
    dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
    sign = torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0)
    w = sign * (0.8 + 0.4 * torch.rand(dim, generator=g))
    b = -float(w.sum()) * 0.5  # the hyperplane passes through x = 0.5
    unit = w / w.norm()
    distance = torch.rand(n, generator=g) * 2 - 1
    base = 0.35 + 0.3 * torch.rand(n, dim, generator=g)
    current = (base - 0.5) @ unit
    x = base + (distance - current).unsqueeze(1) * unit
    y = (distance > 0).long()
    model = robusteval.wrap(LinearBinary(w, b), num_classes=2, input_shape=SHAPE, name="linear")
    return model, x.view(n, *SHAPE), y, distance


class Constant(nn.Module):
    """Logits that ignore the input: always the same class."""

    def __init__(self, num_classes: int = 10, winner: int = 3):
        super().__init__()
        logits = torch.zeros(num_classes)
        logits[winner] = 1.0
        self.register_buffer("logits", logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class GaussianTweedie(robusteval.JointModel):
    """A linear classifier plus the exact Tweedie denoiser of a Gaussian prior N(μ, τ²I).

    log p_σ(x) = −‖x − μ‖² / (2(τ² + σ²)) + const, and denoise(x, σ) = x + σ² ∇ log p_σ(x)
    is computed with autograd (a graph is built when the caller needs gradients, as the
    zoo's Tweedie denoisers do), so it equals (τ²·x + σ²·μ) / (τ² + σ²) exactly.
    """

    capabilities = frozenset({"logits", "denoise"})

    def __init__(self, weight: Tensor, bias: Tensor, mean: float = 0.5, tau: float = 0.3):
        super().__init__()
        self.name = "gaussian-tweedie"
        self.num_classes = weight.shape[0]
        self.input_shape = SHAPE
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.mean = mean
        self.tau = tau

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            inputs = x if x.requires_grad else x.detach().requires_grad_(True)
            s2 = sigma.view(-1, 1, 1, 1) ** 2
            log_p = -((inputs - self.mean) ** 2 / (2 * (self.tau**2 + s2))).sum()
            (score,) = torch.autograd.grad(log_p, inputs, create_graph=create_graph)
        out = inputs + s2 * score
        return out if create_graph else out.detach()


class Scaled(nn.Module):
    """A module's logits times a constant: ×1e4 saturates softmax in float32 (the CE gradient underflows to 0)."""

    def __init__(self, module: nn.Module, factor: float):
        super().__init__()
        self.module = module
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) * self.factor


class Rounded(nn.Module):
    """A module behind a rounding front end (pixels to multiples of 1/levels): no usable input gradient."""

    def __init__(self, module: nn.Module, levels: int = 8):
        super().__init__()
        self.module = module
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return self.module(torch.round(x * self.levels) / self.levels)


def saturated_linear_problem(n: int = 200) -> tuple[robusteval.JointModel, Tensor, Tensor, Tensor]:
    """`linear_problem` with its logits ×1e4: the same decisions and distances, a blind cross-entropy."""
    model, x, y, distance = linear_problem(n=n)
    scaled = robusteval.wrap(Scaled(model.module, 1e4), num_classes=2, input_shape=SHAPE, name="linear-x1e4")
    return scaled, x, y, distance


class TinyEnergy(robusteval.JointModel):
    """A small nonlinear classifier read as an EBM (JEM's view): E(x) = −logsumexp f(x)."""

    capabilities = frozenset({"logits", "energy"})

    def __init__(self, num_classes: int = 3, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.name = "tiny-energy"
        self.num_classes = num_classes
        self.input_shape = SHAPE
        self.w1 = nn.Parameter(torch.randn(dim, hidden, generator=g) / dim**0.5 * 3)
        self.w2 = nn.Parameter(torch.randn(hidden, num_classes, generator=g))

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.tanh((x.flatten(1) - 0.5) @ self.w1) @ self.w2 * 3

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -self._logits(x, sigma).logsumexp(1)
