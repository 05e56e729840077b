"""Measures of what a joint model's generative part does: denoising, density, samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from robusteval.core.interface import JointModel


def psnr(estimate: Tensor, clean: Tensor, peak: float = 1.0) -> float:
    """Mean over images of the per-image PSNR in dB (peak 1 for [0, 1] images)."""
    if estimate.shape != clean.shape:
        raise ValueError(f"estimate and clean must have one shape, got {tuple(estimate.shape)} and {tuple(clean.shape)}")
    mse = (estimate - clean).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(peak**2 / mse)).mean())


def gaussian_blur(x: Tensor, width: float) -> Tensor:
    """Blur each channel with a Gaussian of std `width` pixels (reflect padding)."""
    if width <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * width))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / width) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect" if radius < min(x.shape[-2:]) else "replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def best_blur_psnr(noisy: Tensor, clean: Tensor, widths: tuple[float, ...] | None = None) -> tuple[float, float]:
    """The Gaussian-blur baseline at its best width (chosen on this very data): (psnr, width).

    The width grid includes 0 (no blur), so the baseline is never worse than the noisy input.
    """
    widths = widths or tuple(w / 10 for w in range(0, 31, 2))
    scores = [(psnr(gaussian_blur(noisy, w), clean), w) for w in widths]
    return max(scores)


def pixel_shuffled(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image with its pixels permuted at random: same histogram, no structure."""
    flat = x.flatten(1)
    order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    return torch.gather(flat, 1, order.to(flat.device)).view_as(x)


def auroc(positive_scores: Tensor, negative_scores: Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    pos = positive_scores.flatten().double().view(-1, 1)
    neg = negative_scores.flatten().double().view(1, -1)
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


@torch.no_grad()
def energy_auroc(model: JointModel, real: Tensor, other: Tensor, sigma: float = 0.0) -> float:
    """AUROC of separating real images (low energy) from `other` images by energy."""
    return auroc(-model.energy(real, sigma), -model.energy(other, sigma))


@torch.no_grad()
def sample_confidence(classifier: JointModel, samples: Tensor, labels: Tensor | None = None) -> float:
    """Mean probability the classifier gives to `labels` (or to its own top class when None)."""
    probabilities = classifier.logits(samples.clamp(0, 1)).softmax(1)
    if labels is None:
        return float(probabilities.max(1).values.mean())
    return float(probabilities.gather(1, labels.view(-1, 1).to(probabilities.device)).mean())
