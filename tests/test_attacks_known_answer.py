"""Known answers: a linear classifier's exact minimal adversarial distances, and exact denoiser gradients."""

from __future__ import annotations

import pytest
import torch
from attack_fixtures import SHAPE, GaussianTweedie, linear_problem

import robusteval
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.vocabulary import parse_defense
from robusteval.attacks.verification import BALL_TOLERANCE

LINF_EPS = [0.01, 0.03, 0.05, 0.08, 0.1]
L2_EPS = [0.1, 0.3, 0.5, 0.8, 1.0]


@pytest.fixture(scope="module")
def problem():
    """The linear problem with its exact box-constrained L2 and L∞ distances."""
    model, x, y, signed = linear_problem(n=200)
    w = model.module.w.detach().double()
    b = float(model.module.b.detach())
    flat = x.flatten(1).double()
    margin = flat @ w + b
    l2 = margin.abs() / w.norm()
    linf = margin.abs() / w.abs().sum()
    assert torch.allclose(l2, signed.abs().double(), atol=1e-5)
    # The unconstrained minimisers x − m·w/‖w‖² and x − linf·sign(m)·sign(w) stay inside [0, 1] for every
    # point, so the box is never active and these are the exact minimal distances of the box-constrained problem.
    l2_point = flat - (margin / w.norm() ** 2).unsqueeze(1) * w
    linf_point = flat - (linf * margin.sign()).unsqueeze(1) * w.sign()
    for point in (l2_point, linf_point):
        assert point.min() >= 0 and point.max() <= 1
    # Every attack moves at most ε_max per pixel (L∞) or ε_max·max|ŵ| (L2 along ŵ): still inside the box.
    assert flat.min() - max(LINF_EPS) > 0 and flat.max() + max(LINF_EPS) < 1
    return model, x, y, {"L2": l2, "Linf": linf}


@pytest.mark.parametrize(
    ("attack", "norm", "eps", "steps"),
    [
        ("pgd", "Linf", LINF_EPS, None),
        # PGD-L2 from a random start shrinks its angle to the optimal direction by ~1.2× per step of 0.2ε:
        # its default 10 steps stop ~3% short of the optimal margin; 50 steps reach it.
        ("pgd-l2", "L2", L2_EPS, 50),
        ("autoattack", "Linf", [0.03, 0.08], None),
        # Square's 5000 queries on the truly robust points dominate AutoAttack's time: one ε for L2.
        ("autoattack", "L2", [0.5], None),
    ],
)
def test_linear_robust_accuracy_is_the_exact_fraction(problem, attack, norm, eps, steps):
    model, x, y, distance = problem
    n = len(y)
    result = robusteval.evaluate_attack(model, (x, y), attack=attack, norm=norm, eps=eps, steps=steps, device="cpu",
                                        large_eps_check=False)
    assert result.clean_accuracy == 1.0
    for e, point in enumerate(result.curve):
        exact = int((distance[norm] > point.eps).sum())
        # No attack may break a point farther than ε (+ the ball's tolerance): that would be an unsound example.
        assert point.robust >= int((distance[norm] > point.eps + BALL_TOLERANCE).sum())
        assert abs(point.robust - exact) <= 0.01 * n, (attack, norm, point.eps, point.robust, exact)
        for record in result.records:
            outcome = record["results"][e]
            if outcome["broken"]:
                assert distance[norm][record["index"]] <= point.eps + BALL_TOLERANCE
                assert outcome["perturbation_norm"] <= point.eps + BALL_TOLERANCE
    if attack == "autoattack":
        assert any("apgd-t" in note for note in result.notes)  # 2 classes: the targeted DLR loss cannot run


def _gaussian_tweedie(tau: float = 0.3) -> GaussianTweedie:
    model, _, _, _ = linear_problem(n=1)
    w = model.module.w.detach()
    b = model.module.b.detach()
    return GaussianTweedie(torch.stack([-w / 2, w / 2]), torch.stack([-b / 2, b / 2]), mean=0.5, tau=tau)


def test_full_gradient_differentiates_through_the_tweedie_denoiser_and_bpda_skips_it():
    model = _gaussian_tweedie(tau=0.3).eval()
    sigma = 0.2
    shrink = 0.3**2 / (0.3**2 + sigma**2)  # d denoise / dx for the Gaussian prior
    x = torch.rand(4, *SHAPE) * 0.5 + 0.25
    full = DeployedPipeline(model, parse_defense(f"denoise:{sigma}"), "full")
    bpda = DeployedPipeline(model, parse_defense(f"denoise:{sigma}"), "bpda")
    expected_denoised = (0.3**2 * x + sigma**2 * 0.5) / (0.3**2 + sigma**2)
    assert torch.allclose(model.denoise(x, sigma), expected_denoised, atol=1e-6)
    for pipeline, factor in ((full, shrink), (bpda, 1.0)):
        inputs = x.clone().requires_grad_(True)
        out = pipeline(inputs)
        assert torch.allclose(out, model.logits(expected_denoised), atol=1e-5)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), inputs)
        expected = factor * model.weight[1].detach().view(1, *SHAPE).expand_as(x)
        assert torch.allclose(grad, expected, atol=1e-5), pipeline.gradient


def test_denoise_defense_with_both_gradients_keeps_the_exact_answer():
    # Shrinking towards μ = 0.5, a point of the boundary, keeps the decision boundary: the same exact distances.
    model = _gaussian_tweedie()
    _, x, y, signed = linear_problem(n=200)
    w = model.weight[1].detach().double() * 2
    linf = signed.abs().double() * w.norm() / w.abs().sum()
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", norm="Linf", eps=[0.03, 0.08], device="cpu",
                                        defense="denoise:0.2", gradient="auto", large_eps_check=False)
    assert result.gradient == "auto"
    for point in result.curve:
        assert abs(point.robust - int((linf > point.eps).sum())) <= 2
        assert set(point.broken_by) <= {"pgd[full]", "pgd[bpda]"}
    dynamic = next(c for c in result.checks if c["check"] == "dynamic-forward")
    assert dynamic["status"] == "pass" and "denoiser" in dynamic["message"]
