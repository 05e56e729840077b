"""cdn (Thiry & Guth 2024): the shipped model meets issue 3's floors and computes what the paper defines."""

from __future__ import annotations

import functools

import pytest
import torch
from zoo_floors import (
    assert_denoise_works_under_inference_mode,
    assert_denoiser_gradient_is_exact,
    assert_softmax_is_the_energy_ratio,
    assert_tweedie_by_finite_differences,
    clean_accuracy,
    denoise_figures,
    digits_test_split,
    energy_aurocs,
)

import robusteval
from robusteval.data import ImageDataset
from robusteval.model_zoo.cdn import (
    SIGMA_MIN,
    CDNRecipe,
    ClassificationDenoisingNetwork,
    train_cdn,
)
from robusteval.training import TrainContext


@functools.cache
def cdn() -> ClassificationDenoisingNetwork:
    return robusteval.create_model("cdn", dataset="digits")


def noisy_batch(sigma: float, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    clean = digits_test_split().x[:n]
    return clean, clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))


def test_card_and_shipped_weights() -> None:
    card = robusteval.model_card("cdn")
    assert card.family == "joint" and "Thiry" in card.paper
    assert card.capabilities == {"logits", "denoise", "energy"}
    record = card.checkpoints()["digits"]
    assert record["train_seconds"] > 0 and record["metrics"]["test_accuracy"] >= 0.95
    assert card.checkpoint_path("digits").stat().st_size < 5_000_000


def test_clean_accuracy_floor() -> None:
    assert clean_accuracy(cdn()) >= 0.95


def test_classifies_noisy_digits_at_their_noise_level() -> None:
    """CDN is trained with cross-entropy on noisy inputs: p(y | x, σ) stays accurate at σ = 0.25."""
    data = digits_test_split()
    noisy = data.x + 0.25 * torch.randn(data.x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        accuracy = float((cdn().logits(noisy, 0.25).argmax(1) == data.y).float().mean())
    assert accuracy >= 0.9


@pytest.mark.parametrize(("sigma", "gain_db"), [(0.25, 2.0), (0.5, 3.0)])
def test_denoise_floors(sigma: float, gain_db: float) -> None:
    figures = denoise_figures(cdn(), sigma)
    assert figures["denoised"] >= figures["noisy"] + gain_db, figures
    if sigma == 0.5:
        assert figures["denoised"] > figures["blur"], figures


def test_energy_separates_digits_from_noise_and_shuffled_digits() -> None:
    aurocs = energy_aurocs(cdn())
    assert aurocs["uniform"] >= 0.95 and aurocs["shuffled"] >= 0.95, aurocs


def test_energy_is_minus_logsumexp_and_denoise_is_tweedie_miyasawa() -> None:
    model = cdn()
    _, x = noisy_batch(0.3)
    sigma = torch.linspace(0.05, 0.6, x.shape[0])
    assert_softmax_is_the_energy_ratio(model, x, sigma)
    # Tweedie–Miyasawa with the energy's gradient by finite differences, not by the autograd the model uses.
    for level in (0.1, 0.3, 0.6):
        assert_tweedie_by_finite_differences(model, x[:6], level)


def test_class_conditional_denoisers_average_to_the_denoiser() -> None:
    """E[x0 | x] = Σ_y p(y | x) E[x0 | x, y]: with ∇ logsumexp f = Σ_y softmax(f)_y ∇f_y this is exact."""
    model = cdn()
    _, x = noisy_batch(0.4, n=4)
    with torch.no_grad():
        probabilities = model.logits(x, 0.4).softmax(1)
        mixture = sum(
            probabilities[:, k].view(-1, 1, 1, 1) * model.denoise_class(x, 0.4, torch.full((4,), k))
            for k in range(10)
        )
        torch.testing.assert_close(mixture, model.denoise(x, 0.4), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        model.denoise_class(x, 0.4, torch.tensor([0, 1, 2, 10]))


def test_denoise_beyond_the_training_range_is_refused_with_the_range() -> None:
    model = cdn()
    _, x = noisy_batch(0.3)
    for sigma in (1.5, 0.005, torch.tensor([0.3, 0.3, 2.0, 0.3] + [0.3] * (x.shape[0] - 4))):
        with pytest.raises(ValueError, match=r"training range \[0.01, 1\]"):
            model.denoise(x, sigma)
    with pytest.raises(ValueError, match="training range"):
        model.denoise_class(x, 1.5, torch.zeros(x.shape[0], dtype=torch.long))
    model.denoise(x, 1.0)  # the edges of the range are fine


def test_clean_input_uses_the_lowest_trained_noise_level() -> None:
    model = cdn()
    clean, _ = noisy_batch(0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(clean, 0.0), model.logits(clean, SIGMA_MIN))
        # Tweedie with σ = 0 changes nothing.
        torch.testing.assert_close(model.denoise(clean, 0.0), clean)


def test_denoise_works_under_inference_mode() -> None:
    _, x = noisy_batch(0.25)
    assert_denoise_works_under_inference_mode(cdn(), x, 0.25)


def test_attacks_can_differentiate_through_the_denoiser() -> None:
    _, x = noisy_batch(0.25, n=2)
    assert_denoiser_gradient_is_exact(cdn(), x, 0.25)


def test_trainer_reduces_the_denoising_error() -> None:
    torch.manual_seed(0)
    model = ClassificationDenoisingNetwork(robusteval.data.dataset_info("digits"), width=64, blocks=1)
    train = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset("digits", "train", train.x[:256], train.y[:256], train.classes)
    clean = subset.x[:128]
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))

    def denoise_mse() -> float:
        with torch.no_grad():
            return float((model.denoise(noisy, 0.3) - clean).pow(2).mean())

    before = denoise_mse()
    options = CDNRecipe(ce_weight=1.0, sigma_min=0.01, sigma_max=1.0, batch_size=64, lr=5e-3, ema_decay=0.5)
    figures = train_cdn(model, subset, TrainContext(20, 0, torch.Generator().manual_seed(0), False, options))
    model.eval()
    assert all(torch.isfinite(torch.tensor(v)) for v in figures.values())
    assert denoise_mse() < 0.6 * before
