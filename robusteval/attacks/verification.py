"""Verifying adversarial examples: finite, inside the ε-ball, inside [0, 1], misclassified on a fresh pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robusteval.attacks.defenses import DeployedPipeline
from robusteval.core.interface import trusted_inputs

BALL_TOLERANCE = 1e-6
# x + δ is rounded to float32, by at most 2⁻²⁴ per coordinate in [0, 1]: under L1 these add up over the
# coordinates (up to 1.8e-4 on CIFAR-10's 3,072), so an example an attack projected onto the sphere ‖δ‖₁ = ε
# must not be rejected for it. Under L∞ and L2 they do not add up beyond BALL_TOLERANCE.
FLOAT32_ROUNDING = 2.0**-24


def ball_tolerance(norm: str, dim: int) -> float:
    """How far beyond ε a verified example may lie: BALL_TOLERANCE, plus float32 rounding summed under L1."""
    return BALL_TOLERANCE + (dim * FLOAT32_ROUNDING if norm == "L1" else 0.0)


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-row L∞, L2 or L1 norm, computed in float64."""
    flat = delta.detach().flatten(1).double()
    if norm == "Linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    if norm == "L1":
        return flat.abs().sum(1)
    if norm == "L2":
        return flat.norm(dim=1)
    raise ValueError(f"unknown norm {norm!r}")


def project_to_ball(x: Tensor, x_adv: Tensor, norm: str, eps: float) -> Tensor:
    """Project x_adv onto the ε-ball around x (stays in [0, 1] when x and x_adv are)."""
    delta = x_adv - x
    if norm == "Linf":
        return x + delta.clamp(-eps, eps)
    if norm == "L1":
        return x + _project_l1(delta.flatten(1), eps).view_as(delta)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(eps / norms, max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return x + delta * factor


def _project_l1(delta: Tensor, eps: float) -> Tensor:
    """Euclidean projection of each row onto the L1 ball of radius ε (Duchi et al. 2008, by sorting).

    Soft-thresholding shrinks every coordinate towards 0, so a point of the box [0, 1] stays in it.
    """
    magnitude = delta.abs()
    outside = magnitude.sum(1) > eps
    if not bool(outside.any()):
        return delta
    ordered = magnitude.sort(1, descending=True).values
    cumulative = ordered.cumsum(1) - eps
    ranks = torch.arange(1, delta.shape[1] + 1, device=delta.device, dtype=delta.dtype)
    count = (ordered - cumulative / ranks > 0).sum(1, keepdim=True).clamp_min(1)
    threshold = (cumulative.gather(1, count - 1) / count).clamp_min(0)
    shrunk = delta.sign() * (magnitude - threshold).clamp_min(0)
    return torch.where(outside.unsqueeze(1), shrunk, delta)


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
    """Check candidates: finite, ‖x_adv − x‖ ≤ ε + `ball_tolerance`, in [0, 1], misclassified on a fresh pass.

    The prediction is the pipeline's deployed decision (for randomized
    defenses the majority over fresh noise draws).
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"adversarial examples have shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(finite.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    norms = perturbation_norm(safe - x, norm)
    in_ball = finite & (norms <= eps + ball_tolerance(norm, flat.shape[1]))
    in_box = finite & (flat >= 0).all(1) & (flat <= 1).all(1)
    with trusted_inputs():  # out-of-box candidates are what is being checked, not a caller's error
        prediction = pipeline.predict(safe)
    misclassified = finite & (prediction != y)
    return Verification(in_ball & in_box & misclassified, prediction, misclassified, in_ball, in_box, finite, norms)
