"""Defenses users bring (`robusteval.wrap(..., preprocess=fn)`, issue 27): BPDA reaches the exact robust accuracy
of a linear classifier behind bit-depth reduction; without it the zero-gradient flag fires; a randomized
preprocessing is attacked with EOT and judged worst-of-N."""

import pytest
import torch
from attack_fixtures import (
    SHAPE,
    round_to_levels,
    rounded_linear_problem,
    rounded_linear_robust,
)
from torch import nn

import robusteval
from robusteval.core.errors import UsageError

LEVELS = 4
EPS = [0.02, 0.03]


def _bit_depth(x):
    return round_to_levels(x, LEVELS)


def _attack(model, x, y, eps=EPS):
    return robusteval.evaluate_attack(model, (x, y), attack="apgd-ce", eps=eps, device="cpu", large_eps_check=False)


def _check(result, code):
    return next(c for c in result.checks if c["check"] == code)


def test_bpda_through_bit_depth_reduction_reaches_the_exact_robust_accuracy():
    linear, x, y = rounded_linear_problem(n=200, classes=2, levels=LEVELS)
    exact = [int(rounded_linear_robust(linear.weight.data, linear.bias.data, x, y, eps, LEVELS).sum()) for eps in EPS]
    assert 40 < exact[1] < exact[0] < 160  # a problem where the answer is neither trivial nor everything
    model = robusteval.wrap(linear, num_classes=2, input_shape=SHAPE, name="bits", preprocess=_bit_depth,
                            gradient="bpda")
    result = _attack(model, x, y)
    assert result.clean_accuracy == 1.0
    assert [point.robust for point in result.curve] == exact
    assert _check(result, "zero-gradients")["status"] == "pass" and not result.flags


def test_without_bpda_the_rounding_front_end_is_flagged_as_having_no_usable_gradient():
    linear, x, y = rounded_linear_problem(n=20, classes=2, levels=LEVELS)
    model = robusteval.wrap(linear, num_classes=2, input_shape=SHAPE, name="bits", preprocess=_bit_depth)
    result = _attack(model, x, y, eps=[0.2])  # every point breaks there, so the gradient-free stages end early
    check = _check(result, "zero-gradients")
    assert check["status"] == "flag" and "no usable gradient" in check["message"]
    assert any(f.startswith("zero-gradients:") for f in result.flags)


def test_a_preprocessing_autograd_cannot_follow_is_flagged_not_a_crash():
    linear, x, y = rounded_linear_problem(n=20, classes=2, levels=LEVELS)

    def through_numpy(batch):  # what a PIL/JPEG front end looks like to autograd: nothing
        return torch.from_numpy((batch.detach().numpy() * LEVELS).round() / LEVELS)

    model = robusteval.wrap(linear, num_classes=2, input_shape=SHAPE, preprocess=through_numpy)
    result = _attack(model, x, y, eps=[0.2])
    assert _check(result, "zero-gradients")["status"] == "flag"


def test_a_differentiable_stand_in_sends_the_gradient_through_itself():
    linear = nn.Linear(64, 2)
    x = torch.rand(3, *SHAPE, requires_grad=True)
    model = robusteval.wrap(nn.Sequential(nn.Flatten(), linear), num_classes=2, input_shape=SHAPE,
                            preprocess=_bit_depth, gradient=lambda v: 2 * v)
    logits = model(x)
    torch.testing.assert_close(logits, linear(_bit_depth(x).flatten(1)))  # the forward value is the defense's
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), x)
    torch.testing.assert_close(grad, (2 * linear.weight[1]).view(1, *SHAPE).expand(3, *SHAPE))


def test_a_randomized_preprocessing_gets_eot_and_worst_of_n():
    linear, x, y = rounded_linear_problem(n=10, classes=2, levels=LEVELS)

    def jitter(batch):
        return (batch + 0.05 * torch.randn_like(batch)).clamp(0, 1)

    model = robusteval.wrap(linear, num_classes=2, input_shape=SHAPE, preprocess=jitter, gradient="exact",
                            randomized=True)
    result = robusteval.evaluate_attack(model, (x, y), attack="fgsm", eps=[0.03], device="cpu",
                                        large_eps_check=False, decision_draws=20)
    assert result.eot == 20 and _check(result, "randomized-without-eot")["status"] == "pass"
    assert all(r["results"][0]["worst_broken"] is not None for r in result.records if r["correct"])
    assert any(c["check"] == "decision-gap" for c in result.checks)


@pytest.mark.parametrize("keywords, message", [
    (dict(preprocess=_bit_depth, gradient="identity"), "gradient must be"),
    (dict(preprocess=3), "preprocess must be a callable"),
    (dict(gradient="bpda"), "none is given"),
    (dict(preprocess=lambda v: v.flatten(1)), "the input's shape"),
])
def test_bad_preprocessing_arguments_are_one_line_errors(keywords, message):
    with pytest.raises(UsageError, match=message):
        model = robusteval.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), num_classes=2, input_shape=SHAPE,
                                **keywords)
        model(torch.rand(2, *SHAPE))
