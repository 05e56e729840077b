"""The engine's gradient-free stages when the zero-gradient check finds no usable gradient (issue 27, item 6):
on a linear classifier behind a rounding front end that the engine cannot see into, the reported robust
accuracy comes within 3 points of the exact value, and the flag stays, naming the cause and what ran."""

import pytest
import torch
from attack_fixtures import (
    SHAPE,
    Rounded,
    rounded_linear_problem,
    rounded_linear_robust,
)

import robusteval
from robusteval.attacks.remedies import VertexSearch

LEVELS = 8
EPS = [0.02, 0.04]


@pytest.mark.parametrize("classes", [2, pytest.param(10, marks=pytest.mark.slow)])
def test_an_opaque_rounding_front_end_is_attacked_to_within_3_points_of_the_exact_robust_accuracy(classes):
    linear, x, y = rounded_linear_problem(n=100, classes=classes, levels=LEVELS, seed=1)
    exact = [int(rounded_linear_robust(linear.weight.data, linear.bias.data, x, y, e, LEVELS).sum()) for e in EPS]
    assert exact[0] - exact[1] > 20  # the budget matters: a search that stands still would be far off
    # One opaque module: the engine sees only a zero gradient. Square with a small budget leaves most of the work.
    opaque = robusteval.wrap(Rounded(linear, LEVELS), num_classes=classes, input_shape=SHAPE, name="opaque")
    result = robusteval.evaluate_attack(opaque, (x, y), attack="square", steps=100, eps=EPS, device="cpu",
                                        large_eps_check=False)
    for point, truth in zip(result.curve, exact):
        assert point.robust >= truth  # never an unsound break
        assert point.robust <= truth + 3, (point.eps, point.robust, truth)  # 3 points of 100
    check = next(c for c in result.checks if c["check"] == "zero-gradients")
    assert check["status"] == "flag" and "no usable gradient" in check["message"]
    assert "escalation:square-4x, escalation:vertex-search" in check["message"]
    assert any("escalation:vertex-search ran" in note for note in result.notes)


def test_one_sweep_of_the_vertex_search_is_exact_on_a_separable_margin():
    """Alone, on every point (no Square first): it breaks exactly the points that are not robust."""
    linear, x, y = rounded_linear_problem(n=200, classes=10, levels=LEVELS, seed=2)
    model = Rounded(linear, LEVELS)
    found = VertexSearch(model, 0.03)(x, y, seed=0)
    assert float((found - x).abs().max()) <= 0.03 + 1e-7 and float(found.min()) >= 0 and float(found.max()) <= 1
    broken = model(found).argmax(1) != y
    assert torch.equal(broken, ~rounded_linear_robust(linear.weight.data, linear.bias.data, x, y, 0.03, LEVELS))


def test_the_vertex_search_draws_only_from_its_seed():
    linear, x, y = rounded_linear_problem(n=50, classes=10, levels=LEVELS, seed=3)
    search = VertexSearch(Rounded(linear, LEVELS), 0.02)
    torch.manual_seed(123)
    first = search(x, y, seed=7)
    torch.manual_seed(456)
    assert torch.equal(first, search(x, y, seed=7))


def test_on_a_randomized_pipeline_the_vertex_search_draws_its_noise_from_its_seed():
    """Resume stays exact: the pipeline's noise inside the stage depends on the stage's seed only."""
    linear, x, y = rounded_linear_problem(n=30, classes=10, levels=LEVELS, seed=4)

    def noisy(batch):
        return Rounded(linear, LEVELS)(batch + 0.02 * torch.randn_like(batch))

    search = VertexSearch(noisy, 0.03)
    torch.manual_seed(1)
    first = search(x, y, seed=5)
    torch.manual_seed(2)
    assert torch.equal(first, search(x, y, seed=5))
