"""The conformance suite every model must pass (in the spirit of scikit-learn's check_estimator).

It runs over every name in `robusteval.list_models()` (so a newly registered
model is checked without touching this file) plus a `wrap()`ped plain
module. A model with shipped weights for `digits` is created with
pretrained=True, which also verifies the checkpoint's sha256.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

import robusteval
from robusteval.core.interface import CAPABILITIES, CapabilityError, JointModel

WRAPPED = "wrap(plain-module)"
NAMES = [*robusteval.list_models(), WRAPPED]
BATCH = 4
SIGMA = 0.25
# Per-row noise levels, one of them 0 (a clean row inside a noisy batch).
SIGMAS = (0.0, 0.12, 0.25, 0.5)


@functools.cache
def get_model(name: str) -> JointModel:
    if name == WRAPPED:
        torch.manual_seed(0)
        # A non-square input shape catches H/W mix-ups; 7 classes catch a hard-coded 10.
        module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 5, 7))
        return robusteval.wrap(module.eval(), num_classes=7, input_shape=(3, 6, 5), name="plain")
    pretrained = "digits" in robusteval.model_card(name).checkpoints()
    return robusteval.create_model(name, dataset="digits", pretrained=pretrained, device="cpu")


def is_pretrained(name: str) -> bool:
    return name != WRAPPED and "digits" in robusteval.model_card(name).checkpoints()


@functools.cache
def _images(shape: tuple[int, ...]) -> Tensor:
    if shape == (1, 8, 8):
        return robusteval.load_dataset("digits", split="test").x[:BATCH].clone()
    return torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(0))


def clean_images(model: JointModel) -> Tensor:
    return _images(tuple(model.input_shape)).clone()


def noise(model: JointModel, seed: int = 1) -> Tensor:
    return torch.randn(BATCH, *model.input_shape, generator=torch.Generator().manual_seed(seed))


def seeded(model: JointModel, fn):
    """Call fn() with torch's global RNG fixed when the model's inference draws randomness."""
    if model.stochastic_inference:
        torch.manual_seed(123)
    return fn()


models = pytest.mark.parametrize("name", NAMES)


@models
def test_creation_matches_the_card(name: str) -> None:
    model = get_model(name)
    assert isinstance(model, JointModel)
    assert not model.training, "create_model must return a model in eval mode"
    assert model.capabilities <= CAPABILITIES and "logits" in model.capabilities
    assert model.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    if name != WRAPPED:
        card = robusteval.model_card(name)
        assert model.name == name
        assert model.capabilities == card.capabilities, "the model must declare what its card says"
        assert (model.num_classes, tuple(model.input_shape)) == (10, (1, 8, 8))


@models
def test_logits_shape_dtype_and_finite(name: str) -> None:
    model = get_model(name)
    x = clean_images(model)
    with torch.no_grad():
        for sigma, inputs in ((0.0, x), (SIGMA, x + SIGMA * noise(model))):
            out = seeded(model, lambda: model.logits(inputs, sigma))
            assert out.shape == (BATCH, model.num_classes)
            assert out.is_floating_point()
            assert bool(torch.isfinite(out).all())


@models
def test_eval_mode_is_deterministic(name: str) -> None:
    model = get_model(name)
    x = clean_images(model)
    with torch.no_grad():
        first = seeded(model, lambda: model.logits(x))
        second = seeded(model, lambda: model.logits(x))
    assert torch.equal(first, second)


@models
def test_forward_is_logits_at_sigma_zero(name: str) -> None:
    model = get_model(name)
    x = clean_images(model)
    with torch.no_grad():
        assert torch.equal(seeded(model, lambda: model(x)), seeded(model, lambda: model.logits(x, 0.0)))


@models
def test_rows_are_independent_and_sigma_is_per_row(name: str) -> None:
    """Row i of a batch with a (B,) σ equals that row alone at its own σ (no batch mixing, σ broadcast right)."""
    model = get_model(name)
    if model.stochastic_inference:
        pytest.skip("inference draws randomness; rows cannot be compared call by call")
    sigma = torch.tensor(SIGMAS)
    x = clean_images(model) + sigma.view(-1, 1, 1, 1) * noise(model)
    methods = [m for m in ("logits", "denoise", "energy") if m in model.capabilities]
    with torch.no_grad():
        for method in methods:
            batched = getattr(model, method)(x, sigma)
            for i in range(BATCH):
                alone = getattr(model, method)(x[i : i + 1], float(sigma[i]))
                torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4, msg=f"{method} row {i}")


@models
def test_gradients_reach_the_input(name: str) -> None:
    model = get_model(name)
    weights = torch.randn(BATCH, model.num_classes, generator=torch.Generator().manual_seed(2))
    x = clean_images(model).requires_grad_(True)
    (grad,) = torch.autograd.grad(seeded(model, lambda: (model.logits(x) * weights).sum()), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # Adaptive attacks differentiate through denoising and energies too.
    noisy = (clean_images(model) + SIGMA * noise(model)).requires_grad_(True)
    for method in ("denoise", "energy"):
        if method in model.capabilities:
            (grad,) = torch.autograd.grad(seeded(model, lambda: getattr(model, method)(noisy, SIGMA).sum()), noisy)
            assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, method


@models
@pytest.mark.parametrize("capability", sorted(CAPABILITIES))
def test_capabilities_are_honest(name: str, capability: str) -> None:
    model = get_model(name)
    if capability in model.capabilities:
        CAPABILITY_CHECKS[capability](name, model)
        return
    x = clean_images(model)
    call = {
        "logits": lambda: model.logits(x),
        "denoise": lambda: model.denoise(x, SIGMA),
        "energy": lambda: model.energy(x),
        "sample": lambda: model.sample(2),
    }[capability]
    with pytest.raises(CapabilityError) as error:
        call()
    assert model.name in str(error.value) and capability in str(error.value)


def _check_logits(name: str, model: JointModel) -> None:
    with torch.no_grad():
        assert seeded(model, lambda: model.logits(clean_images(model))).shape == (BATCH, model.num_classes)


def _check_denoise(name: str, model: JointModel) -> None:
    clean = clean_images(model)
    noisy = clean + SIGMA * noise(model)
    sigma = torch.tensor(SIGMAS)
    mixed = clean + sigma.view(-1, 1, 1, 1) * noise(model)
    with torch.no_grad():
        for inputs, level in ((noisy, SIGMA), (mixed, sigma)):
            out = seeded(model, lambda: model.denoise(inputs, level))
            assert out.shape == inputs.shape and out.dtype == inputs.dtype
            assert bool(torch.isfinite(out).all())
        if is_pretrained(name):
            # A trained denoiser must at least bring noisy digits closer to the clean ones.
            estimate = seeded(model, lambda: model.denoise(noisy, SIGMA))
            assert float((estimate - clean).pow(2).mean()) < float((noisy - clean).pow(2).mean())


def _check_energy(name: str, model: JointModel) -> None:
    clean = clean_images(model)
    sigma = torch.tensor(SIGMAS)
    with torch.no_grad():
        for inputs, level in ((clean, 0.0), (clean + SIGMA * noise(model), SIGMA),
                              (clean + sigma.view(-1, 1, 1, 1) * noise(model), sigma)):
            out = seeded(model, lambda: model.energy(inputs, level))
            assert out.shape == (BATCH,) and out.is_floating_point()
            assert bool(torch.isfinite(out).all())


def _check_sample(name: str, model: JointModel) -> None:
    labels = torch.tensor([3, 7])
    first = model.sample(2, y=labels, generator=torch.Generator().manual_seed(0))
    assert first.shape == (2, *model.input_shape)
    assert bool(torch.isfinite(first).all())
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    # The generator drives the draw: the same seed reproduces the samples.
    again = model.sample(2, y=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    unconditional = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert unconditional.shape == (2, *model.input_shape)
    with pytest.raises(ValueError):
        model.sample(2, y=torch.tensor([0, model.num_classes]))
    with pytest.raises(ValueError):
        model.sample(0)


CAPABILITY_CHECKS = {
    "logits": _check_logits,
    "denoise": _check_denoise,
    "energy": _check_energy,
    "sample": _check_sample,
}


@models
def test_input_validation(name: str) -> None:
    model = get_model(name)
    x = clean_images(model)
    c, h, w = model.input_shape
    bad_inputs = {
        "wrong rank": x[0],
        "wrong shape": torch.rand(BATCH, c, h + 1, w),
        "wrong channels": torch.rand(BATCH, c + 1, h, w),
        "integer dtype": (x * 255).to(torch.uint8),
        "NaN": x.clone().index_put_((torch.tensor([1]),), torch.tensor(float("nan"))),
        "inf": x.clone().index_put_((torch.tensor([2]),), torch.tensor(float("inf"))),
        "above 1 at sigma 0": x + 1.5,
        "below 0 at sigma 0": x - 0.5,
    }
    methods = [m for m in ("logits", "denoise", "energy") if m in model.capabilities]
    for method in methods:
        for what, bad in bad_inputs.items():
            # denoise has no σ = 0 default; the range checks apply to the σ = 0 calls only.
            sigma = 0.0 if "sigma 0" in what or method != "denoise" else SIGMA
            with pytest.raises(ValueError):
                getattr(model, method)(bad, sigma)
            if what == "NaN":
                with pytest.raises(ValueError):  # NaN is refused at σ > 0 too
                    getattr(model, method)(bad, SIGMA)
        with pytest.raises(ValueError):
            getattr(model, method)(x, -0.1)
        with pytest.raises(ValueError):
            getattr(model, method)(x, torch.full((BATCH + 1,), SIGMA))


@models
def test_noisy_inputs_may_leave_the_unit_range(name: str) -> None:
    model = get_model(name)
    x = clean_images(model)
    noisy = x + 0.5 * noise(model)
    assert float(noisy.min()) < 0 and float(noisy.max()) > 1
    with torch.no_grad():
        assert seeded(model, lambda: model.logits(noisy, 0.5)).shape == (BATCH, model.num_classes)
        # With a (B,) σ only the σ = 0 rows are range-checked.
        sigma = torch.tensor([0.0, 0.5, 0.5, 0.5])
        mixed = torch.cat([x[:1], noisy[1:]])
        assert seeded(model, lambda: model.logits(mixed, sigma)).shape == (BATCH, model.num_classes)
        with pytest.raises(ValueError):
            model.logits(torch.cat([noisy[:1], x[1:]]), sigma)
