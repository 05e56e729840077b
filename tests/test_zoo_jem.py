"""jem (Grathwohl et al. 2020): the shipped digits weights against issue 3's floors, and the model's identities."""

from __future__ import annotations

import functools

import pytest
import torch
from zoo_floors import (
    assert_softmax_is_the_energy_ratio,
    clean_accuracy,
    conditional_sample_confidence,
    digits_test_split,
    energy_aurocs,
)

import robusteval
from robusteval.core.interface import CapabilityError
from robusteval.data import ImageDataset, dataset_info
from robusteval.model_zoo.jem import JEM, JEM_RECIPE, train_jem
from robusteval.training import TrainContext


@functools.cache
def jem() -> JEM:
    return robusteval.create_model("jem", dataset="digits")


def test_card_cites_the_paper_and_declares_what_jem_computes():
    card = robusteval.model_card("jem")
    assert card.family == "joint"
    assert "Grathwohl" in card.paper and "Energy Based Model" in card.paper
    assert card.capabilities == {"logits", "energy", "sample"}
    assert card.recipe["reinit"] == 0.05 and card.recipe["sgld_steps"] == 20
    record = card.checkpoints()["digits"]
    assert record["command"].startswith("robusteval train --model jem")
    # Issue 3's budget: under 8 minutes on one idle core.
    assert record["metrics"]["train_cpu_seconds"] < 480


def test_energy_is_minus_logsumexp_of_the_logits():
    x = digits_test_split().x[:32]
    with torch.no_grad():
        assert_softmax_is_the_energy_ratio(jem(), x, 0.0)
        # p(y | x) = exp(f_y) / Σ exp(f): −f_y − E(x) is the cross-entropy of y.
        y = digits_test_split().y[:32]
        logits = jem().logits(x)
        nll = -logits.gather(1, y.view(-1, 1)).squeeze(1) - jem().energy(x)
        torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_no_denoiser():
    with pytest.raises(CapabilityError, match="denoise"):
        jem().denoise(digits_test_split().x[:2], 0.25)


def test_clean_accuracy_floor():
    assert clean_accuracy(jem()) >= 0.93


def test_energy_separates_digits_from_noise_and_shuffled_digits():
    aurocs = energy_aurocs(jem())
    assert aurocs["uniform"] >= 0.95, aurocs
    assert aurocs["shuffled"] >= 0.95, aurocs


def test_class_conditional_samples_are_recognised_by_standard():
    assert conditional_sample_confidence(jem()) >= 0.7


def test_class_conditional_chains_lower_the_class_energy_from_noise():
    model = jem()
    y = torch.arange(10)
    generator = torch.Generator().manual_seed(3)
    samples = model.sample(10, y, generator=generator)
    start = torch.rand(samples.shape, generator=torch.Generator().manual_seed(3))  # the chains' start
    with torch.no_grad():
        assert bool((model.class_energy(samples, y) < model.class_energy(start, y)).all())
        assert torch.equal(model.logits(samples).argmax(1), y)


def _tiny_run(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    data = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset(data.name, "train", data.x[:96], data.y[:96], data.classes)
    model = JEM(dataset_info("digits"))
    options = JEM_RECIPE.with_options({"sgld_steps": 3, "buffer_size": 100, "warmup_steps": 1})
    figures = train_jem(model, subset, TrainContext(2, seed, torch.Generator().manual_seed(seed), False, options))
    assert set(figures) >= {"train_cross_entropy", "train_energy_data", "train_energy_samples"}
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_for_a_seed_and_moves_every_layer():
    first, again = _tiny_run(0), _tiny_run(0)
    torch.manual_seed(0)
    initial = JEM(dataset_info("digits")).state_dict()
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
        assert not torch.equal(first[key], initial[key]), f"{key} did not train"
