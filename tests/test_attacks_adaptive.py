"""The engine's adaptive stages: saturation remedies, gradient-free escalation, SGLD purification, worst-of-N,
large-ε escalation, and resume through them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attack_fixtures import (
    SHAPE,
    Rounded,
    TinyEnergy,
    linear_problem,
    saturated_linear_problem,
)

import robusteval
from robusteval.attacks import sanity
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.attacks.verification import BALL_TOLERANCE
from robusteval.core.interface import trusted_inputs
from robusteval.core.vocabulary import parse_defense

TESTS = Path(__file__).parent


def _check(result, code):
    return next(c for c in result.checks if c["check"] == code)


def _linf_distance(model, x):
    w = model.module.module.w.detach().double()
    b = float(model.module.module.b.detach())
    return (x.flatten(1).double() @ w + b).abs() / w.abs().sum()


# --- 1. softmax saturation --------------------------------------------------------------------------------
def test_logits_times_1e4_blind_the_cross_entropy_but_not_the_margin():
    model, x, y, _ = saturated_linear_problem(n=200)
    masked, dead = sanity.gradient_masked(model, x, y)
    assert masked.float().mean() > 0.95  # the CE gradient is exactly zero in float32 on nearly every point
    assert not bool(dead.any())  # the margin's gradient is w on every point


@pytest.mark.parametrize(("attack", "eps"), [("autoattack", [0.03, 0.08]), ("apgd-ce", [0.01, 0.03, 0.05, 0.1])])
def test_saturated_linear_model_gets_its_exact_robust_fraction_and_the_saturation_note(attack, eps):
    model, x, y, _ = saturated_linear_problem(n=200)
    distance = _linf_distance(model, x)
    result = robusteval.evaluate_attack(model, (x, y), attack=attack, norm="Linf", eps=eps, device="cpu",
                                        large_eps_check=False)
    assert result.clean_accuracy == 1.0
    for e, point in enumerate(result.curve):
        exact = int((distance > point.eps).sum())
        assert point.robust >= int((distance > point.eps + BALL_TOLERANCE).sum())  # never an unsound break
        assert abs(point.robust - exact) <= 0.01 * len(y), (attack, point.eps, point.robust, exact)
        assert point.standard_robust >= point.robust
    check = _check(result, "zero-gradients")
    assert check["status"] == "pass" and "softmax saturation" in check["message"] and "cleared" in check["message"]
    assert not any("zero-gradients" in f for f in result.flags)
    if attack == "apgd-ce":
        # APGD-CE alone is blind here: its own figure is far above the truth, and the remedy broke the points.
        last = result.curve[-1]
        assert last.standard_robust_accuracy > last.robust_accuracy + 0.3
        assert any(label.startswith("remedy:") for label in last.broken_by)


# --- 2. no usable gradient ----------------------------------------------------------------------------------
def test_rounding_front_end_keeps_the_flag_and_escalates_with_square():
    model, x, y, _ = linear_problem(n=20)
    rounded = robusteval.wrap(Rounded(model.module), num_classes=2, input_shape=SHAPE, name="rounded")
    result = robusteval.evaluate_attack(rounded, (x, y), attack="apgd-ce", eps=[0.25], device="cpu",
                                        large_eps_check=False)
    correct = [r for r in result.records if r["correct"]]
    assert correct and all(r["gradient_cause"]["full"] == "no-gradient" for r in correct)
    check = _check(result, "zero-gradients")
    assert check["status"] == "flag" and "no usable gradient" in check["message"]
    assert "escalation:square-4x" in check["message"]
    assert any(f.startswith("zero-gradients:") for f in result.flags)
    assert any("escalation:square-4x ran" in note for note in result.notes)
    point = result.curve[0]
    # Square found what the blind APGD (its random start aside) could not; APGD's own figure counts APGD only.
    assert point.broken_by.get("escalation:square-4x", 0) > point.broken_by.get("apgd-ce", 0)
    assert point.standard_robust == len(correct) - point.broken_by.get("apgd-ce", 0)
    assert point.standard_robust > point.robust


# --- 4. SGLD purification -----------------------------------------------------------------------------------
def _official_refined_logits(model, x, steps, seed, sigma=0.03):
    """JEM's refined_logits written from its recipe on the [-1, 1] scale (start noise `sigma`, default 0.03; step
    1, SGLD noise 0.01, 5 chains averaged), with the model's classifier read on [-1, 1] images."""
    torch.manual_seed(seed)

    def f(u):  # the official network: logits of [-1, 1] images
        return model.logits((u + 1) / 2)

    u = x * 2 - 1
    dup = u.view(x.shape[0], 1, *x.shape[1:]).repeat(1, 5, 1, 1, 1).view(x.shape[0] * 5, *x.shape[1:])
    dup = dup + torch.randn_like(dup) * sigma
    for _ in range(steps):
        dup = dup.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(dup).logsumexp(1).sum(), dup)
        dup = dup.detach() + grad + 0.01 * torch.randn_like(dup)
    return f(dup).view(x.shape[0], 5, -1).mean(1).detach()


def test_sgld_forward_matches_the_official_recipe_and_both_gradients_run():
    model = TinyEnergy().eval()
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    with trusted_inputs():
        expected = _official_refined_logits(model, x, steps=4, seed=3)
        plain = model.logits(x).detach()
        for gradient in ("full", "bpda"):
            pipeline = DeployedPipeline(model, parse_defense("sgld:4"), gradient)
            torch.manual_seed(3)
            with torch.no_grad():
                assert torch.allclose(pipeline(x), expected, atol=1e-5)
        assert not torch.allclose(expected, plain, atol=1e-2)  # the chain does move the points
        grads = {}
        for gradient in ("full", "bpda"):
            pipeline = DeployedPipeline(model, parse_defense("sgld:4"), gradient)
            inputs = x.clone().requires_grad_(True)
            torch.manual_seed(3)
            (grads[gradient],) = torch.autograd.grad(pipeline(inputs)[:, 0].sum(), inputs)
            assert bool(torch.isfinite(grads[gradient]).all()) and grads[gradient].abs().sum() > 0
        # BPDA is the identity through the chain: the classifier's gradient at the refined points, summed over chains.
        torch.manual_seed(3)
        copies = x.repeat_interleave(5, 0)
        chain = copies + 0.015 * torch.randn_like(copies)
        for _ in range(4):
            inputs = chain.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model.energy(inputs).sum(), inputs)
            chain = inputs.detach() - 0.25 * g + 0.005 * torch.randn_like(inputs)
        refined = chain.detach().requires_grad_(True)
        (at_refined,) = torch.autograd.grad(model.logits(refined).view(6, 5, -1).mean(1)[:, 0].sum(), refined)
        assert torch.allclose(grads["bpda"], at_refined.view(6, 5, *SHAPE).sum(1), atol=1e-5)
        assert not torch.allclose(grads["full"], grads["bpda"], atol=1e-4)  # full also differentiates the chain


def test_sgld_decision_uses_fresh_draws():
    model = TinyEnergy().eval()
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    pipeline = DeployedPipeline(model, parse_defense("sgld:2"), decision_draws=7)
    assert pipeline.randomized
    rows = []
    real = pipeline._draw
    pipeline._draw = lambda inputs: rows.append(inputs.shape[0]) or real(inputs)
    with trusted_inputs():
        torch.manual_seed(0)
        first = pipeline(x)
        second = pipeline(x)
        assert not torch.allclose(first, second)  # every call draws new noise
        rows.clear()
        pipeline.predict(x)
    assert sum(rows) == 7 * 4  # the decision: 7 fresh draws of every point


def test_sgld_defense_is_attacked_with_eot_both_gradients_and_worst_of_n(tmp_path):
    model = TinyEnergy()
    x = torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(5)) * 0.6 + 0.2
    with torch.no_grad():
        y = model.logits(x).argmax(1)
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", eps=[0.02, 0.1], defense="sgld:2",
                                        device="cpu", decision_draws=9, large_eps_check=False, out=tmp_path / "run")
    assert result.gradient == "auto" and result.eot == 20
    assert {"full", "bpda"} == set(next(r for r in result.records if r["correct"])["gradient_masked"])
    _assert_worst_of_n_at_most_majority(result)
    assert _check(result, "decision-gap")["status"] in ("pass", "flag")
    config = (tmp_path / "run" / "config.json").read_text()
    assert '"decision_draws": 9' in config and '"defense": "sgld:2"' in config


def test_sgld_needs_an_energy_and_a_well_formed_spec():
    model, x, y, _ = linear_problem(n=4)
    with pytest.raises(robusteval.CapabilityError if hasattr(robusteval, "CapabilityError") else Exception,
                       match="energy"):
        robusteval.evaluate_attack(model, (x, y), attack="fgsm", eps=[0.1], defense="sgld:2", device="cpu")
    assert str(parse_defense("sgld:20")) == "sgld:20"
    spec = parse_defense("sgld:3:0.1:0.002:2")
    assert (spec.steps, spec.step_size, spec.noise, spec.chains) == (3, 0.1, 0.002, 2)
    assert str(spec) == "sgld:3:0.1:0.002:2"
    for bad in ("sgld", "sgld:-1", "sgld:2:0.1", "sgld:2:0:0.01:5", "sgld:2:0.1:0.01:0", "sgld:x",
                "sgld:2:0.1:0.01:5:-0.1", "sgld:2:0.1:0.01:5:0:1"):
        with pytest.raises(ValueError, match="sgld"):
            parse_defense(bad)


def test_sgld_start_noise_slot_k0_and_jem_s_l2_recipe():
    """The chains' start noise is a slot (JEM's --sigma: 0.03 on [-1, 1], 0.015 here; its README's L2 command 0);
    K = 0 (JEM's --n_steps_refine default) adds only the start noise; the L2 recipe runs as the official code."""
    model = TinyEnergy().eval()
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    l2_recipe = parse_defense("sgld:1:0.25:0.005:5:0")  # JEM's README L2 command: JEM-1, 5 chains, --sigma 0.0
    assert (l2_recipe.steps, l2_recipe.chains, l2_recipe.start_noise) == (1, 5, 0.0)
    assert str(l2_recipe) == "sgld:1:0.25:0.005:5:0" and str(parse_defense("sgld:4:0.25:0.005:5:0.015")) == "sgld:4"
    only_start = parse_defense("sgld:0:0.25:0.005:1:0.1")
    assert only_start.steps == 0 and only_start.randomized and not only_start.differentiates_through
    assert not parse_defense("sgld:0:0.25:0.005:5:0").randomized  # no noise anywhere: deterministic
    with trusted_inputs():
        expected = _official_refined_logits(model, x, steps=1, seed=3, sigma=0.0)
        torch.manual_seed(3)
        assert torch.allclose(DeployedPipeline(model, l2_recipe, "bpda")(x).detach(), expected, atol=1e-5)
        # K = 0: the logits of x plus the start noise only, nothing else drawn.
        torch.manual_seed(4)
        noisy = x + 0.1 * torch.randn_like(x)
        torch.manual_seed(4)
        with torch.no_grad():
            assert torch.allclose(DeployedPipeline(model, only_start)(x), model.logits(noisy), atol=1e-6)
            plain = DeployedPipeline(model, parse_defense("sgld:0:0.25:0.005:5:0"))(x)
            assert torch.allclose(plain, model.logits(x), atol=1e-6)


# --- 5. worst-of-N ------------------------------------------------------------------------------------------
def _assert_worst_of_n_at_most_majority(result):
    worst = [p.worst_of_n_robust_accuracy for p in result.curve]
    assert worst == sorted(worst, reverse=True)  # an example fooling a draw at a small ε is inside larger balls
    for e, point in enumerate(result.curve):
        assert point.worst_of_n_robust_accuracy is not None
        assert point.worst_of_n_robust_accuracy <= point.robust_accuracy
        for record in result.records:
            outcome = record["results"][e]
            if outcome["broken"]:
                assert outcome["worst_broken"]


@pytest.mark.parametrize("defense", ["noise:0.3", "smooth:0.3:5"])
def test_worst_of_n_is_never_above_the_majority_vote(defense):
    model, x, y, _ = linear_problem(n=40)
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", eps=[0.02, 0.05], defense=defense, eot=4,
                                        device="cpu", decision_draws=15, large_eps_check=False)
    _assert_worst_of_n_at_most_majority(result)
    # Points near the boundary flip on some of 15 draws at σ = 0.3: worst-of-N is strictly lower somewhere.
    assert any(p.worst_of_n_robust_accuracy < p.robust_accuracy for p in result.curve)
    gap = _check(result, "decision-gap")
    assert "worst-of-N" in gap["message"]


# --- 6. large-ε escalation ----------------------------------------------------------------------------------
def test_large_eps_check_escalates_by_doubling_up_to_its_ceiling(digits_constant):
    model, x, y = digits_constant
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", eps=[0.1], device="cpu", masking_checks=False)
    rounds = result.large_eps["escalation"]
    assert [r["scale"] for r in rounds] == [2, 4, 8]
    assert [r["steps"] for r in rounds] == [20, 40, 80]  # PGD's 10 steps doubled per round
    check = _check(result, "large-eps")
    assert check["status"] == "flag" and "ceiling (×8) was reached" in check["message"]


def test_large_eps_escalation_stops_once_the_check_passes():
    model, x, y, _ = linear_problem(n=30)
    result = robusteval.evaluate_attack(model, (x, y), attack="pgd", eps=[0.05], device="cpu")
    assert result.large_eps["robust_accuracy"] == 0 and result.large_eps["escalation"] == []
    assert _check(result, "large-eps")["status"] == "pass"


@pytest.fixture
def digits_constant():
    from attack_fixtures import Constant

    data = robusteval.load_dataset("digits")
    model = robusteval.wrap(Constant(), num_classes=10, input_shape=SHAPE, name="constant")
    return model, data.x[:30], data.y[:30]


# --- resume through a remedy stage, killed with SIGKILL ------------------------------------------------------
_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import robusteval
    from robusteval.attacks import batch
    from attack_fixtures import saturated_linear_problem

    real = batch.saturation_remedies

    def remedies(*args, eps, **kwargs):
        components = real(*args, eps=eps, **kwargs)
        if eps == 0.05:  # the second ε: its partial state holds the first; die inside the remedy stage
            def die(x, y, seed):
                os.kill(os.getpid(), signal.SIGKILL)
            components[0].run = die
        return components

    batch.saturation_remedies = remedies
    model, x, y, _ = saturated_linear_problem(n=40)
    robusteval.evaluate_attack(model, (x, y), out={out!r}, **{kwargs!r})
""")


def test_a_run_killed_inside_a_remedy_stage_resumes_to_the_uninterrupted_result(tmp_path):
    kwargs = dict(attack="apgd-ce", eps=[0.02, 0.05, 0.08], batch_size=40, device="cpu", seed=2,
                  large_eps_check=False)
    model, x, y, _ = saturated_linear_problem(n=40)
    fresh = robusteval.evaluate_attack(model, (x, y), out=tmp_path / "fresh", **kwargs)
    assert any(label.startswith("remedy:") for p in fresh.curve for label in p.broken_by)
    out = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(TESTS), out=str(out), kwargs=kwargs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (out / "partial_batch00000.pt").exists() and not (out / "summary.json").exists()
    resumed = robusteval.evaluate_attack(model, (x, y), out=out, **kwargs)
    assert resumed.summary() | {"seconds": 0} == fresh.summary() | {"seconds": 0}
    strip = lambda records: [{k: v for k, v in r.items() if k != "batch_seconds"} for r in records]  # noqa: E731
    assert strip(resumed.records) == strip(fresh.records)
    assert all(torch.equal(resumed.adversarial[e], fresh.adversarial[e]) for e in kwargs["eps"])


def test_jem_s_test_time_noise_is_the_noise_defense_at_0_015():
    """eval_wrn_ebm.py classifies (x − 0.5)/0.5 + 0.03·n: on the [0, 1] scale x + 0.015·n, the `noise:0.015`
    defense (JEM's logits do not read σ); `--decision-draws 1` makes its decision one draw, as JEM's own."""
    from robusteval.data import dataset_info
    from robusteval.model_zoo.official.jem import OfficialJEM

    torch.manual_seed(0)
    model = OfficialJEM(dataset_info("cifar10"), depth=10, widen_factor=1).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pipeline = DeployedPipeline(model, parse_defense("noise:0.015"), decision_draws=1)
    with torch.no_grad():
        torch.manual_seed(5)
        deployed = pipeline(x)
        torch.manual_seed(5)
        official = model.class_output(model.f((x - 0.5) / 0.5 + 0.03 * torch.randn_like(x)))
        assert torch.allclose(deployed, official, atol=1e-4)
        torch.manual_seed(5)
        assert torch.equal(pipeline.predict(x), deployed.argmax(1))
