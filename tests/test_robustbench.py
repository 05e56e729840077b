"""RobustBench through robusteval: the autoattack alias, load_model offline, robustbench:<Name>.

Every checkpoint here is written by the test itself, for Ding2020MMA: the
smallest architecture of RobustBench's cifar10/Linf zoo (a WRN-28-4, 5.8 M
parameters) that is neither a timm model nor an ensemble, so
robustbench.utils.load_model goes to the local file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import robusteval
from robusteval.core.checkpoints import CheckpointError
from robusteval.core.interface import CapabilityError
from robusteval.core.names import UnknownNameError
from robusteval.model_zoo import robustbench_zoo
from robusteval.model_zoo.robustbench_zoo import create_robustbench_model

NAME = "Ding2020MMA"


def _architecture() -> nn.Module:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][NAME]["model"]()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The module whose weights every checkpoint holds, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    module = _architecture()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    return module.eval()


@pytest.fixture(scope="module")
def model_dir(source: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RobustBench's layout with a checkpoint as RobustBench ships them: {'state_dict': 'module.'-prefixed}."""
    root = tmp_path_factory.mktemp("robustbench_models")
    (root / "cifar10" / "Linf").mkdir(parents=True)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7}, root / "cifar10" / "Linf" / f"{NAME}.pt")
    return root


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail (and record) any attempt to connect, look up a host, or call RobustBench's downloader."""
    import gdown
    import robustbench.utils

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", refuse)
    monkeypatch.setattr(robustbench.utils, "download_gdrive", refuse)
    monkeypatch.setattr(gdown, "download", refuse)
    return attempts


@pytest.mark.slow
def test_fresh_process_imports_robustbench_through_robusteval() -> None:
    code = textwrap.dedent(
        """
        import robusteval
        import robustbench
        from robustbench.utils import load_model
        import autoattack, autoattack.state, pyautoattack, pyautoattack.state
        from autoattack import AutoAttack
        from autoattack.state import EvaluationState
        assert autoattack.AutoAttack is pyautoattack.AutoAttack
        assert AutoAttack is pyautoattack.AutoAttack
        assert EvaluationState is pyautoattack.state.EvaluationState
        assert callable(load_model)
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_autoattack_is_pyautoattack_in_this_process() -> None:
    import autoattack
    import pyautoattack

    assert autoattack.AutoAttack is pyautoattack.AutoAttack
    assert sys.modules["autoattack.state"] is sys.modules["pyautoattack.state"]


def test_robustbench_load_model_reads_the_local_checkpoint_offline(
    source: nn.Module, model_dir: Path, images: torch.Tensor, no_network: list[str]
) -> None:
    from robustbench.utils import load_model

    loaded = load_model(model_name=NAME, model_dir=model_dir, dataset="cifar10", threat_model="Linf")
    assert no_network == []
    with torch.no_grad():
        expected = source(images)
        assert torch.equal(loaded(images), expected)
        # A freshly initialised network disagrees, so equality above means the file was read.
        assert not torch.allclose(_architecture().eval()(images), expected)


def test_create_robustbench_model_equals_the_module(
    source: nn.Module, model_dir: Path, images: torch.Tensor, no_network: list[str]
) -> None:
    model = robusteval.create_model(f"robustbench:{NAME}", dataset="cifar10", model_dir=model_dir)
    assert no_network == []
    assert isinstance(model, robusteval.JointModel)
    assert model.name == f"robustbench:{NAME}"
    assert (model.num_classes, model.input_shape, model.capabilities) == (10, (3, 32, 32), frozenset({"logits"}))
    assert not model.training
    with torch.no_grad():
        expected = source(images)
        assert torch.equal(model.logits(images), expected)
        assert torch.equal(model(images), expected)
    with pytest.raises(CapabilityError, match="denoise"):
        model.denoise(images, 0.25)


@pytest.mark.parametrize("layout", ["plain", "model-prefix", "last"])
def test_robustbench_checkpoint_conventions(
    layout: str, source: nn.Module, tmp_path: Path, images: torch.Tensor
) -> None:
    state = source.state_dict()
    if layout == "model-prefix":  # Chen2020Efficient-style keys
        payload: object = {f"model.{k}": v for k, v in state.items()}
    elif layout == "last":  # Kireev2021Effectiveness-style {'last': ..., 'best': ...}
        payload = {"last": {"state_dict": dict(state)}, "best": {"state_dict": {}}}
    else:
        payload = dict(state)
    path = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    model = create_robustbench_model(NAME, model_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(model.logits(images), source(images))


def test_missing_checkpoint_names_the_exact_path(tmp_path: Path, no_network: list[str]) -> None:
    expected = tmp_path / "cifar10" / "L2" / "Standard.pt"
    with pytest.raises(CheckpointError) as error:
        create_robustbench_model("Standard", dataset="cifar10", threat_model="L2", model_dir=tmp_path)
    assert str(expected) in str(error.value)
    assert "never downloads" in str(error.value)
    with pytest.raises(CheckpointError, match="model_dir"):
        create_robustbench_model("Standard", dataset="cifar10", model_dir=None)
    assert no_network == []


def test_mismatched_checkpoint_is_a_clear_error(source: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    state = dict(source.state_dict())
    dropped = "fc.weight" if "fc.weight" in state else sorted(state)[-1]
    del state[dropped]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        create_robustbench_model(NAME, model_dir=tmp_path)
    message = str(error.value)
    assert "missing keys" in message and dropped in message
    assert "unexpected keys" in message and "extra.weight" in message

    # Another architecture's weights: every key is wrong.
    torch.save(nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        create_robustbench_model(NAME, model_dir=tmp_path)


def test_a_pickled_object_is_refused_unless_unsafe_pickle_is_allowed(source: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": source.state_dict(), "args": _Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        create_robustbench_model(NAME, model_dir=tmp_path)
    model = create_robustbench_model(NAME, model_dir=tmp_path, allow_unsafe_pickle=True)
    assert model.name == f"robustbench:{NAME}"


class _Namespace:
    """An arbitrary class, as training scripts pickle their argparse options into checkpoints."""

    def __init__(self, **kwargs: float):
        self.__dict__.update(kwargs)


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean: Ding2020MMA"):
        create_robustbench_model("Ding2020MAM", model_dir="/nonexistent")
    with pytest.raises(UnknownNameError, match="cifar10, cifar100, imagenet"):
        create_robustbench_model("Standard", dataset="digits", model_dir="/nonexistent")
    with pytest.raises(UnknownNameError, match="Did you mean: Linf"):
        create_robustbench_model("Standard", threat_model="linfty", model_dir="/nonexistent")
    # Names are resolved per data set and threat model.
    assert NAME in robustbench_zoo.robustbench_models("cifar10", "Linf")
    assert NAME not in robustbench_zoo.robustbench_models("cifar100", "Linf")


def test_an_architecture_that_downloads_is_refused_offline() -> None:
    import urllib.request

    def downloading_factory() -> nn.Module:
        urllib.request.urlopen("https://download.pytorch.org/models/resnet50-0676ba61.pth", timeout=5)
        return nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match="never downloads"):
        robustbench_zoo._build_architecture("Fake", {"model": downloading_factory}, "cifar10", "Linf", 10)
    # The guard is lifted afterwards.
    assert socket.socket.connect is _ORIGINAL_CONNECT
    assert socket.getaddrinfo is _ORIGINAL_GETADDRINFO


_ORIGINAL_CONNECT = socket.socket.connect
_ORIGINAL_GETADDRINFO = socket.getaddrinfo
