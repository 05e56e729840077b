"""Known answers: a linear classifier's exact minimal adversarial distances, and exact denoiser gradients."""

from __future__ import annotations

import pytest
import torch
from attack_fixtures import (
    SHAPE,
    GaussianTweedie,
    l1_box_distance,
    linear_problem,
    multiclass_problem,
)
from scipy.optimize import linprog

import robusteval
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.attacks.verification import ball_tolerance
from robusteval.core.vocabulary import parse_defense

LINF_EPS = [0.01, 0.03, 0.05, 0.08, 0.1]
L2_EPS = [0.1, 0.3, 0.5, 0.8, 1.0]
L1_EPS = [1.5, 3.0, 5.0]  # the L1 distances of the linear problem run from 0.01 to 6.8 (quartiles 1.4, 3.1, 4.8)


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
    # L1 concentrates the change on the largest weights, where the box binds: the exact answer is the
    # box-constrained knapsack, checked here against a linear program on a few points.
    l1 = l1_box_distance(flat, margin.sign().unsqueeze(1) * w, margin.abs())
    for i in range(4):
        direction, point, n = (margin.sign()[i] * w).numpy(), flat[i].numpy(), flat.shape[1]
        # δ = u − v with u, v >= 0; minimise Σ u + v subject to direction·δ <= −|margin| and x + δ in [0, 1].
        program = linprog([1.0] * (2 * n), A_ub=[[*direction, *(-direction)]], b_ub=[-abs(float(margin[i]))],
                          bounds=[(0, 1 - p) for p in point] + [(0, p) for p in point])
        assert program.status == 0 and program.fun == pytest.approx(float(l1[i]), rel=1e-9)
    return model, x, y, {"L2": l2, "Linf": linf, "L1": l1}


@pytest.mark.parametrize(
    ("attack", "norm", "eps", "steps"),
    [
        ("pgd", "Linf", LINF_EPS, None),
        # PGD-L2 from a random start shrinks its angle to the optimal direction by ~1.2× per step of 0.2ε:
        # its default 10 steps stop ~3% short of the optimal margin; 50 steps reach it.
        ("pgd-l2", "L2", L2_EPS, 50),
        pytest.param("autoattack", "Linf", [0.03, 0.08], None, marks=pytest.mark.slow),
        # Square's 5000 queries on the truly robust points dominate AutoAttack's time: one ε for L2.
        pytest.param("autoattack", "L2", [0.5], None, marks=pytest.mark.slow),
        # AutoAttack's L1 version (APGD with the L1 projection): the box-constrained minimal L1 distances.
        pytest.param("autoattack", "L1", L1_EPS, None, marks=pytest.mark.slow),
    ],
)
def test_linear_robust_accuracy_is_the_exact_fraction(problem, attack, norm, eps, steps):
    model, x, y, distance = problem
    n = len(y)
    result = robusteval.evaluate_attack(model, (x, y), attack=attack, norm=norm, eps=eps, steps=steps, device="cpu",
                                        large_eps_check=False)
    assert result.clean_accuracy == 1.0
    tolerance = ball_tolerance(norm, x[0].numel())  # BALL_TOLERANCE under L∞ and L2
    for e, point in enumerate(result.curve):
        exact = int((distance[norm] > point.eps).sum())
        # No attack may break a point farther than ε (+ the ball's tolerance): that would be an unsound example.
        assert point.robust >= int((distance[norm] > point.eps + tolerance).sum())
        assert abs(point.robust - exact) <= 0.01 * n, (attack, norm, point.eps, point.robust, exact)
        for record in result.records:
            outcome = record["results"][e]
            if outcome["broken"]:
                assert distance[norm][record["index"]] <= point.eps + tolerance
                assert outcome["perturbation_norm"] <= point.eps + tolerance
    if attack == "autoattack":
        assert any("apgd-t" in note for note in result.notes)  # 2 classes: the targeted DLR loss cannot run


def _gaussian_tweedie(tau: float = 0.3, shift: float = 0.0) -> GaussianTweedie:
    """The linear problem's classifier behind a Tweedie denoiser whose prior mean lies `shift` (signed L2
    distance) off its decision boundary."""
    model, _, _, _ = linear_problem(n=1)
    w = model.module.w.detach()
    b = model.module.b.detach()
    mean = 0.5 + shift * (w / w.norm()).view(SHAPE)
    return GaussianTweedie(torch.stack([-w / 2, w / 2]), torch.stack([-b / 2, b / 2]), mean=mean, tau=tau)


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


TAU, SIGMA, SHIFT = 0.3, 0.2, 0.3


def _purified_exact(signed: torch.Tensor, w: torch.Tensor,
                    eps: list[float]) -> tuple[torch.Tensor, list, list, torch.Tensor]:
    """Per point: correct behind the shrinking denoiser, robust at each ε behind it, robust without it, and
    its L∞ distance to the purified boundary.

    denoise(x) = s·x + (1 − s)·μ with s = τ²/(τ² + σ²) is affine, so the purified classifier is linear with
    the signed distance s·d + (1 − s)·shift: its boundary moves to d = −c, c = (1 − s)·shift/s. Points with
    −c < d < 0 are misclassified outright; a correct point's L∞ distance is |d + c|·‖w‖₂/‖w‖₁.
    """
    s = TAU**2 / (TAU**2 + SIGMA**2)
    c = (1 - s) * SHIFT / s
    scale = float(w.norm() / w.abs().sum())
    d = signed.double()
    correct = (d + c > 0) == (d > 0)
    purified = [correct & ((d + c).abs() * scale > e) for e in eps]
    bare = [d.abs() * scale > e for e in eps]
    return correct, purified, bare, (d + c).abs() * scale


def _robust_points(result, e: int) -> torch.Tensor:
    return torch.tensor([r["correct"] and not r["results"][e]["broken"] for r in result.records])


@pytest.mark.parametrize("gradient", ["auto", "bpda"])
def test_denoise_defense_moves_the_boundary_and_the_attack_finds_the_exact_answer(gradient):
    model = _gaussian_tweedie(TAU, SHIFT)
    _, x, y, signed = linear_problem(n=200)
    eps = [0.03, 0.08]
    correct, purified, bare, _ = _purified_exact(signed, model.weight[1].detach() * 2, eps)
    # The defense matters: an engine that skipped the denoiser would be right on all 200 points and robust on
    # the `bare` points, which differ from the `purified` ones on many points.
    assert 190 > int(correct.sum()) > 180 and all(int((p != q).sum()) >= 10 for p, q in zip(purified, bare))
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", norm="Linf", eps=eps, device="cpu",
                                        defense=f"denoise:{SIGMA}", gradient=gradient, large_eps_check=False)
    assert result.gradient == gradient
    assert torch.equal(torch.tensor([r["correct"] for r in result.records]), correct)
    for e, point in enumerate(result.curve):
        assert int((_robust_points(result, e) != purified[e]).sum()) <= 2, (point.eps, point.robust)
        labels = {"pgd[full]", "pgd[bpda]"} if gradient == "auto" else {"pgd"}
        assert point.broken_by and set(point.broken_by) <= labels
    dynamic = next(c for c in result.checks if c["check"] == "dynamic-forward")
    assert dynamic["status"] == "pass" and "denoiser" in dynamic["message"]


def test_noise_and_denoise_defense_has_the_deterministic_purification_answer():
    # x + σn, then the affine denoiser: the purified margin is the deterministic one plus symmetric Gaussian
    # noise, so the majority decision (and its exact robust points) are those of denoise:S.
    model = _gaussian_tweedie(TAU, SHIFT)
    _, x, y, signed = linear_problem(n=200)
    eps = [0.03, 0.08]
    correct, purified, bare, distance = _purified_exact(signed, model.weight[1].detach() * 2, eps)
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", norm="Linf", eps=eps, device="cpu",
                                        defense=f"denoise:{SIGMA}:noise", large_eps_check=False)
    assert result.defense == f"denoise:{SIGMA}:noise" and result.eot == 20
    # Only points within 0.01 (L∞; 0.4σ of vote noise on the margin) of the boundary, before or after the attack,
    # may go either way; every other point has the exact answer, which differs from `bare` on many points.
    assert torch.equal(torch.tensor([r["correct"] for r in result.records])[distance > 0.01], correct[distance > 0.01])
    for e, point in enumerate(result.curve):
        robust = _robust_points(result, e)
        clear = ((distance - point.eps).abs() > 0.01) & (distance > 0.01)
        assert torch.equal(robust[clear], purified[e][clear]), point.eps
        assert int((robust[clear] != bare[e][clear]).sum()) >= 5 and int(clear.sum()) >= 140
    randomized = next(c for c in result.checks if c["check"] == "randomized-without-eot")
    assert randomized["status"] == "pass"


def test_smoothed_linear_classifier_keeps_the_exact_answer_under_eot():
    # Gaussian smoothing of a linear classifier keeps its boundary (the noise on the margin is symmetric),
    # so the smoothed pipeline has the bare classifier's exact L∞ distances.
    model, x, y, signed = linear_problem(n=200)
    w = model.module.w.detach().double()
    linf = signed.abs().double() * w.norm() / w.abs().sum()
    eps = [0.03, 0.08]
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", norm="Linf", eps=eps, device="cpu",
                                        defense="smooth:0.1:50", large_eps_check=False)
    assert result.clean_accuracy >= 0.97  # only points within the vote's noise of the boundary can be lost
    for point in result.curve:
        exact = int((linf > point.eps).sum())
        assert abs(point.robust - exact) <= 6, (point.eps, point.robust, exact)
        assert point.robust < 200 * result.clean_accuracy - 20  # the attack does break the near points


@pytest.mark.slow  # ~30 s of CPU: APGD-CE runs 5 restarts under L1, Square 5,000 queries on the robust points
def test_autoattack_l1_reaches_the_exact_multiclass_answer_and_stays_in_the_ball_and_the_box():
    """10 linear classes: the minimal L1 distance over every class pair (the knapsack per pair), which APGD-CE
    and APGD-T with the L1 projection reach within the tolerance of the L∞/L2 cases (1% of the points)."""
    model, x, y, distance = multiclass_problem(n=30)
    l1 = distance["L1"]
    eps = [float(l1.quantile(0.3)), float(l1.quantile(0.7))]
    result = robusteval.evaluate_attack(model, (x, y), attack="autoattack", norm="L1", eps=eps, device="cpu",
                                        large_eps_check=False)
    assert result.clean_accuracy == 1.0 and result.norm == "L1"
    for e, point in enumerate(result.curve):
        exact = int((l1 > point.eps).sum())
        assert point.robust >= int((l1 > point.eps + ball_tolerance("L1", 64)).sum())
        assert abs(point.robust - exact) <= 0.01 * len(y), (point.eps, point.robust, exact)
        assert set(point.broken_by) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
        for record in result.records:
            outcome = record["results"][e]
            if outcome["broken"]:
                assert outcome["perturbation_norm"] <= point.eps + ball_tolerance("L1", 64)
                assert outcome["perturbation_norm"] >= float(l1[record["index"]]) - 1e-4
