"""The shared SGLD sampler and replay buffer of the energy-based models (jem, gmmc)."""

import pytest
import torch

from robusteval.training.sgld import ReplayBuffer, SGLDConfig, sgld


def quadratic(centre: float, variance: float):
    """E(x) = ‖x − c‖² / (2τ): the Boltzmann density exp(−E) is N(c, τ) per pixel."""
    return lambda x: (x - centre).pow(2).flatten(1).sum(1) / (2 * variance)


def test_noiseless_sgld_is_gradient_descent_with_the_known_contraction():
    # x_k − c = (1 − α/τ)^k (x_0 − c) exactly, for a step α and no noise.
    start = torch.tensor([[[[0.1, 0.9]]], [[[0.3, 0.6]]]])
    alpha, tau, steps = 0.002, 0.01, 7
    out = sgld(quadratic(0.5, tau), start, SGLDConfig(steps=steps, step_size=alpha, noise=0.0))
    expected = 0.5 + (1 - alpha / tau) ** steps * (start - 0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_calibrated_sgld_reaches_the_stationary_variance_of_the_discretised_chain():
    # With noise √(2α), the chain is AR(1) with stationary variance τ / (1 − α/(2τ)).
    alpha, tau = 0.001, 0.01
    generator = torch.Generator().manual_seed(0)
    start = torch.full((4000, 1, 1, 2), 0.5)
    out = sgld(quadratic(0.5, tau), start, SGLDConfig(steps=150, step_size=alpha, noise=(2 * alpha) ** 0.5), generator)
    expected = tau / (1 - alpha / (2 * tau))
    assert float(out.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(out.var()) == pytest.approx(expected, rel=0.05)
    # A wrong sign of the gradient step or of the noise scale would miss this by far.
    assert abs(float(out.var()) - tau) < abs(float(out.var()) - 2 * tau)


def test_sgld_keeps_images_in_range_is_reproducible_and_works_under_no_grad():
    energy = quadratic(1.5, 0.01)  # pulls every pixel past the upper bound
    start = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    config = SGLDConfig(steps=30, step_size=0.01, noise=0.05)
    with torch.no_grad():
        a = sgld(energy, start, config, torch.Generator().manual_seed(2))
    b = sgld(energy, start, config, torch.Generator().manual_seed(2))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.mean()) > 0.9
    torch.testing.assert_close(a, b)
    assert not a.requires_grad


def test_sgld_leaves_parameter_gradients_alone():
    layer = torch.nn.Linear(4, 1)
    sgld(lambda x: layer(x.flatten(1)).squeeze(1), torch.rand(3, 1, 2, 2), SGLDConfig(steps=3))
    assert layer.weight.grad is None


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"step_size": 0.0}, {"noise": -0.1}])
def test_sgld_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SGLDConfig(**kwargs)


def test_class_conditional_buffer_draws_slots_of_the_asked_classes():
    buffer = ReplayBuffer(100, (1, 2, 2), torch.Generator().manual_seed(0), reinit=0.0, num_classes=10)
    y = torch.tensor([3, 3, 7, 0, 9])
    index, start = buffer.draw(5, y)
    assert torch.equal(index % 10, y)
    torch.testing.assert_close(start, buffer.images[index])


def test_buffer_store_persists_chains_and_reinit_restarts_the_chosen_fraction():
    buffer = ReplayBuffer(50, (1, 2, 2), torch.Generator().manual_seed(0), reinit=0.0)
    buffer.store(torch.arange(50), torch.full((50, 1, 2, 2), 2.0))  # values noise can never produce
    _, start = buffer.draw(200)
    assert bool((start == 2.0).all())

    buffer.reinit = 0.25
    _, start = buffer.draw(4000)
    fresh = (start != 2.0).flatten(1).all(1).float().mean()
    assert float(fresh) == pytest.approx(0.25, abs=0.03)


def test_buffer_rejects_bad_settings():
    generator = torch.Generator()
    with pytest.raises(ValueError):
        ReplayBuffer(105, (1, 2, 2), generator, num_classes=10)
    with pytest.raises(ValueError):
        ReplayBuffer(10, (1, 2, 2), generator, reinit=1.5)
    with pytest.raises(ValueError):
        ReplayBuffer(10, (1, 2, 2), generator).draw(3, torch.tensor([0, 1, 2]))
