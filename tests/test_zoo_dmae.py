"""dmae (Wu et al. 2023): the shipped digits weights against issue 3's floors, and the masked autoencoder's mechanics."""

from __future__ import annotations

import functools

import pytest
import torch
from zoo_floors import clean_accuracy, denoise_figures, digits_test_split

import robusteval
from robusteval.core.interface import CapabilityError
from robusteval.data import ImageDataset, dataset_info
from robusteval.model_zoo.dmae import (
    DMAE,
    DMAE_RECIPE,
    Patches,
    consistency_loss,
    random_keep,
    train_dmae,
)
from robusteval.training import TrainContext


@functools.cache
def dmae() -> DMAE:
    return robusteval.create_model("dmae", dataset="digits")


def test_card_cites_the_paper_and_declares_what_dmae_computes():
    card = robusteval.model_card("dmae")
    assert card.family == "joint"
    assert "Wu" in card.paper and "Denoising Masked Autoencoders" in card.paper
    assert card.capabilities == {"logits", "denoise"}
    assert card.recipe["pretrain_sigma"] == 0.25 and card.recipe["mask_ratio"] == 0.75
    record = card.checkpoints()["digits"]
    assert record["metrics"]["train_cpu_seconds"] < 480  # issue 3's budget on one idle core
    with pytest.raises(CapabilityError):
        dmae().energy(digits_test_split().x[:2])


def test_patches_are_2x2_blocks_in_raster_order_and_join_inverts_split():
    patches = Patches((1, 8, 8), 2)
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    vectors = patches.split(image)
    assert vectors.shape == (1, 16, 4) and patches.count == 16
    assert vectors[0, 0].tolist() == [0, 1, 8, 9]
    assert vectors[0, 1].tolist() == [2, 3, 10, 11]
    assert vectors[0, 4].tolist() == [16, 17, 24, 25]
    torch.testing.assert_close(patches.join(vectors), image)


def test_random_masking_keeps_a_quarter_of_the_patches_uniformly():
    keep = random_keep(4000, 16, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (4000, 4)
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "indices are sorted and distinct"
    counts = torch.bincount(keep.flatten(), minlength=16).float() / 4000
    torch.testing.assert_close(counts, torch.full((16,), 0.25), atol=0.03, rtol=0)
    torch.testing.assert_close(keep[:5], random_keep(5, 16, 0.75, torch.Generator().manual_seed(0))[:5])


def test_masked_reconstruction_sees_only_the_visible_patches():
    model, x = dmae(), digits_test_split().x[:6]
    keep = random_keep(6, 16, 0.75, torch.Generator().manual_seed(1))
    hidden = torch.ones(6, 16, dtype=torch.bool).scatter_(1, keep, False)
    mask = model.patches.join(hidden.unsqueeze(-1).expand(-1, -1, 4).float())
    scrambled = torch.where(mask.bool(), torch.rand(x.shape, generator=torch.Generator().manual_seed(2)), x)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(scrambled, keep), model.reconstruct(x, keep))
        # Keeping every patch is the unmasked path that denoise uses.
        every = torch.arange(16).expand(6, 16)
        torch.testing.assert_close(model.reconstruct(x, every), model.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_clean_accuracy_floor():
    assert clean_accuracy(dmae()) >= 0.95


@pytest.mark.parametrize("sigma, gain", [(0.25, 2.0), (0.5, 3.0)])
def test_denoising_beats_the_noisy_input(sigma: float, gain: float):
    figures = denoise_figures(dmae(), sigma)
    assert figures["denoised"] >= figures["noisy"] + gain, figures


def test_denoising_beats_the_best_gaussian_blur_at_sigma_half():
    figures = denoise_figures(dmae(), 0.5)
    assert figures["denoised"] > figures["blur"], figures


def test_per_row_sigma_tensor_matches_float_sigma():
    model, x = dmae(), digits_test_split().x[:4]
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(noisy, torch.full((4,), 0.25)), model.denoise(noisy, 0.25))
        torch.testing.assert_close(model.logits(noisy, torch.full((4,), 0.25)), model.logits(noisy, 0.25))


def test_consistency_loss_is_kl_to_the_mean_plus_its_entropy():
    same = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]).repeat(3, 1)  # 3 identical copies of 2 images
    mean = same[:2].softmax(1)
    entropy = float(-(mean * mean.log()).sum(1).mean())
    assert float(consistency_loss(same, 3, 1.0, 0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(consistency_loss(same, 3, 1.0, 0.5)) == pytest.approx(0.5 * entropy, rel=1e-5)
    differing = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # 2 copies of 1 image that disagree
    p, q = differing.softmax(1)
    m = (p + q) / 2
    kl = 0.5 * float((m * (m / p).log()).sum() + (m * (m / q).log()).sum())
    assert float(consistency_loss(differing, 2, 1.0, 0.0)) == pytest.approx(kl, rel=1e-5)


def _tiny_run(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    data = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset(data.name, "train", data.x[:96], data.y[:96], data.classes)
    model = DMAE(dataset_info("digits"))
    options = DMAE_RECIPE.with_options({"warmup_steps": 1, "finetune_fraction": 1.0})
    figures = train_dmae(model, subset, TrainContext(1, seed, torch.Generator().manual_seed(seed), False, options))
    assert set(figures) >= {"pretrain_mse", "finetune_cross_entropy"}
    assert all(p.requires_grad for p in model.parameters())
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_and_fine_tunes_a_copy_of_the_pretrained_encoder():
    first, again = _tiny_run(0), _tiny_run(0)
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    # The classifier's encoder started from the pre-trained one and moved away from it.
    moved = [k for k in first if k.startswith("classifier_encoder.")]
    assert moved and any(
        not torch.equal(first[k], first[k.replace("classifier_encoder.", "encoder.")]) for k in moved
    )
