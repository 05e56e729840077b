"""The JointModel contract: wrap(), σ handling, validation, trusted_inputs, CapabilityError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import robusteval
from robusteval.core.interface import (
    RANGE_TOLERANCE,
    CapabilityError,
    JointModel,
    as_sigma,
    trusted_inputs,
    validate_images,
)


class Recorder(JointModel):
    """A model with every capability whose outputs are simple known functions; it records the σ it gets."""

    capabilities = frozenset({"logits", "denoise", "energy", "sample"})

    def __init__(self) -> None:
        super().__init__()
        self.name = "recorder"
        self.num_classes = 3
        self.input_shape = (1, 2, 2)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[Tensor] = []

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.seen.append(sigma)
        mean = x.flatten(1).mean(1)
        return self.scale * torch.stack([mean, -mean, sigma], dim=1)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.seen.append(sigma)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.seen.append(sigma)
        return 0.5 * x.flatten(1).pow(2).sum(1) / (1 + sigma**2)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return torch.rand(n, *self.input_shape, generator=generator)


@pytest.fixture
def model() -> Recorder:
    return Recorder()


def images(batch: int = 4) -> Tensor:
    return torch.rand(batch, 1, 2, 2, generator=torch.Generator().manual_seed(0))


# --- wrap() -----------------------------------------------------------------------------------
def test_wrap_turns_a_plain_classifier_into_a_joint_model() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    model = robusteval.wrap(module, num_classes=5, input_shape=(3, 2, 2))
    x = torch.rand(6, 3, 2, 2)
    assert isinstance(model, JointModel)
    assert model.capabilities == frozenset({"logits"})
    assert (model.num_classes, model.input_shape, model.name) == (5, (3, 2, 2), "wrapped")
    assert not model.training  # it keeps the module's mode
    with torch.no_grad():
        assert torch.equal(model.logits(x), module(x))
        assert torch.equal(model(x), module(x))
        # σ is not an input of a plain classifier: it sees the noisy image only.
        assert torch.equal(model.logits(x + 0.3, 0.3), module(x + 0.3))
    assert set(model.state_dict()) == {f"module.{k}" for k in module.state_dict()}
    with pytest.raises(CapabilityError, match="'mine' does not have the capability 'denoise'"):
        robusteval.wrap(module, 5, (3, 2, 2), name="mine").denoise(x, 0.1)
    assert robusteval.wrap(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).train(), 5, (3, 2, 2)).training


def test_wrap_rejects_bad_arguments() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        robusteval.wrap(lambda x: x, 3, (1, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        robusteval.wrap(module, 1, (1, 2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        robusteval.wrap(module, 3, (2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        robusteval.wrap(module, 3, (1, 0, 2))
    # A module whose output is not (B, num_classes) is caught on the first call.
    wrong = robusteval.wrap(module, 4, (1, 2, 2))
    with pytest.raises(ValueError, match=r"logits of shape \(B, 4\), got \(2, 3\)"):
        wrong(images(2))


# --- σ ------------------------------------------------------------------------------------------
def test_as_sigma_accepts_floats_scalars_and_per_row_tensors() -> None:
    x = images(4).double()
    s = as_sigma(0.25, x)
    assert s.shape == (4,) and s.dtype == torch.float64 and bool((s == 0.25).all())
    assert torch.equal(as_sigma(torch.tensor(0.5), x), torch.full((4,), 0.5, dtype=torch.float64))
    per_row = torch.tensor([0.0, 0.1, 0.2, 0.3])
    assert torch.equal(as_sigma(per_row, x), per_row.double())
    assert torch.equal(as_sigma(1, x), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(5), torch.zeros(4, 1), torch.zeros(2, 2)])
def test_as_sigma_rejects_wrong_shapes(bad: Tensor) -> None:
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        as_sigma(bad, images(4))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), torch.tensor([0.1, -0.2, 0.3, 0.4])])
def test_as_sigma_rejects_negative_and_non_finite(bad: float | Tensor) -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        as_sigma(bad, images(4))


def test_subclasses_receive_sigma_as_a_batch_tensor(model: Recorder) -> None:
    x = images(4)
    model.logits(x)
    model.denoise(x, 0.2)
    model.energy(x, torch.tensor([0.0, 0.1, 0.2, 0.3]))
    assert [tuple(s.shape) for s in model.seen] == [(4,)] * 3
    assert torch.equal(model.seen[0], torch.zeros(4))
    assert torch.allclose(model.seen[1], torch.full((4,), 0.2))
    # Known answers through the public API.
    assert torch.allclose(model.denoise(x, 0.5), x / 1.25)
    assert torch.allclose(model.energy(x, 1.0), 0.25 * x.flatten(1).pow(2).sum(1))
    assert torch.allclose(model.logits(x, 0.3)[:, 2], torch.full((4,), 0.3))


# --- validation ---------------------------------------------------------------------------------
def test_validation_names_what_was_expected(model: Recorder) -> None:
    x = images(4)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 2, 2\).*got \(4, 1, 2, 3\)"):
        model.logits(torch.rand(4, 1, 2, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 2, 2\)"):
        model.logits(x[0])
    with pytest.raises(ValueError, match="floating-point.*torch.int64"):
        model.logits(torch.zeros(4, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.logits(torch.where(x > 0.5, torch.tensor(float("nan")), x), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\] at sigma = 0"):
        model.energy(x * 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.logits(np.zeros((4, 1, 2, 2), dtype=np.float32))  # type: ignore[arg-type]


def test_range_tolerance_and_noisy_rows(model: Recorder) -> None:
    x = images(4)
    x[0, 0, 0, 0] = 1 + RANGE_TOLERANCE / 2  # round-off is tolerated
    model.logits(x)
    x[0, 0, 0, 0] = 1 + 1e-3
    with pytest.raises(ValueError):
        model.logits(x)
    model.logits(x, 0.1)  # a noisy input may leave [0, 1]
    model.logits(x, torch.tensor([0.1, 0.0, 0.0, 0.0]))  # only the σ = 0 rows are range-checked
    with pytest.raises(ValueError):
        model.logits(x, torch.tensor([0.0, 0.1, 0.1, 0.1]))
    assert model.logits(torch.zeros(0, 1, 2, 2)).shape == (0, 3)


def test_trusted_inputs_skips_validation_and_restores_it(model: Recorder) -> None:
    outside = images(4) + 2
    with trusted_inputs():
        assert model.logits(outside).shape == (4, 3)
        with trusted_inputs():
            model.logits(outside)
        model.logits(outside)  # still trusted after the inner block ends
        with pytest.raises(ValueError, match="shape"):  # σ's shape is still checked
            as_sigma(torch.zeros(3), outside)
    with pytest.raises(ValueError):
        model.logits(outside)
    with pytest.raises(RuntimeError), trusted_inputs():
        raise RuntimeError("an engine failed")
    with pytest.raises(ValueError):  # an exception inside the block does not leave validation off
        model.logits(outside)
    validate_images(images(2), (1, 2, 2))


# --- capabilities --------------------------------------------------------------------------------
def test_capability_error_names_model_and_capability() -> None:
    error = CapabilityError("egc", "sample", frozenset({"logits", "energy"}))
    assert str(error) == "model 'egc' does not have the capability 'sample' (it has: energy, logits)"
    assert (error.model_name, error.capability) == ("egc", "sample")
    assert isinstance(error, NotImplementedError)
    assert "(it has: none)" in str(CapabilityError("m", "logits", frozenset()))


def test_undeclared_capabilities_raise_even_when_implemented(model: Recorder) -> None:
    model.capabilities = frozenset({"logits"})
    with pytest.raises(CapabilityError, match="'recorder' does not have the capability 'energy'"):
        model.energy(images(2))
    with pytest.raises(CapabilityError, match="'sample'"):
        model.sample(2)


def test_declared_but_unimplemented_capability_is_a_capability_error() -> None:
    class Partial(JointModel):
        capabilities = frozenset({"logits", "denoise"})
        num_classes = 2
        input_shape = (1, 2, 2)

    with pytest.raises(CapabilityError, match="denoise"):
        Partial().denoise(images(2), 0.1)


def test_sample_validates_its_arguments(model: Recorder) -> None:
    out = model.sample(3, y=[0, 2, 1], generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 2, 2)
    assert torch.equal(out, model.sample(3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="positive"):
        model.sample(0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        model.sample(2, y=[0, 3])
    with pytest.raises(ValueError, match="2 class indices"):
        model.sample(2, y=[0, 1, 2])
