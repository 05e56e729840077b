"""Invariants of the attack engine: monotonicity in ε, constant models, ε = 0, verification, flags, run files."""

from __future__ import annotations

import json

import pytest
import torch
from attack_fixtures import SHAPE, Constant, clopper_pearson, linear_problem

import robusteval
from robusteval.attacks import batch, resume, verification
from robusteval.attacks.catalog import AttackComponent, BuiltAttack
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.core.interface import CapabilityError
from robusteval.core.names import UnknownNameError
from robusteval.core.vocabulary import parse_defense

REQUIRED_SUMMARY_KEYS = {"kind", "model", "dataset", "n", "attack", "norm", "defense", "clean_accuracy", "curve",
                         "flags", "seconds"}


def _codes(result, status="flag"):
    return {c["check"] for c in result.checks if c["status"] == status}


@pytest.fixture(scope="module")
def standard():
    return robusteval.create_model("standard", device="cpu")


@pytest.fixture(scope="module")
def digits():
    return robusteval.load_dataset("digits")


def test_curve_is_monotone_and_every_adversarial_example_checks_out(standard, digits, tmp_path):
    eps = [0.1, 0.0, 0.2, 0.05]  # unsorted on purpose, with ε = 0
    result = robusteval.evaluate_attack(standard, digits, attack="pgd", eps=eps, n=60, batch_size=25, device="cpu",
                                        out=tmp_path / "run", large_eps_check=False)
    assert result.eps == sorted(eps)
    accuracies = [p.robust_accuracy for p in result.curve]
    assert accuracies == sorted(accuracies, reverse=True)
    assert result.curve[0].robust_accuracy == result.clean_accuracy  # ε = 0 changes nothing
    assert 0 < result.curve[-1].robust_accuracy < result.clean_accuracy  # and the attack does break points
    x, y = digits.x[:60], digits.y[:60]
    for record in result.records:
        broken = [r["broken"] for r in record["results"]]
        assert broken == sorted(broken), record  # once broken, broken at every larger ε
        assert not any(broken) or record["correct"]
    for point in result.curve:
        saved = torch.load(tmp_path / "run" / resume.adversarial_file_name(point.eps), weights_only=True)
        assert saved.shape == x.shape
        assert torch.equal(saved, result.adversarial[point.eps])
        broken = torch.tensor([r["results"][result.eps.index(point.eps)]["broken"] for r in result.records])
        assert torch.equal(saved[~broken], x[~broken])  # the clean image where not broken
        delta = (saved - x).flatten(1).abs().amax(1)
        assert bool((delta[broken] <= point.eps + 1e-6).all()) and saved.min() >= 0 and saved.max() <= 1
        with torch.no_grad():
            assert bool((standard(saved[broken]).argmax(1) != y[broken]).all())
        assert point.robust == int(len(y) * point.robust_accuracy + 0.5)
        assert (point.ci_low, point.ci_high) == pytest.approx(clopper_pearson(point.robust, len(y)), abs=1e-9)


def test_run_directory_holds_config_records_summary_and_resumes_a_finished_run(standard, digits, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "run"
    first = robusteval.evaluate_attack(standard, digits, attack="fgsm", eps=[0.1, 0.2], n=30, batch_size=10,
                                       device="cpu", out=out, large_eps_check=False)
    summary = json.loads((out / "summary.json").read_text())
    assert REQUIRED_SUMMARY_KEYS <= set(summary)
    assert summary == first.summary() and summary["kind"] == "attack" and summary["n"] == 30
    assert {"eps", "robust_accuracy", "ci_low", "ci_high", "broken_by"} <= set(summary["curve"][0])
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "attack" and config["eps"] == [0.1, 0.2] and "provenance" in config
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(30))
    assert {"index", "label", "clean_prediction", "results"} <= set(records[0])
    assert {"eps", "broken", "attack", "prediction", "perturbation_norm"} <= set(records[0]["results"][0])
    assert not list(out.glob("shard_*"))
    calls = []
    real_logits = standard.logits
    monkeypatch.setattr(standard, "logits", lambda x, sigma=0.0: calls.append(len(x)) or real_logits(x, sigma))
    again = robusteval.evaluate_attack(standard, digits, attack="fgsm", eps=[0.1, 0.2], n=30, batch_size=10,
                                       device="cpu", out=out, large_eps_check=False)
    assert calls == []  # a finished run is read back, not recomputed
    assert again.summary() == first.summary()
    assert all(torch.equal(again.adversarial[e], first.adversarial[e]) for e in first.eps)


class _Killed(Exception):
    pass


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "batch_seconds"} for r in records]


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_batch_killed_between_eps_resumes_from_its_last_finished_eps(monkeypatch, standard, digits, tmp_path,
                                                                         corrupt):
    eps = [0.05, 0.1, 0.15]
    kwargs = dict(attack="pgd", eps=eps, n=30, batch_size=30, device="cpu", seed=4, large_eps_check=False)
    fresh = robusteval.evaluate_attack(standard, digits, out=tmp_path / "fresh", **kwargs)
    real_build = batch.build_attack
    built_at: list[float] = []

    def build(spec, attacked, expected, *, eps, **options):
        built_at.append(eps)
        if eps == 0.15 and kill:
            raise _Killed
        return real_build(spec, attacked, expected, eps=eps, **options)

    monkeypatch.setattr(batch, "build_attack", build)
    out = tmp_path / "killed"
    kill = True
    with pytest.raises(_Killed):
        robusteval.evaluate_attack(standard, digits, out=out, **kwargs)
    partial = out / "partial_batch00000.pt"
    assert partial.exists() and not (out / "samples.jsonl").exists()
    if corrupt:
        partial.write_bytes(b"not a torch file")
    kill = False
    built_at.clear()
    resumed = robusteval.evaluate_attack(standard, digits, out=out, **kwargs)
    # build_attack runs once up front (skipped members), then once per ε attacked in this call.
    assert built_at[1:] == (eps if corrupt else [0.15])
    assert resumed.summary() | {"seconds": 0} == fresh.summary() | {"seconds": 0}
    assert _without_seconds(resumed.records) == _without_seconds(fresh.records)
    assert all(torch.equal(resumed.adversarial[e], fresh.adversarial[e]) for e in eps)
    assert not partial.exists()


def test_constant_model_keeps_its_clean_accuracy_and_is_flagged(digits):
    model = robusteval.wrap(Constant(), num_classes=10, input_shape=SHAPE, name="constant")
    result = robusteval.evaluate_attack(model, digits, attack="autoattack", eps=[0.1], n=40, device="cpu",
                                        large_eps_check=False)
    assert result.clean_accuracy == pytest.approx(float((digits.y[:40] == 3).float().mean()))
    assert result.clean_accuracy > 0
    assert result.curve[0].robust_accuracy == result.clean_accuracy
    assert result.curve[0].broken_by == {}
    assert "zero-gradients" in _codes(result)
    assert any(f.startswith("zero-gradients:") for f in result.flags)
    # No usable gradient (the margin's is zero too): the flag stays, and Square's escalation ran and found nothing.
    assert "escalation:square-4x" in next(c["message"] for c in result.checks if c["check"] == "zero-gradients")
    assert any("escalation:square-4x ran" in note for note in result.notes)
    # Nothing breaks even at ε = 0.5, where a sound attack breaks nearly everything, nor after the escalation.
    large = robusteval.evaluate_attack(model, digits, attack="pgd", eps=[0.1], n=20, device="cpu")
    assert large.large_eps["robust_accuracy"] == large.clean_accuracy
    assert [r["scale"] for r in large.large_eps["escalation"]] == [2, 4, 8]
    assert {"zero-gradients", "large-eps"} <= _codes(large)


def test_masking_checks_off_skip_the_model_checks_but_not_the_results(standard, digits):
    common = dict(attack="fgsm", eps=[0.05, 0.1], n=30, device="cpu", seed=1, large_eps_check=False)
    on = robusteval.evaluate_attack(standard, digits, **common)
    off = robusteval.evaluate_attack(standard, digits, masking_checks=False, **common)
    assert [p.robust_accuracy for p in off.curve] == [p.robust_accuracy for p in on.curve]
    assert off.clean_accuracy == on.clean_accuracy
    assert {"softmax-output", "dynamic-forward", "zero-gradients"} <= _codes(off, "n/a")
    assert {"softmax-output", "dynamic-forward", "zero-gradients"} <= _codes(on, "pass")
    assert all(r["gradient_masked"] is None for r in off.records)
    # The constant model's zero gradients go unseen with the checks off...
    constant = robusteval.wrap(Constant(), num_classes=10, input_shape=SHAPE, name="constant")
    assert "zero-gradients" not in _codes(robusteval.evaluate_attack(constant, digits, masking_checks=False, **common))
    # ...but a randomized defense attacked without EOT is still flagged: that needs no model call.
    noisy = robusteval.evaluate_attack(robusteval.create_model("gaussian", device="cpu"), digits, attack="pgd",
                                       eps=[0.1], n=12, device="cpu", defense="noise:0.25", eot=1,
                                       large_eps_check=False, masking_checks=False)
    assert "randomized-without-eot" in _codes(noisy)


def test_eps_zero_leaves_accuracy_unchanged_under_apgd(standard, digits):
    result = robusteval.evaluate_attack(standard, digits, attack="apgd-ce", eps=[0.0], n=30, device="cpu",
                                        large_eps_check=False)
    assert result.curve[0].robust_accuracy == result.clean_accuracy
    assert result.curve[0].broken_by == {}


def test_verification_rejects_out_of_ball_out_of_box_and_correct_examples():
    model, x, y, _ = linear_problem(n=6)
    pipeline = DeployedPipeline(model, parse_defense("none"))
    w = model.module.w.detach()
    # Far across the boundary: misclassified, but 0.3 away in L∞.
    flip = torch.where(y == 1, -1.0, 1.0).view(-1, 1)
    far = (x.flatten(1) + 0.3 * flip * w.sign()).view_as(x)
    check = verification.verify_adversarial(pipeline, x, far.clamp(0, 1), y, "Linf", 0.1)
    assert bool(check.misclassified.all()) and not bool(check.in_ball.any()) and not bool(check.valid.any())
    inside = verification.verify_adversarial(pipeline, x, far.clamp(0, 1), y, "Linf", 0.3 + 1e-7)
    assert bool(inside.valid.all())
    outside_box = x.clone()
    outside_box[:, 0, 0, 0] = 1.05
    assert not bool(verification.verify_adversarial(pipeline, x, outside_box, y, "Linf", 1.0).in_box.any())
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not bool(verification.verify_adversarial(pipeline, x, nan, y, "L2", 1.0).valid[0])
    assert not bool(verification.verify_adversarial(pipeline, x, x.clone(), y, "L2", 1.0).valid.any())



def test_l1_verification_rejects_an_example_outside_the_l1_ball():
    model, x, y, _ = linear_problem(n=6)
    pipeline = DeployedPipeline(model, parse_defense("none"))
    flip = torch.where(y == 1, -1.0, 1.0).view(-1, 1)
    far = (x.flatten(1) + 0.3 * flip * model.module.w.detach().sign()).view_as(x).clamp(0, 1)
    l1 = (far - x).flatten(1).abs().sum(1).double()
    l2 = (far - x).flatten(1).norm(dim=1).double()
    assert float(l2.max()) < 5.0 < float(l1.min())  # inside the L2 ball of 5, outside the L1 ball of 5
    check = verification.verify_adversarial(pipeline, x, far, y, "L1", 5.0)
    assert torch.allclose(check.norms, l1)
    assert bool(check.misclassified.all()) and not bool(check.in_ball.any()) and not bool(check.valid.any())
    tolerance = verification.ball_tolerance("L1", 64)
    assert tolerance == pytest.approx(1e-6 + 64 * 2**-24)
    assert bool(verification.verify_adversarial(pipeline, x, far, y, "L1", float(l1.max())).valid.all())
    below = float(l1.min()) - 2 * tolerance
    assert not bool(verification.verify_adversarial(pipeline, x, far, y, "L1", below).in_ball.any())
    # Projecting onto the L1 ball lands on its sphere and stays in the box.
    projected = verification.project_to_ball(x, far, "L1", 5.0)
    assert torch.allclose(verification.perturbation_norm(projected - x, "L1"), torch.full((6,), 5.0).double())
    assert projected.min() >= 0 and projected.max() <= 1
    with pytest.raises(ValueError, match="unknown norm"):
        verification.perturbation_norm(far - x, "L3")

def test_engine_never_counts_an_out_of_ball_example(monkeypatch, standard, digits):
    calls = []

    def cheating(spec, attacked, expected, *, norm, eps, **kwargs):
        def run(x, y, seed):
            calls.append(len(y))
            return torch.full_like(x, 0.5)  # mid-grey: misclassified often, but far outside a small ball
        return BuiltAttack([AttackComponent("cheat", run)], [])

    monkeypatch.setattr(batch, "build_attack", cheating)
    result = robusteval.evaluate_attack(standard, digits, attack="pgd", eps=[0.05], n=20, device="cpu",
                                        large_eps_check=False)
    assert calls and result.curve[0].robust_accuracy == result.clean_accuracy
    assert result.curve[0].rejected > 0
    assert all(not r["results"][0]["broken"] for r in result.records)


def test_noise_defense_without_eot_is_flagged_and_with_eot_is_not(digits):
    model = robusteval.create_model("gaussian", device="cpu")
    common = dict(attack="pgd", eps=[0.1], n=12, device="cpu", defense="noise:0.25", large_eps_check=False)
    without = robusteval.evaluate_attack(model, digits, eot=1, **common)
    assert "randomized-without-eot" in _codes(without)
    assert any(f.startswith("randomized-without-eot:") for f in without.flags)
    with_eot = robusteval.evaluate_attack(model, digits, **common)
    assert with_eot.eot == 20
    assert "randomized-without-eot" in _codes(with_eot, "pass")
    assert "randomized-without-eot" not in _codes(with_eot)
    deterministic = robusteval.evaluate_attack(model, digits, attack="fgsm", eps=[0.1], n=12, device="cpu",
                                               large_eps_check=False)
    assert "randomized-without-eot" in _codes(deterministic, "n/a")


class _Band(torch.nn.Module):
    """Class 1 exactly where the signed L2 distance m to the linear problem's hyperplane has |m| < width.

    Under N(0, σ²I) noise m moves by N(0, σ²), so at m = 0 a single noisy draw says class 1 with probability
    P(|Z| < width/σ): for width/σ = 0.4 that is 0.31, and the majority of 100 draws is class 0 (the noiseless
    decision is class 1).
    """

    def __init__(self, unit: torch.Tensor, width: float):
        super().__init__()
        self.register_buffer("unit", unit)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x.flatten(1) - 0.5) @ self.unit
        inside = self.width - m.abs()
        return torch.stack([-inside, inside], dim=1)


class _CountingRows(torch.nn.Module):
    """Counts the images that pass through a module's forward (noise draws are stacked into the batch)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.module(x)


def test_randomized_decision_is_the_majority_of_fresh_draws():
    from scipy.stats import norm as gaussian

    from robusteval.attacks.defenses import DECISION_DRAWS

    model, x, y, signed = linear_problem(n=400)
    sigma = 0.1
    # Points whose single noisy draw is right with probability Φ(|d|/σ) between 0.6 and 0.75: they do flip.
    near = (signed.abs() > 0.3 * sigma) & (signed.abs() < 0.6 * sigma)
    assert int(near.sum()) >= 10
    xs, ys = x[near], y[near]
    one_draw = gaussian.cdf(signed[near].abs().double().numpy() / sigma)
    # A majority of 100 independent draws is right with probability P(Bin(100, p) > 50) > 0.97 for p >= 0.6.
    pipeline = DeployedPipeline(model, parse_defense(f"noise:{sigma}"))
    torch.manual_seed(0)
    repeats = 20
    majority_right = sum(float((pipeline.predict(xs) == ys).float().mean()) for _ in range(repeats)) / repeats
    with torch.no_grad():
        single_right = sum(float((pipeline(xs).argmax(1) == ys).float().mean()) for _ in range(repeats)) / repeats
    # The single draws really do flip (their rate is Φ(|d|/σ), ~0.68 here) and the decision does not.
    assert abs(single_right - one_draw.mean()) < 0.05
    assert single_right < 0.8 and majority_right > 0.95
    smooth = DeployedPipeline(model, parse_defense(f"smooth:{sigma}:7"))
    assert float((smooth.predict(xs) == ys).float().mean()) > 0.95  # 7 votes would give ~0.8: max(K, 100) vote

    # A decision without noise differs from the majority: in the band's middle the noiseless class is 1,
    # the smoothed (majority) class is 0 with probability 1 − P(Bin(100, 0.31) >= 50) > 0.999.
    unit = model.module.w.detach() / model.module.w.detach().norm()
    middle = (x[:20].flatten(1) - signed[:20].unsqueeze(1) * unit).view(20, *SHAPE)  # moved onto the hyperplane
    band = _CountingRows(_Band(unit, 0.4 * sigma))
    banded = robusteval.wrap(band, num_classes=2, input_shape=SHAPE, name="band")
    assert bool((banded(middle).argmax(1) == 1).all())
    band_pipeline = DeployedPipeline(banded, parse_defense(f"noise:{sigma}"))
    band.rows = 0
    assert bool((band_pipeline.predict(middle) == 0).all())
    assert band.rows == DECISION_DRAWS * len(middle)  # every decision counts exactly 100 draws per point
    band.rows = 0
    DeployedPipeline(banded, parse_defense(f"smooth:{sigma}:250")).predict(middle)
    assert band.rows == 250 * len(middle)  # smooth:S:K votes with max(K, 100) draws
    # End to end: the engine's clean accuracy is that of the majority decision, not of one draw or none.
    labels = torch.zeros(len(middle), dtype=torch.long)
    result = robusteval.evaluate_attack(banded, (middle, labels), attack="fgsm", eps=[0.0], defense=f"noise:{sigma}",
                                        device="cpu", large_eps_check=False, masking_checks=False)
    assert result.clean_accuracy == 1.0

    soft = smooth.expected(x[:3], 50)
    assert torch.allclose(soft.exp().sum(1), torch.ones(3), atol=1e-5)  # log of a mean of probabilities


def test_bad_requests_are_clear_errors(standard, digits):
    with pytest.raises(UnknownNameError, match="Did you mean: pgd"):
        robusteval.evaluate_attack(standard, digits, attack="pdg", eps=[0.1], n=5, device="cpu")
    with pytest.raises(ValueError, match="supports the norm"):
        robusteval.evaluate_attack(standard, digits, attack="pgd", norm="L2", eps=[0.1], n=5, device="cpu")
    with pytest.raises(ValueError, match="applies to denoise, purify and sgld defenses only"):
        robusteval.evaluate_attack(standard, digits, attack="pgd", gradient="bpda", eps=[0.1], n=5, device="cpu")
    with pytest.raises(CapabilityError, match="denoise"):
        robusteval.evaluate_attack(standard, digits, attack="pgd", defense="denoise:0.1", eps=[0.1], n=5,
                                   device="cpu")
    with pytest.raises(ValueError, match="eps"):
        robusteval.evaluate_attack(standard, digits, attack="pgd", eps=[-0.1], n=5, device="cpu")
    with pytest.raises(ValueError, match="n must be"):
        robusteval.evaluate_attack(standard, digits, attack="pgd", eps=[0.1], n=10_000, device="cpu")
    for text in ("noise", "noise:-1", "smooth:0.25", "smooth:0.25:0", "denoise:0.1:x", "none:1"):
        with pytest.raises(ValueError):
            parse_defense(text)
    with pytest.raises(UnknownNameError, match="Did you mean: smooth"):
        parse_defense("smoth:0.25:10")


def test_square_and_black_box_checks_fire_on_constructed_sequences():
    from robusteval.attacks import sanity

    honest = {"eps=0.1": {"clean": 0.98, "apgd-ce": 0.60, "apgd-t": 0.58, "fab-t": 0.58, "square": 0.58}}
    masked = {"eps=0.1": {"clean": 0.98, "apgd-ce": 0.90, "apgd-t": 0.90, "fab-t": 0.90, "square": 0.40}}
    assert sanity.square_check(honest).status == "pass"
    flagged = sanity.square_check(masked)
    assert flagged.status == "flag" and "eps=0.1" in flagged.message
    black, white = {"square"}, {"apgd-ce", "apgd-t", "fab-t"}
    assert sanity.black_box_check({0.1: {"apgd-ce": 30, "square": 2}}, black, white).status == "pass"
    assert sanity.black_box_check({0.1: {"apgd-ce": 3, "square": 20}}, black, white).status == "flag"
    assert sanity.black_box_check({0.1: {"pgd": 3}}, set(), {"pgd"}).status == "n/a"
    assert sanity.zero_gradient_check(6, 100, "full").status == "flag"
    assert sanity.zero_gradient_check(5, 100, "full").status == "pass"
    assert sanity.large_eps_check(3, 100, 0.5, "Linf").status == "flag"
    assert sanity.large_eps_check(2, 100, 0.5, "Linf").status == "pass"


class _ModeSpy(torch.nn.Module):
    """A classifier that counts the calls it receives in training mode (BatchNorm/dropout would change)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.calls_in_training = 0

    def forward(self, x):
        self.calls_in_training += int(self.training)
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("defense", ["none", "noise:0.1"])
def test_attacks_keep_the_model_in_eval_mode_throughout(digits, defense):
    # torchattacks restores the mode it finds on the attacked module; a pipeline built in training mode
    # used to switch the model to training after the first attack (BatchNorm and dropout then misbehave).
    spy = _ModeSpy().eval()
    model = robusteval.wrap(spy, 10, (1, 8, 8))
    robusteval.evaluate_attack(model, digits, attack="pgd", eps=[0.05], n=8, steps=2, defense=defense, eot=2,
                               device="cpu", large_eps_check=False)
    assert spy.calls_in_training == 0 and not spy.training


def test_l1_names_budgets_and_refusals():
    from robusteval.attacks.catalog import check_norm, resolve_attack, resolve_norm
    from robusteval.attacks.sanity import large_eps
    from robusteval.core.errors import UsageError
    from robusteval.core.preflight import check_eps_budget
    from robusteval.data import dataset_budgets, default_eps

    assert resolve_norm("l1") == resolve_norm("1") == "L1"
    # CIFAR-10 at Croce & Hein's (2021) L1 budget 12; the digits' grid scaled to 64 pixels.
    assert default_eps("cifar10", "L1") == (3.0, 6.0, 12.0) and dataset_budgets("cifar10").headline_eps["L1"] == 12
    assert default_eps("digits", "L1") == (0.5, 1.0, 2.0, 4.0, 8.0)
    assert resolve_attack("autoattack").norms == ("Linf", "L2", "L1")
    with pytest.raises(UsageError, match="supports the norm"):
        check_norm(resolve_attack("apgd-ce"), "L1")  # torchattacks' APGD has no L1 projection
    check_eps_budget("L1", [64.0], (1, 8, 8))  # any two 8×8 images differ by at most 64 in L1
    with pytest.raises(UsageError, match=r"exceeds 64 \(the L1 diameter"):
        check_eps_budget("L1", [65.0], (1, 8, 8))
    assert large_eps("L1", (1, 8, 8)) == 32.0  # the mid-grey image is within 0.5·d of any image


def test_l1_remedies_and_escalation_are_autoattack_s_l1_attacks_and_stay_in_the_ball():
    """torchattacks has no L1 attacks: under L1 the engine's adaptive stages run pyautoattack's L1 APGD and
    Square, whose examples stay in the L1 ball and [0, 1] and break points closer than ε."""
    from attack_fixtures import multiclass_problem

    from robusteval.attacks.remedies import (
        gradient_free_escalation,
        saturation_remedies,
    )

    model, x, y, distance = multiclass_problem(n=12)
    eps = float(distance["L1"].quantile(0.5))
    stages = saturation_remedies(model, norm="L1", eps=eps, num_classes=10, device=torch.device("cpu"), eot=1,
                                 steps=20)
    stages += gradient_free_escalation(model, norm="L1", eps=eps, device=torch.device("cpu"), queries=200)
    assert [s.name for s in stages] == ["remedy:apgd-dlr", "remedy:apgd-t", "remedy:apgd-ce-rescaled",
                                        "escalation:square-4x"]
    for stage in stages:
        adv = stage.run(x, y, 0)
        norms = verification.perturbation_norm(adv - x, "L1")
        assert bool((norms <= eps + verification.ball_tolerance("L1", 64)).all()), stage.name
        assert adv.min() >= 0 and adv.max() <= 1
        fooled = model(adv).argmax(1) != y
        assert bool((distance["L1"][fooled] <= eps + 1e-4).all())  # nothing farther than ε is broken
        if stage.name != "escalation:square-4x":
            assert int(fooled.sum()) >= 1, stage.name
