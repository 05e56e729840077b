"""Every single attack, the randomized suite, the masking flags and 3-channel inputs, each against a known answer.

The models are linear, so each point's minimal adversarial distance is known
exactly (attack_fixtures.multiclass_problem): no sound attack may break a
point farther than ε, and a strong one breaks (nearly) every point closer.
"""

from __future__ import annotations

import pytest
import torch
from attack_fixtures import SHAPE, clopper_pearson, linear_problem, multiclass_problem
from scipy.stats import norm as gaussian
from torch import nn

import robusteval
from robusteval.attacks.verification import BALL_TOLERANCE


def _codes(result, status="flag"):
    return {c["check"] for c in result.checks if c["status"] == status}


def _assert_sound(result, distance: torch.Tensor) -> None:
    """No broken point lies farther than ε, and no perturbation is shorter than the exact minimum."""
    for e, point in enumerate(result.curve):
        assert point.robust >= int((distance > point.eps + BALL_TOLERANCE).sum())
        assert (point.ci_low, point.ci_high) == pytest.approx(clopper_pearson(point.robust, result.n), abs=1e-9)
        for record in result.records:
            outcome = record["results"][e]
            if outcome["broken"]:
                exact = float(distance[record["index"]])
                assert exact <= point.eps + BALL_TOLERANCE
                assert outcome["perturbation_norm"] >= exact - 1e-4  # nothing beats the minimal distance


@pytest.mark.parametrize(
    ("attack", "norm", "steps", "tolerance"),
    [
        ("apgd-dlr", "Linf", None, 2),
        ("apgd-t", "Linf", 20, 2),
        ("fab-t", "Linf", 20, 2),
        ("apgd-dlr", "L2", None, 2),
        ("fab-t", "L2", 20, 2),
        # Square is a random search: 1000 queries find most, not all, of the breakable points.
        ("square", "Linf", 1000, 8),
        # C&W minimises ‖δ‖² + c·margin with c = 1 for 50 steps: it finds an adversarial point near, not at,
        # the minimal distance; projected onto a small ball it breaks fewer points than exist.
        ("cw-l2", "L2", None, 12),
    ],
)
def test_single_attacks_reach_the_exact_multiclass_answer(attack, norm, steps, tolerance):
    model, x, y, distance = multiclass_problem(n=30)
    eps = [float(distance[norm].quantile(0.3)), float(distance[norm].quantile(0.7))]
    result = robusteval.evaluate_attack(model, (x, y), attack=attack, norm=norm, eps=eps, steps=steps,
                                        device="cpu", large_eps_check=False)
    assert result.clean_accuracy == 1.0 and result.attack == attack
    _assert_sound(result, distance[norm])
    for e, point in enumerate(result.curve):
        exact = int((distance[norm] > point.eps).sum())
        assert exact <= point.robust <= exact + tolerance, (point.eps, point.robust, exact)
        assert set(point.broken_by) == {attack}  # and something was broken, by this attack
        if tolerance <= 2:
            # A strong attack breaks every point clearly (5% of ε) inside the ball.
            clear = distance[norm] < 0.95 * point.eps
            broken = torch.tensor([r["results"][e]["broken"] for r in result.records])
            assert bool(broken[clear].all()), point.eps
    if attack in ("apgd-t", "fab-t"):
        assert not any("target class" in note for note in result.notes)  # 10 classes: all 9 targets


def test_eot_pgd_against_a_noise_defense_breaks_exactly_the_near_points():
    # Majority votes over N(0, σ²) noise keep a linear classifier's boundary (symmetric noise on the margin).
    model, x, y, signed = linear_problem(n=100)
    w = model.module.w.detach().double()
    linf = signed.abs().double() * w.norm() / w.abs().sum()
    eps = [0.03, 0.08]
    result = robusteval.evaluate_attack(model, (x, y), attack="eot-pgd", eps=eps, device="cpu",
                                        defense="noise:0.05", large_eps_check=False)
    assert result.eot == 20 and "randomized-without-eot" in _codes(result, "pass")
    for e, point in enumerate(result.curve):
        robust = torch.tensor([r["correct"] and not r["results"][e]["broken"] for r in result.records])
        # Points within 0.005 in L∞ (a vote's noise) of the boundary before or after the attack may go either way.
        clear = ((linf - point.eps).abs() > 0.005) & (linf > 0.005)
        assert torch.equal(robust[clear], (linf > point.eps)[clear]) and int(clear.sum()) >= 80
        assert set(point.broken_by) == {"eot-pgd"}


def test_autoattack_rand_runs_both_members_with_eot_and_is_sound():
    model, x, y, distance = multiclass_problem(n=20)
    eps = [float(distance["Linf"].quantile(0.5))]
    # σ = 0.002 moves a margin by ~0.002·‖Δw‖₂, under 0.0005 in L∞ distance: the base distances still hold
    # away from that band.
    result = robusteval.evaluate_attack(model, (x, y), attack="autoattack-rand", eps=eps, steps=10, device="cpu",
                                        defense="noise:0.002", large_eps_check=False)
    assert result.eot == 20 and result.attack == "autoattack-rand"
    point = result.curve[0]
    clear = (distance["Linf"] - point.eps).abs() > 0.0005
    robust = torch.tensor([r["correct"] and not r["results"][0]["broken"] for r in result.records])
    assert torch.equal(robust[clear], (distance["Linf"] > point.eps)[clear])
    assert set(point.broken_by) <= {"apgd-ce", "apgd-dlr"} and point.broken_by.get("apgd-ce", 0) > 0


# --- the masking flags fire -------------------------------------------------------------------------------------
class _Softmax(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class _Dynamic(nn.Module):
    """Computes an input gradient inside its forward pass (a 'dynamic' defense, to AutoAttack)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.inner(probe).logsumexp(1).sum(), probe)
        return self.inner(x + 0.0 * grad)


class _Noisy(nn.Module):
    """Adds fresh noise to its logits on every call without declaring itself randomized."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits + 0.5 * torch.randn_like(logits)


@pytest.fixture(scope="module")
def multiclass():
    return multiclass_problem(n=20)


@pytest.mark.parametrize(
    ("wrapper", "code", "words"),
    [
        (_Softmax, "softmax-output", "probabilities"),
        (_Dynamic, "dynamic-forward", "computes gradients"),
        (_Noisy, "randomized-without-eot", "check_randomized"),
    ],
)
def test_each_masking_flag_fires_on_the_model_it_describes(multiclass, wrapper, code, words):
    model, x, y, _ = multiclass
    wrapped = robusteval.wrap(wrapper(model.module), num_classes=10, input_shape=SHAPE, name=code)
    result = robusteval.evaluate_attack(wrapped, (x, y), attack="fgsm", eps=[0.01], device="cpu",
                                        large_eps_check=False)
    assert code in _codes(result)
    assert any(flag.startswith(f"{code}:") and words in flag for flag in result.flags)
    # The plain model raises none of them.
    plain = robusteval.evaluate_attack(model, (x, y), attack="fgsm", eps=[0.01], device="cpu", large_eps_check=False)
    assert code not in _codes(plain) and not plain.flags


# --- 3-channel inputs ---------------------------------------------------------------------------------------------
def test_three_channel_inputs_through_the_attack_engine():
    shape = (3, 8, 8)
    model, x, y, distance = multiclass_problem(n=20, shape=shape)
    eps = [float(distance["Linf"].quantile(0.5))]
    result = robusteval.evaluate_attack(model, (x, y), attack="fab-t", eps=eps, steps=20, device="cpu",
                                        large_eps_check=False)
    _assert_sound(result, distance["Linf"])
    broken = torch.tensor([r["results"][0]["broken"] for r in result.records])
    assert bool(broken[distance["Linf"] < 0.95 * eps[0]].all())  # every point clearly inside the ball
    assert result.adversarial[eps[0]].shape == (20, *shape)


def test_three_channel_inputs_through_certification():
    # A binary linear classifier: the smoothed top-class probability is Φ(|d|/σ) exactly, so each image's count
    # of n draws is Binomial(n, Φ(|d|/σ)), and a sound radius never exceeds the distance |d|.
    shape = (3, 8, 8)
    model, x, y, signed = linear_problem(n=20, shape=shape)
    sigma, n = 0.25, 2000
    result = robusteval.certify(model, (x, y), sigma=sigma, n0=50, n=n, alpha=0.001, device="cpu", compile=False)
    p = torch.tensor(gaussian.cdf(signed.abs().double().numpy() / sigma))
    for record in result.records:
        i = record["index"]
        expected = n * float(p[i])
        spread = (n * float(p[i]) * (1 - float(p[i]))) ** 0.5
        assert record["top_class"] == int(y[i])
        assert abs(record["count"] - expected) <= 4.5 * spread + 1, (i, record["count"], expected)
        assert record["radius"] <= float(signed[i].abs()) + 1e-6
        if not record["abstain"]:
            assert record["prediction"] == int(y[i])
    certified = [r for r in result.records if not r["abstain"]]
    assert len(certified) >= 10  # the far points certify, and with 2000 draws their radii are near |d|
    # Below the largest certifiable radius σΦ⁻¹(α^(1/n)) = 0.67, the radius is close to the distance.
    assert max(float(signed[r["index"]].abs()) - r["radius"] for r in certified if signed[r["index"]].abs() < 0.6) < 0.1


# --- the model stays in eval mode ---------------------------------------------------------------------------------
class _BatchNormNet(nn.Module):
    """A linear map with BatchNorm after it: in train mode it uses the batch's statistics and updates its own."""

    def __init__(self, inner: nn.Module, classes: int):
        super().__init__()
        self.inner = inner
        self.norm = nn.BatchNorm1d(classes)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0))
            self.norm.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.norm(self.inner(x))


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "fab-t"])
def test_attacks_leave_batchnorm_statistics_alone_and_verify_in_eval_mode(multiclass, attack):
    # torchattacks puts a module back in train mode after an attack when it found it in train mode; a pipeline
    # built in train mode would then run every later pass (verification included) on batch statistics.
    import copy

    model, x, y, distance = multiclass
    net = _BatchNormNet(model.module, 10).eval()
    wrapped = robusteval.wrap(net, num_classes=10, input_shape=SHAPE, name="batchnorm")
    reference = copy.deepcopy(net).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        labels = reference(x).argmax(1)
    eps = [0.01, 0.02]
    result = robusteval.evaluate_attack(wrapped, (x, labels), attack=attack, eps=eps, steps=10, device="cpu",
                                        large_eps_check=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training
    for e, eps_value in enumerate(eps):
        broken = torch.tensor([r["results"][e]["broken"] for r in result.records])
        with torch.no_grad():
            fooled = reference(result.adversarial[eps_value]).argmax(1) != labels
        assert torch.equal(broken, fooled)  # each break fools the eval-mode model, and only breaks do
        assert 0 < int(broken.sum()) < len(labels)
