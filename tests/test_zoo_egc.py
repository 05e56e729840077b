"""egc (Guo et al. 2023): the shipped model meets issue 3's floors and computes what the paper defines."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from zoo_floors import (
    assert_denoise_works_under_inference_mode,
    assert_denoiser_gradient_is_exact,
    assert_softmax_is_the_energy_ratio,
    assert_tweedie_by_finite_differences,
    clean_accuracy,
    conditional_sample_confidence,
    denoise_figures,
    digits_test_split,
    energy_aurocs,
)

import robusteval
from robusteval.data import ImageDataset
from robusteval.model_zoo import diffusion
from robusteval.model_zoo.egc import EGCRecipe, EnergyClassifierGenerator, train_egc
from robusteval.training import TrainContext


@functools.cache
def egc() -> EnergyClassifierGenerator:
    return robusteval.create_model("egc", dataset="digits")


def noisy_batch(sigma: float, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    clean = digits_test_split().x[:n]
    return clean, clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))


def test_card_and_shipped_weights() -> None:
    card = robusteval.model_card("egc")
    assert card.family == "joint" and "Guo" in card.paper
    assert card.capabilities == {"logits", "denoise", "energy", "sample"}
    record = card.checkpoints()["digits"]
    assert record["train_seconds"] > 0 and record["metrics"]["test_accuracy"] >= 0.95
    assert card.checkpoint_path("digits").stat().st_size < 5_000_000


def test_clean_accuracy_floor() -> None:
    assert clean_accuracy(egc()) >= 0.95


@pytest.mark.parametrize(("sigma", "gain_db"), [(0.25, 2.0), (0.5, 3.0)])
def test_denoise_floors(sigma: float, gain_db: float) -> None:
    figures = denoise_figures(egc(), sigma)
    assert figures["denoised"] >= figures["noisy"] + gain_db, figures
    if sigma == 0.5:
        assert figures["denoised"] > figures["blur"], figures


def test_energy_separates_digits_from_noise_and_shuffled_digits() -> None:
    aurocs = energy_aurocs(egc())
    assert aurocs["uniform"] >= 0.95 and aurocs["shuffled"] >= 0.95, aurocs


def test_class_conditional_samples_are_recognised_by_standard() -> None:
    assert conditional_sample_confidence(egc()) >= 0.7


def test_energy_is_minus_logsumexp_of_the_logits() -> None:
    model = egc()
    _, noisy = noisy_batch(0.25)
    sigma = torch.linspace(0.0, 0.6, noisy.shape[0])
    x = torch.where(sigma.view(-1, 1, 1, 1) > 0, noisy, digits_test_split().x[: noisy.shape[0]])
    assert_softmax_is_the_energy_ratio(model, x, sigma)


def test_denoise_is_tweedie_of_the_energy_score_at_the_matching_time() -> None:
    """denoise(x, σ) = x + σ²∇ₓ(−E) in pixels = x − σ·ε̂(x_t, t) with t = (2/π)·atan(2σ)."""
    model = egc()
    _, x = noisy_batch(0.3)
    sigma = torch.full((x.shape[0],), 0.3)
    with torch.no_grad():
        denoised = model.denoise(x, sigma)
    # Tweedie with the energy's gradient by finite differences (no autograd shared with the model).
    assert_tweedie_by_finite_differences(model, x[:6], 0.3)
    x_t, t = diffusion.pixel_to_vp(x, sigma)
    assert float(t[0]) == pytest.approx(2 / math.pi * math.atan(0.6), rel=1e-6)
    torch.testing.assert_close(denoised, x - 0.3 * model.eps(x_t, t), rtol=1e-4, atol=1e-5)


def test_class_conditional_scores_average_to_the_marginal_score() -> None:
    """Σ_y p(y | x_t)·ε̂_y = ε̂ when guidance is 1, because ∇ logsumexp f = Σ_y softmax(f)_y ∇f_y."""
    model = copy.deepcopy(egc())
    model.guidance_scale = 1.0
    _, x = noisy_batch(0.5, n=4)
    x_t, t = diffusion.pixel_to_vp(x, torch.full((4,), 0.5))
    with torch.no_grad():
        probabilities = model.joint_logits(x_t, t).softmax(1)
        marginal = model.eps(x_t, t)
        mixture = sum(
            probabilities[:, k].view(-1, 1, 1, 1) * model.eps(x_t, t, torch.full((4,), k)) for k in range(10)
        )
    torch.testing.assert_close(mixture, marginal, rtol=1e-4, atol=1e-5)


def test_denoise_works_under_inference_mode() -> None:
    _, x = noisy_batch(0.25)
    assert_denoise_works_under_inference_mode(egc(), x, 0.25)


def test_attacks_can_differentiate_through_the_score_based_denoiser() -> None:
    _, x = noisy_batch(0.25, n=2)
    assert_denoiser_gradient_is_exact(egc(), x, 0.25)


def test_trainer_reduces_the_score_matching_loss() -> None:
    torch.manual_seed(0)
    info = robusteval.data.dataset_info("digits")
    model = EnergyClassifierGenerator(info, width=64, blocks=1)
    train = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset("digits", "train", train.x[:256], train.y[:256], train.classes)

    def eps_loss() -> float:
        generator = torch.Generator().manual_seed(1)
        x0 = diffusion.to_internal(subset.x)
        t = torch.rand(len(x0), generator=generator) * 0.9 + 0.05
        noise = torch.randn(x0.shape, generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.no_grad():
            return float(F.mse_loss(model.eps(x_t, t), noise))

    before = eps_loss()
    options = EGCRecipe(ce_weight=0.1, label_smoothing=0.1, batch_size=64, lr=2e-3, ema_decay=0.5)
    figures = train_egc(model, subset, TrainContext(20, 0, torch.Generator().manual_seed(0), False, options))
    model.eval()
    assert all(torch.isfinite(torch.tensor(v)) for v in figures.values())
    assert eps_loss() < 0.9 * before


def test_sample_command_writes_a_class_conditional_grid(tmp_path) -> None:
    from click.testing import CliRunner

    from robusteval.cli import main

    out = tmp_path / "samples.png"
    result = CliRunner().invoke(main, ["sample", "--model", "egc", "--n", "20", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "20 class-conditional samples of egc" in result.output and "standard's mean confidence" in result.output


def test_sample_command_refuses_models_without_the_capability(tmp_path) -> None:
    from click.testing import CliRunner

    from robusteval.cli import main

    result = CliRunner().invoke(main, ["sample", "--model", "cdn", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "does not have the capability 'sample'" in result.output
    result = CliRunner().invoke(main, ["sample", "--model", "egc", "--class", "10", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--class" in result.output
    assert not (tmp_path / "x.png").exists()
