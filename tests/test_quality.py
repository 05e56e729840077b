"""The measures behind the zoo's quality floors, against hand-computed cases and brute force.

Every floor in zoo_floors.py reads these functions, so an AUROC stuck at 1, a
blur that does nothing or a shuffle that keeps the image would leave all of
them green; these tests hold each measure to an independent computation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from robusteval.generative.quality import (
    auroc,
    best_blur_psnr,
    gaussian_blur,
    pixel_shuffled,
    psnr,
)


@pytest.mark.parametrize(
    ("positive", "negative", "expected"),
    [
        ([3.0, 4.0], [1.0, 2.0], 1.0),  # perfectly separated
        ([1.0, 2.0], [3.0, 4.0], 0.0),  # perfectly reversed
        ([1.0, 3.0], [2.0], 0.5),
        ([1.0], [1.0], 0.5),  # a tie counts half
        ([0.9, 0.8, 0.3], [0.5, 0.1], 5 / 6),  # 5 of the 6 pairs ordered right
        ([2.0, 2.0, 0.0], [1.0, 2.0], 3 / 6),  # 2 wins, 2 ties, 2 losses
    ],
)
def test_auroc_hand_computed_cases(positive, negative, expected):
    assert auroc(torch.tensor(positive), torch.tensor(negative)) == pytest.approx(expected, abs=1e-12)


def test_auroc_equals_pair_counting_and_sklearn_on_random_scores():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(37, generator=g).round(decimals=1) + 0.5  # rounded: ties occur
    neg = torch.randn(23, generator=g).round(decimals=1)
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos.tolist(), neg.tolist())]
    by_pairs = sum(pairs) / len(pairs)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    by_sklearn = roc_auc_score(labels, np.r_[pos.numpy(), neg.numpy()])
    assert 0.55 < by_pairs < 0.95  # a case that is neither trivial nor reversed
    assert auroc(pos, neg) == pytest.approx(by_pairs, abs=1e-12)
    assert auroc(pos, neg) == pytest.approx(by_sklearn, abs=1e-12)
    assert auroc(neg, pos) == pytest.approx(1 - by_pairs, abs=1e-12)  # swapping the classes mirrors it


def _blur_by_brute_force(x: np.ndarray, width: float) -> np.ndarray:
    """A 2-D convolution with the outer product of a sampled, normalised Gaussian, reflect-padded by numpy."""
    radius = max(1, int(np.ceil(3 * width)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / width) ** 2)
    kernel = np.outer(taps, taps)
    kernel /= kernel.sum()
    out = np.empty_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        padded = np.pad(x[b, c], radius, mode="reflect")
        for i, j in itertools.product(range(x.shape[2]), range(x.shape[3])):
            out[b, c, i, j] = (padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1] * kernel).sum()
    return out


@pytest.mark.parametrize(("channels", "width"), [(1, 1.0), (3, 0.6), (1, 1.8)])
def test_gaussian_blur_equals_a_brute_force_convolution(channels, width):
    x = torch.rand(2, channels, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    blurred = gaussian_blur(x, width)
    assert blurred.shape == x.shape
    assert np.allclose(blurred.numpy(), _blur_by_brute_force(x.numpy(), width), atol=1e-12)
    assert not torch.allclose(blurred, x, atol=1e-3)  # it does blur


def test_gaussian_blur_keeps_constants_spreads_an_impulse_and_shrinks_white_noise():
    assert torch.equal(gaussian_blur(torch.full((1, 1, 8, 8), 0.3), 0.0), torch.full((1, 1, 8, 8), 0.3))
    assert torch.allclose(gaussian_blur(torch.full((2, 3, 8, 8), 0.3), 1.2), torch.full((2, 3, 8, 8), 0.3))
    width = 1.5
    impulse = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    impulse[0, 0, 10, 10] = 1.0
    response = gaussian_blur(impulse, width)[0, 0]
    assert float(response.sum()) == pytest.approx(1.0, abs=1e-12)  # mass kept away from the border
    offsets = torch.arange(-10, 11, dtype=torch.float64)
    # The second moment of the response along each axis is the kernel's: width² (less a little for the 3σ cut).
    variance = float((response.sum(1) * offsets**2).sum())
    assert variance == pytest.approx(width**2, rel=0.03)
    # White noise of variance 1 comes out with variance Σk² = 1/(4π width²) for a wide 2-D Gaussian.
    noise = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inner = gaussian_blur(noise, 2.0)[..., 8:-8, 8:-8]
    assert float(inner.var()) == pytest.approx(1 / (4 * np.pi * 2.0**2), rel=0.15)


def test_best_blur_psnr_finds_the_best_width_and_is_never_worse_than_the_noisy_input():
    # Smooth images (low-frequency patterns) plus white noise: blurring helps, and a wide blur hurts again.
    grid = torch.linspace(0, 1, 16)
    clean = (0.5 + 0.4 * torch.sin(2 * torch.pi * grid.view(1, 1, -1, 1) * torch.tensor([1.0, 2.0]).view(-1, 1, 1, 1))
             * torch.cos(2 * torch.pi * grid.view(1, 1, 1, -1))).double()
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score, width = best_blur_psnr(noisy, clean)

    def by_hand(estimate):
        mse = ((estimate - clean) ** 2).flatten(1).mean(1)
        return float((10 * torch.log10(1 / mse)).mean())

    grid_scores = {w / 10: by_hand(gaussian_blur(noisy, w / 10)) for w in range(0, 31, 2)}
    assert width == max(grid_scores, key=grid_scores.get)
    assert score == pytest.approx(grid_scores[width], abs=1e-9)
    assert 0 < width < 3.0 and score > by_hand(noisy) + 3  # the blur gains several dB over the noisy input
    # A noiseless input: width 0 is on the grid, so the baseline reaches the 120 dB cap of a zero error.
    assert best_blur_psnr(clean, clean)[0] == pytest.approx(120.0)


def test_psnr_by_hand():
    clean = torch.zeros(2, 1, 4, 4)
    estimate = clean.clone()
    estimate[0] += 0.1  # MSE 0.01: 20 dB
    estimate[1, 0, 0, 0] = 1.0  # MSE 1/16: 12.04 dB
    assert psnr(estimate, clean) == pytest.approx((20 + 10 * np.log10(16)) / 2, abs=1e-5)


def test_pixel_shuffled_keeps_each_histogram_and_destroys_the_structure():
    grid = torch.linspace(0, 1, 16)
    smooth = (grid.view(1, 1, -1, 1) * grid.view(1, 1, 1, -1)).expand(5, 1, 16, 16).contiguous()
    smooth = smooth + 0.01 * torch.arange(5).view(-1, 1, 1, 1)  # distinct images
    shuffled = pixel_shuffled(smooth, torch.Generator().manual_seed(0))
    assert shuffled.shape == smooth.shape
    for original, permuted in zip(smooth, shuffled):
        assert torch.equal(original.flatten().sort().values, permuted.flatten().sort().values)  # same pixels
        assert not torch.equal(original, permuted)
    # Each image gets its own permutation.
    orders = [(s.flatten() - 0.01 * i).argsort() for i, s in enumerate(shuffled)]
    assert not all(torch.equal(orders[0], o) for o in orders[1:])

    def neighbour_correlation(images):
        a, b = images[..., :, :-1].flatten(), images[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_correlation(smooth) > 0.95 and abs(neighbour_correlation(shuffled)) < 0.2
    # The same generator state gives the same shuffle.
    assert torch.equal(shuffled, pixel_shuffled(smooth, torch.Generator().manual_seed(0)))
