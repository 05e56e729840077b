"""Verifying adversarial examples: finite, inside the ε-ball, inside [0, 1], misclassified on a fresh pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robusteval.attacks.defenses import DeployedPipeline
from robusteval.core.interface import trusted_inputs

BALL_TOLERANCE = 1e-6


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-row L∞ or L2 norm, computed in float64."""
    flat = delta.detach().flatten(1).double()
    if norm == "Linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1)


def project_to_ball(x: Tensor, x_adv: Tensor, norm: str, eps: float) -> Tensor:
    """Project x_adv onto the ε-ball around x (stays in [0, 1] when x and x_adv are)."""
    delta = x_adv - x
    if norm == "Linf":
        return x + delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(eps / norms, max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return x + delta * factor


@dataclass
class Verification:
    """Per-point outcome of verifying candidate adversarial examples."""

    valid: Tensor  # finite, in the ball, in [0, 1] and misclassified
    prediction: Tensor
    misclassified: Tensor
    in_ball: Tensor
    in_box: Tensor
    finite: Tensor
    norms: Tensor


@torch.no_grad()
def verify_adversarial(pipeline: DeployedPipeline, x: Tensor, x_adv: Tensor, y: Tensor, norm: str,
                       eps: float) -> Verification:
    """Check candidates: finite, ‖x_adv − x‖ ≤ ε + 1e-6, inside [0, 1], and misclassified on a fresh pass.

    The prediction is the pipeline's deployed decision (for randomized
    defenses the majority over fresh noise draws).
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"adversarial examples have shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(finite.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    norms = perturbation_norm(safe - x, norm)
    in_ball = finite & (norms <= eps + BALL_TOLERANCE)
    in_box = finite & (flat >= 0).all(1) & (flat <= 1).all(1)
    with trusted_inputs():  # out-of-box candidates are what is being checked, not a caller's error
        prediction = pipeline.predict(safe)
    misclassified = finite & (prediction != y)
    return Verification(in_ball & in_box & misclassified, prediction, misclassified, in_ball, in_box, finite, norms)
