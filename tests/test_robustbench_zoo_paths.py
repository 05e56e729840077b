"""robustbench:<Name> beyond the single CIFAR-10 model: an ensemble, the timm branch, CIFAR-100, ImageNet, and
an attack on such a model.

Each checkpoint is written here from seeded random weights, in the layout
RobustBench's own downloads have; RobustBench's `load_model` (or timm, for
the timm entries) reads the same files as the independent reference. The
architectures are real (tens of millions of parameters), so these tests are
marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import robusteval

pytestmark = pytest.mark.slow


def _seeded(build, seed: int) -> nn.Module:
    """A module built under a seed (its default initialisation) with non-trivial BatchNorm statistics, so that a
    module whose weights were not loaded disagrees with it."""
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return module.eval()


def _entry(dataset: str, threat: str, name: str) -> dict:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]


def _reference(name: str, model_dir: Path, dataset: str, threat: str) -> nn.Module:
    """RobustBench's own loader, offline (every file it wants is there)."""
    from robustbench.utils import load_model

    return load_model(model_name=name, model_dir=model_dir, dataset=dataset, threat_model=threat).eval()


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Chen2020Adversarial: RobustBench's ensemble of three ResNet-50s, one checkpoint file per member."""
    name = "Chen2020Adversarial"
    root = tmp_path_factory.mktemp("robustbench_ensemble")
    folder = root / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    architecture = _seeded(_entry("cifar10", "Linf", name)["model"], seed=10)
    assert len(architecture.models) == 3
    for i, member in enumerate(architecture.models):
        state = {f"module.{k}": v for k, v in member.state_dict().items()}
        torch.save({"state_dict": state}, folder / f"{name}.pt_m{i}.pt")
    return name, root


def test_an_ensemble_loads_each_member_from_its_own_file(ensemble):
    name, root = ensemble
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = robusteval.create_model(f"robustbench:{name}", dataset="cifar10", model_dir=root)
    assert (model.num_classes, model.input_shape) == (10, (3, 32, 32))
    with torch.no_grad():
        expected = _reference(name, root, "cifar10", "Linf")(images)
        assert torch.allclose(model(images), expected, atol=1e-5)
        # Each member holds its own file's weights (the ensemble averages over members, so a mix-up of two
        # files would not show in its output).
        reference = _reference(name, root, "cifar10", "Linf")
        for ours, theirs in zip(model.module.models, reference.models):
            assert torch.allclose(ours(images), theirs(images), atol=1e-5)
        assert not torch.allclose(model.module.models[0](images), model.module.models[1](images), atol=1e-3)


def test_an_attack_on_the_ensemble_is_verified_against_robustbench_loader(ensemble):
    name, root = ensemble
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = _reference(name, root, "cifar10", "Linf")
    with torch.no_grad():
        labels = reference(images).argmax(1)  # every point starts correct
    model = robusteval.create_model(f"robustbench:{name}", dataset="cifar10", model_dir=root)
    result = robusteval.evaluate_attack(model, (images, labels), attack="pgd", eps=[8 / 255],
                                        steps=3, device="cpu", large_eps_check=False, masking_checks=False)
    assert result.clean_accuracy == 1.0 and result.model == f"robustbench:{name}"
    adversarial = result.adversarial[8 / 255]
    broken = torch.tensor([r["results"][0]["broken"] for r in result.records])
    with torch.no_grad():
        fooled = reference(adversarial).argmax(1) != labels
    # Every counted break fools RobustBench's own copy of the model, inside the ball and the box.
    assert torch.equal(broken, fooled)
    assert float((adversarial - images).abs().max()) <= 8 / 255 + 1e-6
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    assert result.curve[0].robust == int((~broken).sum())


def test_timm_entries_on_cifar100_load_through_timm(tmp_path):
    import timm

    name = "Debenedetti2022Light_XCiT-S12"
    timm_name = "debenedetti2022light_xcit_s12_cifar100_linf"
    assert timm.is_model(timm_name)
    source = _seeded(lambda: timm.create_model(timm_name, num_classes=100, pretrained=False), seed=3)
    folder = tmp_path / "cifar100" / "Linf"
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / f"{name}.pt")
    model = robusteval.create_model(f"robustbench:{name}", dataset="cifar100", model_dir=tmp_path)
    assert (model.num_classes, model.input_shape) == (100, (3, 32, 32))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(images)
        assert expected.shape == (2, 100)
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_imagenet_models_read_released_keys_into_the_normalising_wrapper(tmp_path):
    # RobustBench's ImageNet models wrap the network in a normalisation layer ('model.' keys) while the
    # released checkpoints have bare keys; RobustBench adds the prefix itself.
    name = "Salman2020Do_R18"
    architecture = _seeded(_entry("imagenet", "Linf", name)["model"], seed=4)
    released = {k.removeprefix("model."): v for k, v in architecture.state_dict().items() if k.startswith("model.")}
    folder = tmp_path / "imagenet" / "Linf"
    folder.mkdir(parents=True)
    torch.save(released, folder / f"{name}.pt")
    model = robusteval.create_model(f"robustbench:{name}", dataset="imagenet", model_dir=tmp_path)
    assert (model.num_classes, model.input_shape) == (1000, (3, 224, 224))
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = _reference(name, tmp_path, "imagenet", "Linf")(images)
        assert torch.allclose(model(images), expected, atol=1e-5)
        assert torch.allclose(model(images), architecture(images), atol=1e-5)
