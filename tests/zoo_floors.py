"""Issue 3's quality floors for the joint models, measured on the digits test split with fixed seeds.

Shared by tests/test_zoo_*.py; each function returns the measured figures so
a failing assertion shows the numbers.
"""

from __future__ import annotations

import functools
import math

import torch

import robusteval
from robusteval.core.interface import JointModel
from robusteval.data import ImageDataset
from robusteval.generative import quality

NOISE_SEED = 0


@functools.cache
def digits_test_split() -> ImageDataset:
    return robusteval.load_dataset("digits", split="test")


@functools.cache
def standard() -> JointModel:
    return robusteval.create_model("standard", dataset="digits")


def clean_accuracy(model: JointModel) -> float:
    data = digits_test_split()
    with torch.no_grad():
        return float((model.logits(data.x).argmax(1) == data.y).float().mean())


def denoise_figures(model: JointModel, sigma: float) -> dict[str, float]:
    """PSNR (dB) of the noisy input, of model.denoise and of the best Gaussian blur, on all 500 test digits."""
    clean = digits_test_split().x
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    with torch.no_grad():
        denoised = model.denoise(noisy, sigma)
    return {
        "noisy": quality.psnr(noisy, clean),
        "denoised": quality.psnr(denoised, clean),
        "blur": quality.best_blur_psnr(noisy, clean)[0],
    }


def energy_aurocs(model: JointModel) -> dict[str, float]:
    """AUROC of real test digits against uniform noise and against pixel-shuffled digits, by energy at σ = 0."""
    real = digits_test_split().x
    generator = torch.Generator().manual_seed(NOISE_SEED)
    uniform = torch.rand(real.shape, generator=generator)
    shuffled = quality.pixel_shuffled(real, generator)
    return {
        "uniform": quality.energy_auroc(model, real, uniform),
        "shuffled": quality.energy_auroc(model, real, shuffled),
    }


def conditional_sample_confidence(model: JointModel, per_class: int = 10, seed: int = 0) -> float:
    """`standard`'s mean probability of the requested class over per_class class-conditional samples per class."""
    labels = torch.arange(model.num_classes).repeat(per_class)
    samples = model.sample(len(labels), labels, generator=torch.Generator().manual_seed(seed))
    return quality.sample_confidence(standard(), samples, labels)


def assert_denoise_works_under_inference_mode(model: JointModel, x: torch.Tensor, sigma: float) -> None:
    """An autograd-based denoiser must give the same result inside torch.inference_mode()."""
    with torch.no_grad():
        expected = model.denoise(x, sigma)
    with torch.inference_mode():
        got = model.denoise(x.clone(), sigma)
    torch.testing.assert_close(got, expected)


def assert_denoiser_gradient_is_exact(model: JointModel, x: torch.Tensor, sigma: float) -> None:
    """The gradient of a loss on denoise(x) matches finite differences (double backprop, float64).

    Without the denoiser's own derivative the gradient would be `weights` alone.
    """
    import copy

    import pytest

    model = copy.deepcopy(model).double()
    x = x.double()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return (model.denoise(z, sigma) * weights).sum()

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    step = 1e-5
    with torch.no_grad():
        finite = (loss(x + step * direction) - loss(x - step * direction)) / (2 * step)
    assert float((grad * direction).sum()) == pytest.approx(float(finite), rel=1e-4)
    assert not torch.allclose(grad, weights, atol=1e-3)


def assert_tweedie_by_finite_differences(model: JointModel, x: torch.Tensor, sigma: float, directions: int = 4,
                                         step: float = 1e-2, tolerance: float = 0.03) -> None:
    """denoise(x, σ) − x = −σ²∇E(x, σ) (Tweedie–Miyasawa), with the gradient taken by central differences of
    the energy along random unit directions, a route that shares no autograd with the model's own denoiser.

    Per direction v: ⟨denoise(x) − x, v⟩ ≈ −σ²·(E(x + h·v) − E(x − h·v)) / 2h, to `tolerance` of the
    typical size of the left-hand side (the central difference errs by O(h²)).
    """
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        shift = (model.denoise(x, sigma) - x).double()
    for _ in range(directions):
        v = torch.randn(x.shape, generator=generator)
        v = v / v.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            ahead = model.energy(x + step * v, sigma).double()
            behind = model.energy(x - step * v, sigma).double()
        by_differences = -(sigma**2) * (ahead - behind) / (2 * step)
        projected = (shift * v.double()).flatten(1).sum(1)
        scale = shift.flatten(1).norm(dim=1) / math.sqrt(x[0].numel())  # typical |⟨shift, v⟩| for a random v
        assert bool(((projected - by_differences).abs() <= tolerance * scale.clamp_min(1e-6) + 1e-4).all()), (
            projected, by_differences)


def assert_softmax_is_the_energy_ratio(model: JointModel, x: torch.Tensor, sigma: float | torch.Tensor) -> None:
    """p(y | x) = exp(−E(x, y)) / exp(−E(x)) with E(x, y) = −f_y: Σ_y exp(f_y + E(x)) = 1, and each term is the
    classifier's softmax probability (computed here in float64 from the logits)."""
    with torch.no_grad():
        logits = model.logits(x, sigma).double()
        energy = model.energy(x, sigma).double()
    ratio = (logits + energy.unsqueeze(1)).exp()
    torch.testing.assert_close(ratio.sum(1), torch.ones_like(energy), rtol=0, atol=1e-5)
    torch.testing.assert_close(ratio, torch.softmax(logits, 1), rtol=0, atol=1e-5)
