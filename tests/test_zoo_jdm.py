"""jdm (Deja et al. 2023): the shipped model meets issue 3's floors and computes what the paper defines."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from zoo_floors import (
    clean_accuracy,
    conditional_sample_confidence,
    denoise_figures,
    digits_test_split,
    standard,
)

import robusteval
from robusteval.data import ImageDataset
from robusteval.model_zoo import diffusion
from robusteval.model_zoo.jdm import JointDiffusionModel, train_jdm
from robusteval.training import DiffusionRecipe, TrainContext


@functools.cache
def jdm() -> JointDiffusionModel:
    return robusteval.create_model("jdm", dataset="digits")


def noisy_batch(sigma: float, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    clean = digits_test_split().x[:n]
    return clean, clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))


def test_card_and_shipped_weights() -> None:
    card = robusteval.model_card("jdm")
    assert card.family == "joint" and "Deja" in card.paper
    assert card.capabilities == {"logits", "denoise", "sample"}
    record = card.checkpoints()["digits"]
    assert record["train_seconds"] > 0 and record["metrics"]["test_accuracy"] >= 0.95
    assert card.checkpoint_path("digits").stat().st_size < 5_000_000


def test_clean_accuracy_floor() -> None:
    assert clean_accuracy(jdm()) >= 0.95


@pytest.mark.parametrize(("sigma", "gain_db"), [(0.25, 2.0), (0.5, 3.0)])
def test_denoise_floors(sigma: float, gain_db: float) -> None:
    figures = denoise_figures(jdm(), sigma)
    assert figures["denoised"] >= figures["noisy"] + gain_db, figures
    if sigma == 0.5:
        assert figures["denoised"] > figures["blur"], figures


def test_class_conditional_samples_are_recognised_by_standard() -> None:
    assert conditional_sample_confidence(jdm()) >= 0.7


def test_counterfactuals_flip_standard_and_stay_close() -> None:
    """≥ 70% of counterfactuals are classified as the target by `standard`, and they stay closer (L2)
    to the original than a random test image of the target class does."""
    data = digits_test_split()
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data), generator=generator)[:100]
    x, y = data.x[index], data.y[index]
    target = (y + torch.randint(1, 10, y.shape, generator=generator)) % 10
    reference = torch.stack([
        data.x[candidates[torch.randint(len(candidates), (1,), generator=generator)]][0]
        for candidates in ((data.y == t).nonzero().flatten() for t in target)
    ])
    changed = jdm().counterfactual(x, target, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flip_rate = float((standard().logits(changed).argmax(1) == target).float().mean())
    moved = (changed - x).flatten(1).norm(dim=1)
    reference_distance = (reference - x).flatten(1).norm(dim=1)
    assert flip_rate >= 0.7
    assert float(moved.mean()) < float(reference_distance.mean()), (float(moved.mean()), float(reference_distance.mean()))
    assert float((moved < reference_distance).float().mean()) > 0.5


def test_counterfactual_is_reproducible_and_validates_its_arguments() -> None:
    model = jdm()
    x = digits_test_split().x[:3]
    first = model.counterfactual(x, 4, steps=5, generator=torch.Generator().manual_seed(2))
    again = model.counterfactual(x, torch.tensor([4, 4, 4]), steps=5, generator=torch.Generator().manual_seed(2))
    assert first.shape == x.shape and torch.equal(first, again)
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    for bad in ({"target": 10}, {"target": torch.tensor([1, 2])}, {"target": 1, "t_start": 0.0},
                {"target": 1, "t_start": 1.5}, {"target": 1, "guidance_scale": -1.0}):
        with pytest.raises(ValueError):
            model.counterfactual(x, **bad)
    with pytest.raises(ValueError):
        model.counterfactual(x + 0.5, 1)  # clean images in [0, 1] only


def test_logits_and_denoise_use_the_diffusion_time_matching_sigma() -> None:
    model = jdm()
    _, x = noisy_batch(0.5)
    sigma = torch.full((x.shape[0],), 0.5)
    x_t, t = diffusion.pixel_to_vp(x, sigma)
    assert float(t[0]) == pytest.approx(0.5)  # pixel σ = 0.5 is internal noise 1: t = 0.5 on the cosine schedule
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x, sigma), model.class_logits(x_t, t))
        eps = model.eps(x_t, t)
        # Tweedie in pixel units equals Tweedie in the diffusion's own coordinates.
        torch.testing.assert_close(model.denoise(x, sigma), x - 0.5 * eps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model.denoise(x, sigma), diffusion.to_pixels(diffusion.predict_x0(x_t, eps, t)), rtol=1e-4, atol=1e-5
        )
        clean = digits_test_split().x[:4]
        torch.testing.assert_close(model.logits(clean), model.class_logits(2 * clean - 1, torch.zeros(4)))


def test_classifier_guidance_shifts_eps_by_the_head_gradient() -> None:
    """ε̃ = ε̂ − w·√(1 − ᾱ)·∇ log p(y | x_t) (Dhariwal & Nichol), with the model's own head."""
    model = jdm()
    _, x = noisy_batch(0.5, n=4)
    x_t, t = diffusion.pixel_to_vp(x, torch.full((4,), 0.5))
    y = torch.tensor([1, 3, 5, 7])
    leaf = x_t.clone().requires_grad_(True)
    log_p = model.class_logits(leaf, t).log_softmax(1).gather(1, y.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(log_p, leaf)
    with torch.no_grad():
        eps = model.eps(x_t, t)
        torch.testing.assert_close(model.guided_eps(x_t, t, y, 0.0), eps)
        guided = model.guided_eps(x_t, t, y, 3.0)
    expected = eps - 3.0 * (1 - diffusion.alpha_bar(t)).sqrt().view(-1, 1, 1, 1) * grad
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


def test_trainer_reduces_the_joint_loss() -> None:
    torch.manual_seed(0)
    model = JointDiffusionModel(robusteval.data.dataset_info("digits"), width=8)
    train = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset("digits", "train", train.x[:256], train.y[:256], train.classes)

    def losses() -> tuple[float, float]:
        generator = torch.Generator().manual_seed(1)
        x0 = diffusion.to_internal(subset.x)
        t = torch.rand(len(x0), generator=generator) * 0.9 + 0.05
        noise = torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            eps = F.mse_loss(model.eps(diffusion.q_sample(x0, t, noise), t), noise)
            ce = F.cross_entropy(model.class_logits(x0, torch.zeros(len(x0))), subset.y)
        return float(eps), float(ce)

    eps_before, ce_before = losses()
    options = DiffusionRecipe(ce_weight=0.1, batch_size=64, lr=2e-3, ema_decay=0.5)
    train_jdm(model, subset, TrainContext(6, 0, torch.Generator().manual_seed(0), False, options))
    model.eval()
    eps_after, ce_after = losses()
    assert eps_after < 0.9 * eps_before and ce_after < ce_before


def test_counterfactual_command_writes_pairs_and_reports_flips(tmp_path) -> None:
    from click.testing import CliRunner

    from robusteval.cli import main

    out = tmp_path / "cf.png"
    result = CliRunner().invoke(
        main, ["counterfactual", "--model", "jdm", "--n", "4", "--target", "3", "--device", "cpu", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 counterfactuals of jdm" in result.output and "standard predicts the target for" in result.output
    refused = CliRunner().invoke(main, ["counterfactual", "--model", "egc", "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "counterfactual" in refused.output
