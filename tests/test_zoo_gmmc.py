"""gmmc (Yang et al. 2021): Max-Mahalanobis centres, the mixture's identities, the training modes and issue 3's floors."""

from __future__ import annotations

import functools

import pytest
import torch
from zoo_floors import (
    clean_accuracy,
    conditional_sample_confidence,
    digits_test_split,
    energy_aurocs,
)

import robusteval
from robusteval.core.interface import CapabilityError
from robusteval.data import ImageDataset, dataset_info
from robusteval.model_zoo.gmmc import (
    GMMC,
    GMMC_RECIPE,
    gmmc_objective,
    max_mahalanobis_centres,
    train_gmmc,
)
from robusteval.training import TrainContext


@functools.cache
def gmmc() -> GMMC:
    return robusteval.create_model("gmmc", dataset="digits")


@pytest.mark.parametrize("classes, dim, norm", [(10, 16, 10.0), (10, 9, 10.0), (3, 2, 1.0), (5, 8, 2.5)])
def test_centres_are_equal_norm_and_maximally_separated(classes: int, dim: int, norm: float):
    centres = max_mahalanobis_centres(classes, dim, norm).double()
    assert centres.shape == (classes, dim)
    # Gram matrix of a regular simplex: C² on the diagonal, −C²/(L − 1) elsewhere.
    expected = torch.full((classes, classes), -(norm**2) / (classes - 1), dtype=torch.float64)
    expected.fill_diagonal_(norm**2)
    torch.testing.assert_close(centres @ centres.T, expected, rtol=0, atol=1e-4 * norm**2)
    # Hence they sum to zero, and no other equal-norm set has a larger minimum distance.
    torch.testing.assert_close(centres.sum(0), torch.zeros(dim, dtype=torch.float64), rtol=0, atol=1e-4 * norm)


def test_centres_need_enough_dimensions():
    with pytest.raises(ValueError, match="feature dim"):
        max_mahalanobis_centres(10, 8)
    with pytest.raises(ValueError):
        max_mahalanobis_centres(1, 4)


def test_shipped_model_uses_the_fixed_centres_and_mahalanobis_logits():
    model, x = gmmc(), digits_test_split().x[:16]
    torch.testing.assert_close(model.centres, max_mahalanobis_centres(10, model.centres.shape[1], 10.0))
    with torch.no_grad():
        features = model.phi(x)
        expected = -0.5 * torch.cdist(features, model.centres).pow(2)
        torch.testing.assert_close(model.logits(x), expected, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(model.energy(x), -torch.logsumexp(expected, 1), rtol=1e-4, atol=1e-3)
        y = digits_test_split().y[:16]
        torch.testing.assert_close(model.class_energy(x, y), -expected.gather(1, y.view(-1, 1)).squeeze(1),
                                   rtol=1e-4, atol=1e-3)
    assert "centres" not in dict(model.named_parameters()), "the centres are fixed, not learnt"


def test_card_cites_the_paper_and_ships_the_joint_mode():
    card = robusteval.model_card("gmmc")
    assert card.family == "joint"
    assert "Yang" in card.paper and "Max-Mahalanobis" in card.paper
    assert card.capabilities == {"logits", "energy", "sample"}
    record = card.checkpoints()["digits"]
    assert record["recipe"]["mode"] == "joint"
    assert record["metrics"]["train_cpu_seconds"] < 480  # issue 3's budget on one idle core
    with pytest.raises(CapabilityError):
        gmmc().denoise(digits_test_split().x[:2], 0.25)


def test_clean_accuracy_floor():
    assert clean_accuracy(gmmc()) >= 0.93


def test_energy_separates_digits_from_noise_and_shuffled_digits():
    aurocs = energy_aurocs(gmmc())
    assert aurocs["uniform"] >= 0.95, aurocs
    assert aurocs["shuffled"] >= 0.95, aurocs


def test_class_conditional_samples_are_recognised_by_standard():
    assert conditional_sample_confidence(gmmc()) >= 0.7


def _tiny_run(mode: str, fraction: float = 0.5, seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    data = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset(data.name, "train", data.x[:96], data.y[:96], data.classes)
    model = GMMC(dataset_info("digits"))
    options = GMMC_RECIPE.with_options(
        {"mode": mode, "sgld_steps": 3, "buffer_size": 100, "warmup_steps": 1, "discriminative_fraction": fraction}
    )
    figures = train_gmmc(model, subset, TrainContext(2, seed, torch.Generator().manual_seed(seed), False, options))
    return figures, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_training_modes_differ_and_joint_is_discriminative_then_generative():
    runs = {mode: _tiny_run(mode) for mode in ("discriminative", "generative", "joint")}
    # Only modes with generative epochs measure energies of SGLD samples.
    assert "train_energy_samples" not in runs["discriminative"][0]
    assert "train_energy_samples" in runs["generative"][0] and "train_energy_samples" in runs["joint"][0]
    assert not _same(runs["discriminative"][1], runs["generative"][1])
    assert not _same(runs["joint"][1], runs["generative"][1])
    assert not _same(runs["joint"][1], runs["discriminative"][1])
    # The joint schedule's two ends are the other two modes, exactly.
    assert _same(_tiny_run("joint", fraction=1.0)[1], runs["discriminative"][1])
    assert _same(_tiny_run("joint", fraction=0.0)[1], runs["generative"][1])
    # And a seed reproduces a run bit for bit.
    assert _same(_tiny_run("joint")[1], runs["joint"][1])


def test_discriminative_loss_is_the_official_centre_loss_not_cross_entropy():
    # sndnyang/GMMC train_gmmc.py: mean over the batch of −logits_y = ½‖φ(x) − μ_y‖².
    model = GMMC(dataset_info("digits"))
    objective = gmmc_objective(model, GMMC_RECIPE, epochs=3)
    x, y = digits_test_split().x[:32], digits_test_split().y[:32]
    losses = objective.discriminative(x, y)
    with torch.no_grad():
        centre_loss = 0.5 * (model.phi(x) - model.centres[y]).pow(2).sum(1).mean()
        cross_entropy = torch.nn.functional.cross_entropy(losses.logits, y)
    torch.testing.assert_close(losses.loss.detach(), centre_loss, rtol=1e-5, atol=1e-5)
    assert abs(float(losses.loss.detach()) - float(cross_entropy)) > 1e-2


def test_unknown_training_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="discriminative, generative, joint"):
        _tiny_run("adversarial")
