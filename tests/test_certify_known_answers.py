"""Known answers of randomized smoothing, computed through the whole engine.

A linear binary classifier sign(w·x + b) smoothed with N(0, σ²I) noise is
itself, with P(class of x) = Φ(|w·x + b| / (σ‖w‖)), so its exact certified
radius is |w·x + b| / ‖w‖. Denoising with the Bayes denoiser of a Gaussian
prior (a Tweedie denoiser, computed with autograd) keeps it linear in the
noise, which gives the exact answer for the `denoised` mode too.
"""

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import robusteval
from robusteval.core.interface import JointModel

SIGMA = 0.25
SHAPE = (1, 2, 2)


class LinearScore(nn.Module):
    """Two logits (0, s·(w·x + b)); the sharpness s does not change the argmax."""

    def __init__(self, w: Tensor, b: float, sharpness: float = 10.0):
        super().__init__()
        self.register_buffer("w", w.flatten().double())
        self.b = b
        self.sharpness = sharpness

    def score(self, x: Tensor) -> Tensor:
        return x.flatten(1).double() @ self.w + self.b

    def forward(self, x: Tensor) -> Tensor:
        z = self.sharpness * self.score(x)
        return torch.stack([torch.zeros_like(z), z], dim=1).to(x.dtype)


def linear_problem(points: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(4, generator=generator, dtype=torch.float64)
    w = w / w.norm()
    x = torch.rand((points, *SHAPE), generator=generator)
    b = -float((x.flatten(1).double() @ w).median())
    module = LinearScore(w, b)
    score = module.score(x)
    labels = (score > 0).long()
    exact = (score.abs() / w.norm()).numpy()
    return module, x, labels, exact


def test_linear_classifier_known_radius():
    module, x, labels, exact = linear_problem(300)
    model = robusteval.wrap(module, 2, SHAPE, name="linear")
    result = robusteval.certify(
        model, (x, labels), sigma=SIGMA, n0=100, n=100_000, alpha=0.001, batch_size=100_100, seed=0, device="cpu",
        compile=False,
    )
    radius = np.array([r["radius"] for r in result.records])
    abstain = np.array([r["abstain"] for r in result.records])
    prediction = np.array([-1 if r["prediction"] is None else r["prediction"] for r in result.records])

    # Smoothing a linear classifier gives itself back ...
    assert np.all(prediction[~abstain] == labels.numpy()[~abstain])
    # ... and abstains only next to its decision boundary (where n0 = 100 draws may pick the wrong class).
    assert np.all(exact[abstain] < 0.3 * SIGMA)
    # A valid certificate never claims more than the exact radius.
    assert np.all(radius <= exact + 1e-12), np.max(radius - exact)
    # With n = 100,000 it is tight to 10% where the radius is between 0.5σ and 2σ.
    moderate = (exact >= 0.5 * SIGMA) & (exact <= 2 * SIGMA)
    assert moderate.sum() >= 100
    assert np.all(radius[moderate] >= 0.9 * exact[moderate]), np.min(radius[moderate] / exact[moderate])
    summary = result.summary
    assert summary["n_images"] == 300 and summary["abstain_rate"] == pytest.approx(abstain.mean())
    assert summary["acr"] == pytest.approx(radius.mean())  # every non-abstained point is correct


class GaussianPriorTweedie(JointModel):
    """A linear classifier behind the Tweedie denoiser of the prior x0 ~ N(μ, τ²I).

    denoise(x, σ) = x + σ² ∇ log p_σ(x) with p_σ = N(μ, (τ² + σ²) I), the
    gradient taken with autograd as a score-based joint model does.
    """

    capabilities = frozenset({"logits", "denoise"})

    def __init__(self, w: Tensor, b: float, mu: float, tau: float):
        super().__init__()
        self.num_classes = 2
        self.input_shape = SHAPE
        self.linear = LinearScore(w, b)
        self.mu, self.tau = mu, tau

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.linear(x)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            variance = (self.tau**2 + sigma**2).view(-1, 1, 1, 1)
            log_density = (-((x - self.mu) ** 2) / (2 * variance)).sum()
            (score,) = torch.autograd.grad(log_density, x)
        return (x + sigma.view(-1, 1, 1, 1) ** 2 * score).detach()


def test_denoised_mode_known_radius_through_a_tweedie_denoiser():
    module, x, labels, _ = linear_problem(40, seed=1)
    mu, tau = 0.5, 0.3
    model = GaussianPriorTweedie(module.w, module.b, mu, tau)
    # denoise(x + σn) = μ + c(x + σn − μ) with c = τ² / (τ² + σ²): the smoothed score is linear in n.
    shrink = tau**2 / (tau**2 + SIGMA**2)
    score = module.score(mu + shrink * (x - mu))
    exact = (score.abs() / (shrink * module.w.norm())).numpy()
    result = robusteval.certify(model, (x, (score > 0).long()), sigma=SIGMA, n0=100, n=20_000, mode="denoised",
                                batch_size=5000, device="cpu", compile=False)
    radius = np.array([r["radius"] for r in result.records])
    assert all(r["correct"] for r in result.records if not r["abstain"])
    assert np.all(radius <= exact + 1e-12)
    moderate = (exact >= 0.5 * SIGMA) & (exact <= 2 * SIGMA)
    assert moderate.sum() >= 10
    assert np.all(radius[moderate] >= 0.85 * exact[moderate])
    # In direct mode the same model sees no denoiser: its exact radius is the plain linear one.
    direct = robusteval.certify(model, (x, (score > 0).long()), sigma=SIGMA, n0=100, n=2000, batch_size=5000,
                                device="cpu", compile=False)
    plain = (module.score(x).abs() / module.w.norm()).numpy()
    assert all(r["radius"] <= p + 1e-12 for r, p in zip(direct.records, plain))
    assert not math.isclose(float(np.sum(radius)), float(sum(r["radius"] for r in direct.records)))
