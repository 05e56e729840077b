"""The shipped baselines meet issue 2's floors on the digits test split."""

import pytest
import torch

import robusteval
from robusteval.generative.quality import psnr
from robusteval.training import accuracy

FLOORS = {
    "standard": 0.95,
    "gaussian": 0.95,
    "gaussian-s0.12": 0.95,
    "gaussian-s0.5": 0.95,
    "pgd-at": 0.90,
    "dncnn+standard": 0.95,
}


@pytest.fixture(scope="module")
def test_set():
    return robusteval.load_dataset("digits", split="test")


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_clean_accuracy_floor(name, test_set):
    model = robusteval.create_model(name)
    assert accuracy(model, test_set) >= FLOORS[name]


def test_gaussian_baseline_is_robust_to_its_training_noise(test_set):
    # Noise augmentation is what makes it a smoothing base classifier: under
    # σ = 0.25 noise it must beat the standard CNN clearly.
    noisy_gaussian = accuracy(robusteval.create_model("gaussian"), test_set, sigma=0.25)
    noisy_standard = accuracy(robusteval.create_model("standard"), test_set, sigma=0.25)
    assert noisy_gaussian > noisy_standard + 0.05


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_dncnn_denoises(sigma, test_set):
    model = robusteval.create_model("dncnn+standard")
    clean = test_set.x
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = model.denoise(noisy, sigma)
    assert psnr(denoised, clean) > psnr(noisy, clean) + 3.0
